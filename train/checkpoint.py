"""Build the PyTorch mirror from a checkpoint folder, strictly: the released layout, or an
MLX folder written by `lavit convert` / the MLX trainers (its safetensors read directly,
convs turned back from OHWI to OIHW, head counts from its config.json), so that one run
config starts either framework from the same folder.

Same rules as the MLX loader: sizes from tensor shapes; head counts given, or the
release's 16 at the release's width (`lavit_mlx.config.vision_heads_for`), else a
one-line error asking for them; every key required with its shape and only the
release's known extras accepted (`lavit_mlx.layout.check_state`, shared with MLX).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

from torch import nn

from lavit_convert.torch_io import load_pickle
from lavit_mlx.config import EVAConfig, TokenizerConfig, VQDecoderConfig, check_heads
from lavit_mlx.errors import CheckpointError
from lavit_mlx.layout import KNOWN_EXTRAS, MLX_FORMAT, RELEASE_FILES, check_state

from .models.eva_vit import EVAVisionTransformer
from .models.visual_tokenizer import DynamicVisualTokenizer
from .models.vq_decoder import VQDecoder


def mlx_config(root) -> Optional[dict]:
    """The config.json of an MLX folder (None for the released layout, which has none)."""
    path = Path(root) / "config.json"
    if not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    return stored if isinstance(stored, dict) and stored.get("format") == MLX_FORMAT["name"] else None


def source_of(root, component: str) -> str:
    files = MLX_FORMAT["files"] if mlx_config(root) is not None else RELEASE_FILES
    return str(Path(root) / files[component])


def has_component(root, component: str) -> bool:
    path = Path(source_of(root, component))
    return path.is_file() or Path(str(path) + ".index.json").is_file()


def _read_mlx(path: Path) -> dict:
    """An MLX folder's safetensors (or its shards) as torch tensors in the torch layout."""
    from safetensors.torch import load_file

    index = Path(str(path) + ".index.json")
    if path.is_file():
        files = [path]
    elif index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [path.parent / name for name in names]
    else:
        raise CheckpointError(f"checkpoint {path.parent} is missing {path.name}")
    state = {}
    for file in files:
        state.update(load_file(str(file)))
    if any(k.endswith(".scales") for k in state):
        raise CheckpointError(f"{path}: stored quantized; convert it back with `lavit convert --to torch` first")
    # MLX convolutions are (O, kh, kw, I); torch's (O, I, kh, kw)
    return {k: v.permute(0, 3, 1, 2).contiguous() if v.ndim == 4 else v for k, v in state.items()}


def read_state_dict(root: Path, component: str) -> dict:
    if mlx_config(root) is not None:
        return _read_mlx(Path(root) / MLX_FORMAT["files"][component])
    path = Path(root) / RELEASE_FILES[component]
    if not path.is_file():
        raise CheckpointError(f"checkpoint {root} is missing {RELEASE_FILES[component]}")
    state = load_pickle(path)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict of tensors")
    return state


def stored_heads(root, component: str, given: Optional[int]) -> Optional[int]:
    """The head count: given, else an MLX folder's config.json, else None (the release's rule)."""
    stored = mlx_config(root)
    if given is not None or stored is None:
        return given
    section = {"eva": "vision", "understanding": "tokenizer"}.get(component, component)
    return (stored.get(section) or {}).get("num_heads")


def shapes_of(state: dict) -> dict:
    return {k: tuple(v.shape) for k, v in state.items()}


def infer_config(read: Callable[[dict], object], state: dict, source: str):
    """A config from the tensor shapes; a key it needs that is absent is a one-line error."""
    try:
        return read(shapes_of(state))
    except KeyError as exc:
        raise CheckpointError(f"{source}: missing key {exc}") from None


def load_state_strict(module: nn.Module, state: dict, source: str, component: Optional[str] = None) -> nn.Module:
    """`load_state_dict(strict=True)` after the shared key/shape check: the release's
    known extras of `component` are dropped, anything else wrong is a one-line
    CheckpointError that names the key and `source`. Returns the module in eval mode."""
    expected = module.state_dict()
    known = KNOWN_EXTRAS.get(component) if component else None
    check_state(shapes_of(expected), shapes_of(state), source, known)
    module.load_state_dict({k: state[k].to(expected[k].dtype) for k in expected}, strict=True)
    return module.eval()


def load_eva(root, vision_heads: Optional[int] = None) -> EVAVisionTransformer:
    """The EVA-CLIP tower of a release-layout folder (`vision_heads`: see module docstring)."""
    state = read_state_dict(root, "eva")
    source = source_of(root, "eva")
    vision_heads = stored_heads(root, "eva", vision_heads)
    config = infer_config(lambda shapes: EVAConfig.from_shapes(shapes, vision_heads), state, source)
    check_heads(config.width, config.num_heads, "EVA vision transformer", source)
    return load_state_strict(EVAVisionTransformer(config), state, source, "eva")


def load_tokenizer(root, vision_heads: Optional[int] = None, understanding: bool = False,
                   llm_hidden: Optional[int] = None) -> DynamicVisualTokenizer:
    """The discrete tokenizer (`tokenizer_encoder.bin`) or, with `understanding`, the
    selector with `visual_weight.bin`'s merger and projection loaded over it (as the
    official `build_dynamic_tokenizer` does: a selector copy in visual_weight.bin wins)."""
    state = read_state_dict(root, "tokenizer")
    source = source_of(root, "tokenizer")
    vision_heads = stored_heads(root, "tokenizer", vision_heads)
    config = infer_config(lambda shapes: TokenizerConfig.from_shapes(shapes, vision_heads), state, source)
    check_heads(config.width, config.num_heads, "token merger", source)
    if not understanding:
        return load_state_strict(DynamicVisualTokenizer(config, quantizer=True), state, source, "tokenizer")
    overlay = read_state_dict(root, "understanding")
    source = source_of(root, "understanding")
    if "vit_proj.weight" not in overlay:
        raise CheckpointError(f"{source}: missing key 'vit_proj.weight'")
    hidden = llm_hidden or overlay["vit_proj.weight"].shape[0]
    model = DynamicVisualTokenizer(config, quantizer=False, llm_hidden=hidden)
    merged = {k: v for k, v in state.items() if k.startswith("token_predictor.")}
    merged.update(overlay)
    return load_state_strict(model, merged, source, "understanding")


def load_decoder(root, highres: bool = True, vision_heads: Optional[int] = None) -> VQDecoder:
    """The high-res or low-res VQ decoder of a release-layout folder."""
    component = "highres_decoder" if highres else "lowres_decoder"
    state = read_state_dict(root, component)
    source = source_of(root, component)
    vision_heads = stored_heads(root, component, vision_heads)
    config = infer_config(lambda shapes: VQDecoderConfig.from_shapes(shapes, vision_heads), state, source)
    check_heads(config.width, config.num_heads, "VQ decoder", source)
    if config.highres:
        check_heads(config.feature_dim, config.num_heads, "VQ decoder pooling", source)
    return load_state_strict(VQDecoder(config), state, source, component)
