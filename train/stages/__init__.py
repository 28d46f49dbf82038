"""One module per PyTorch training stage (`tokenizer`, `llm`, `pixel`), the MLX stages' losses
on the `lavit_train.models` mirrors, transformers' LLaMA and diffusers' UNet/VAE.

Each module defines a `Stage` subclass registered with `stage_builder(name)`; `build_stage`
imports the one a run config names (so a tokenizer run imports neither transformers nor
diffusers).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable, Dict

import numpy as np
import torch

from lavit_mlx.errors import LaVITError

_BUILDERS: dict = {}
MODULES = {"tokenizer": "tokenizer", "llm": "llm", "pixel": "pixel"}


def stage_builder(name: str):
    """Decorator: `name`'s Stage class (built as `cls(config, world, launch)`)."""

    def register(cls):
        _BUILDERS[name] = cls
        return cls

    return register


def build_stage(config, world, launch):
    if config.stage not in MODULES:
        raise LaVITError(f"the PyTorch trainers train {', '.join(MODULES)}, not {config.stage!r}")
    importlib.import_module(f"{__name__}.{MODULES[config.stage]}")
    return _BUILDERS[config.stage](config, world, launch)


def image_example(image_size: int) -> Callable:
    """The transform of the image stages: the processed picture (the release's processor,
    NCHW float32) and the manifest's `num_objects` (0 when absent)."""
    from lavit_mlx.image_processing import preprocess

    def example(sample, stream) -> Dict[str, np.ndarray]:
        return {"pixels": preprocess([sample.image], image_size)[0],
                "num_objects": np.int64(sample.meta.get("num_objects", 0))}

    return example


def save_release(path: Path, state: Dict[str, torch.Tensor]) -> None:
    """One `.bin` pickle of the released layout (float32, contiguous, written then renamed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    torch.save({k: v.detach().to("cpu").contiguous() for k, v in state.items()}, partial)
    partial.replace(path)
