"""Models this package knows by name: the bundled shapes-world model ships inside it.

`lavit_mlx.load()` with no path, and every CLI command without `--model` (or `$LAVIT_MODEL`),
open the bundled model: a tiny LaVIT trained end to end by this project's MLX training on
the synthetic shapes world (`lavit train shapes`; docs/model-card-shapes.md).
"""

from __future__ import annotations

from pathlib import Path

from .errors import CheckpointError

BUNDLED_NAME = "lavit-shapes-tiny"
BUNDLED_MODEL = Path(__file__).with_name("bundled") / "shapes"


def bundled_model() -> Path:
    """The folder of the bundled model; a one-line error if this installation lacks it."""
    if not (BUNDLED_MODEL / "config.json").is_file():
        raise CheckpointError(f"the bundled model is missing from this installation ({BUNDLED_MODEL}); "
                              "pass --model DIR, or rebuild it with `lavit train shapes`")
    return BUNDLED_MODEL


def is_bundled(path) -> bool:
    try:
        return Path(path).resolve() == BUNDLED_MODEL.resolve()
    except OSError:
        return False


def model_name(path) -> str:
    """How to name a model folder to a user: the bundled model by its name, others by path."""
    return f"{BUNDLED_NAME} (bundled, {BUNDLED_MODEL})" if is_bundled(path) else str(path)
