"""Session fixtures of the PyTorch trainer tests: tiny starting folders, data, run configs, and
running the driver (alone or under torchrun with gloo)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import builders  # noqa: E402
from harness import write_config  # noqa: E402


@pytest.fixture(scope="session")
def folders(tmp_path_factory):
    """{release, mlx, text, pixel, data}: the starting points and a 40-line caption manifest."""
    root = tmp_path_factory.mktemp("train-torch")
    release = builders.release_folder(root / "release")
    return {
        "release": release,
        "mlx": builders.mlx_folder(release, root / "mlx", ("eva", "tokenizer", "highres_decoder")),
        "text": builders.text_tokenizer(root / "text"),
        "pixel": builders.pixel_folder(root / "pixel"),
        "data": builders.manifest(root / "data", 40),
    }


@pytest.fixture(scope="session")
def tokenizer_config(folders, tmp_path_factory):
    config = {
        "stage": "tokenizer", "model": {"init": str(folders["mlx"]), **builders.TOKENIZER_MODEL},
        "data": {"train": str(folders["data"]), "image_size": 28, "shuffle_buffer": 4, "lines_per_shard": 5},
        "train": {"steps": 6, "batch_size": 4, "learning_rate": 3e-3, "warmup_steps": 1, "log_every": 1,
                  "save_every": 2, "keep_checkpoints": 5},
        "loss": {"init_batches": 1, "keep_weight": 1.0},
    }
    return write_config(tmp_path_factory.mktemp("configs") / "tokenizer.yaml", config)


@pytest.fixture(scope="session")
def tokenizer_run(tokenizer_config, tmp_path_factory):
    """A 16-step stage 1 run (checkpoints at 8 and 16, the export in `model/`)."""
    from harness import checked, run_driver

    out = tmp_path_factory.mktemp("tokenizer-run") / "run"
    checked(run_driver(tokenizer_config, out, "--set", "train.steps=16", "--set", "train.save_every=8"))
    return out
