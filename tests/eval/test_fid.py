"""FID with torchmetrics and torch-fidelity's Inception, on random weights saved to a file."""

from __future__ import annotations

import importlib.util
import sys
from unittest import mock

import numpy as np
import pytest
from PIL import Image

from lavit_mlx.errors import LaVITError, MissingDependencyError
from lavit_mlx.eval import fid

HAS_FID_EXTRA = all(importlib.util.find_spec(name) is not None for name in ("torch", "torchmetrics", "torch_fidelity"))
# Not in [dev]: torch-fidelity requires torchvision, and PyPI's is a CUDA build that breaks a CPU torch.
needs_fid = pytest.mark.skipif(not HAS_FID_EXTRA, reason="needs the [fid] extra (torchmetrics, torch-fidelity), "
                               "which [dev] leaves out")


def write_images(folder, count, low, high, seed):
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for index in range(count):
        size = (48, 64) if index % 2 else (64, 64)  # mixed sizes go through separate batches
        Image.fromarray(rng.integers(low, high, (*size, 3), dtype=np.uint8)).save(folder / f"{index}.png")
    return folder


@pytest.fixture(scope="module")
def random_inception(tmp_path_factory):
    """torch-fidelity's Inception-v3 with random weights, its state dict saved as the weights file."""
    torch, _ = fid._require_fid()  # loads torch-fidelity's Inception module (with or without torchvision)
    inception = sys.modules["torch_fidelity.feature_extractor_inceptionv3"]
    # Constructing it loads weights (from a URL when no path is given): skip that, keep the random init.
    with mock.patch.object(inception, "load_state_dict_from_url", return_value=None), \
            mock.patch.object(inception.FeatureExtractorInceptionV3, "load_state_dict", lambda *args, **kwargs: None):
        torch.manual_seed(0)
        network = inception.FeatureExtractorInceptionV3("inception-v3-compat", ["64"])
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    torch.save(network.state_dict(), path)
    return path


@needs_fid
@pytest.mark.slow
def test_fid_is_zero_for_the_same_set_and_positive_for_different_sets(tmp_path, random_inception):
    dark = write_images(tmp_path / "dark", 3, 0, 150, seed=1)
    bright = write_images(tmp_path / "bright", 3, 110, 256, seed=2)
    same = fid.frechet_inception_distance(dark, dark, random_inception, feature=64)
    different = fid.frechet_inception_distance(dark, sorted(bright.iterdir()), random_inception, feature=64)
    assert abs(same) < 1e-6
    assert different > 1e-3


@needs_fid
def test_weights_that_are_not_a_state_dict(tmp_path):
    bad = tmp_path / "weights.pth"
    bad.write_bytes(b"not a pickle")
    images = write_images(tmp_path / "x", 2, 0, 255, seed=0)
    with pytest.raises(LaVITError, match=r"weights.pth: not a plain PyTorch state dict"):
        fid.frechet_inception_distance(images, images, bad)


def test_missing_weights_say_what_to_pass(tmp_path):
    images = write_images(tmp_path / "x", 2, 0, 255, seed=0)
    with pytest.raises(LaVITError, match=r"pass --inception-weights PATH"):
        fid.frechet_inception_distance(images, images, None)
    with pytest.raises(LaVITError, match=r"absent.pth: no such file; FID needs the Inception weights"):
        fid.frechet_inception_distance(images, images, tmp_path / "absent.pth")
    with pytest.raises(LaVITError, match=r"feature must be one of 64, 192, 768, 2048"):
        fid.frechet_inception_distance(images, images, tmp_path / "absent.pth", feature=100)


def test_missing_extra_names_it(tmp_path, monkeypatch):
    images = write_images(tmp_path / "x", 2, 0, 255, seed=0)
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"x")
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(MissingDependencyError, match=r"torchmetrics and torch-fidelity: pip install 'lavit-mlx\[fid\]'"):
        fid.frechet_inception_distance(images, images, weights)


def test_image_sets_need_two_images(tmp_path):
    images = write_images(tmp_path / "x", 2, 0, 255, seed=0)
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"checked after the image sets")
    with pytest.raises(LaVITError, match=r"FID needs at least 2 generated images, got 1"):
        fid.frechet_inception_distance(images, [images / "0.png"], weights)
    with pytest.raises(LaVITError, match=r"empty: no such folder"):
        fid.list_images(tmp_path / "empty")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    with pytest.raises(LaVITError, match=r"notes: no image files"):
        fid.list_images(tmp_path / "notes")
