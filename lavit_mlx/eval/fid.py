"""FID between two image sets: torchmetrics' FrechetInceptionDistance (extra `[fid]`).

torchmetrics runs torch-fidelity's port of the TensorFlow Inception-v3 of the original FID
code (Heusel et al. 2017, the network behind published FIDs) and accumulates feature means and
covariances in float64. Nothing is downloaded: the user passes the Inception weights file
(`--inception-weights PATH`, torch-fidelity's `weights-inception-2015-12-05-6726825d.pth`),
which is first checked with `torch.load(weights_only=True)` since torch-fidelity itself
unpickles it without that guard. torch is imported only inside these functions.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
import types
from pathlib import Path
from typing import Iterator, List, Sequence, Tuple, Union

import numpy as np

from ..errors import LaVITError, MissingDependencyError
from ..image_processing import load_image

INSTALL_HINT = "FID needs torchmetrics and torch-fidelity: pip install 'lavit-mlx[fid]'"
WEIGHTS_HINT = (
    "FID needs the Inception weights: pass --inception-weights PATH "
    "(torch-fidelity's weights-inception-2015-12-05-6726825d.pth)"
)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
FEATURE_SIZES = (64, 192, 768, 2048)

ImageSet = Union[str, Path, Sequence[Union[str, Path]]]


def list_images(source: ImageSet) -> List[Path]:
    """The image files of a folder (sorted, by suffix), or the given list of paths."""
    if isinstance(source, (str, Path)):
        folder = Path(source).expanduser()
        if not folder.is_dir():
            raise LaVITError(f"{folder}: no such folder of images")
        paths = sorted(path for path in folder.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise LaVITError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)})")
        return paths
    return [Path(path) for path in source]


def _load_inception_module() -> None:
    """Import torch-fidelity's Inception module, with or without torchvision.

    torch-fidelity's package __init__ imports its CLIP/VGG/DINOv2 extractors, which need
    torchvision (on Linux, PyPI's torchvision is a CUDA build that cannot load with a CPU
    torch); FID uses only the Inception module, which needs torch alone. When the package
    does not import for want of torchvision, its Inception module is loaded without the
    package __init__. This has to happen before torchmetrics, which imports it at import.
    """
    if "torch_fidelity.feature_extractor_inceptionv3" in sys.modules:
        return
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None:
        raise MissingDependencyError(INSTALL_HINT)
    try:
        importlib.import_module("torch_fidelity.feature_extractor_inceptionv3")
        return
    except ImportError as exc:
        if (exc.name or "").split(".")[0] != "torchvision":
            raise MissingDependencyError(f"{INSTALL_HINT} (torch-fidelity does not import: {exc})") from None
    except Exception:  # a torchvision that is installed but cannot load (torchmetrics then says so)
        pass
    for name in [name for name in sys.modules if name.split(".")[0] == "torch_fidelity"]:
        del sys.modules[name]
    package = types.ModuleType("torch_fidelity")
    package.__path__ = list(spec.submodule_search_locations)
    package.__spec__ = importlib.machinery.ModuleSpec("torch_fidelity", None, is_package=True)
    package.__spec__.submodule_search_locations = package.__path__
    sys.modules["torch_fidelity"] = package
    importlib.import_module("torch_fidelity.feature_extractor_inceptionv3")


def _require_fid():
    try:
        import torch
    except ImportError:
        raise MissingDependencyError(INSTALL_HINT) from None
    _load_inception_module()
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ImportError:
        raise MissingDependencyError(INSTALL_HINT) from None
    except Exception as exc:  # torchmetrics imports torchvision when installed; a build for another torch fails
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise MissingDependencyError(
            f"torchmetrics does not import ({detail}): install the torchvision build of your torch, or remove it"
        ) from None
    return torch, FrechetInceptionDistance


def _check_weights(torch, path: Union[str, Path, None]) -> Path:
    if path is None:
        raise LaVITError(WEIGHTS_HINT)
    path = Path(path).expanduser()
    if not path.is_file():
        raise LaVITError(f"Inception weights {path}: no such file; {WEIGHTS_HINT}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LaVITError(f"Inception weights {path}: not a plain PyTorch state dict ({first})") from None
    if not isinstance(state, dict) or "fc.weight" not in state:
        raise LaVITError(f"Inception weights {path}: not torch-fidelity's Inception-v3 state dict (no 'fc.weight')")
    return path


def _batches(paths: Sequence[Path], batch_size: int) -> Iterator[Tuple[int, np.ndarray]]:
    """uint8 (B, 3, H, W) batches of same-size images (the metric resizes them to 299 itself)."""
    pending: List[np.ndarray] = []
    for path in paths:
        pixels = np.asarray(load_image(path), dtype=np.uint8).transpose(2, 0, 1)  # (3, H, W)
        if pending and (pixels.shape != pending[0].shape or len(pending) == batch_size):
            yield len(pending), np.stack(pending)
            pending = []
        pending.append(pixels)
    if pending:
        yield len(pending), np.stack(pending)


def frechet_inception_distance(real: ImageSet, generated: ImageSet, inception_weights: Union[str, Path, None],
                               feature: int = 2048, batch_size: int = 16, device: str = "cpu",
                               antialias: bool = False) -> float:
    """FID between real and generated images.

    Args:
        real: a folder of images, or a list of image paths (at least 2).
        generated: the same, for the generated images.
        inception_weights: torch-fidelity's Inception-v3 weights file (nothing downloads).
        feature: Inception feature layer, 2048 (the standard FID) or 64/192/768.
        batch_size: images per forward pass.
        device: torch device ("cpu", "cuda", "mps").
        antialias: resize to 299 px with antialiasing; False (default) resizes as the
            TensorFlow reference does, which published FIDs use.

    Returns:
        The FID (lower is better; 0 for identical sets).
    """
    if feature not in FEATURE_SIZES:
        raise LaVITError(f"FID feature must be one of {', '.join(map(str, FEATURE_SIZES))}, not {feature}")
    if inception_weights is None:
        raise LaVITError(WEIGHTS_HINT)
    if not Path(inception_weights).expanduser().is_file():
        raise LaVITError(f"Inception weights {inception_weights}: no such file; {WEIGHTS_HINT}")
    sets = {"real": list_images(real), "generated": list_images(generated)}
    for name, paths in sets.items():
        if len(paths) < 2:
            raise LaVITError(f"FID needs at least 2 {name} images, got {len(paths)}")
    torch, FrechetInceptionDistance = _require_fid()
    weights = _check_weights(torch, inception_weights)
    metric = FrechetInceptionDistance(feature=feature, feature_extractor_weights_path=str(weights),
                                      antialias=antialias).to(device)
    with torch.no_grad():
        for name, paths in sets.items():
            for _, batch in _batches(paths, batch_size):
                metric.update(torch.from_numpy(batch).to(device), real=name == "real")
        return float(metric.compute())
