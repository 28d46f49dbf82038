"""lavit-mlx: LaVIT (ICLR 2024) for Apple silicon with MLX.

The public API is imported lazily so that `lavit_mlx.config` (shared with the PyTorch
mirror in `lavit_train`) can be imported without mlx. On Linux, importing the package
first loads a fast BLAS into the process for MLX (`lavit_mlx.cpu.runtime`): it has to be
in place before `mlx.core` is imported.
"""

from .cpu import runtime as _runtime

_runtime.prepare()

__version__ = "0.1.0"

_LAZY = {
    "load": ("lavit_mlx.lavit", "load"),
    "LaVIT": ("lavit_mlx.lavit", "LaVIT"),
    "ImageTokens": ("lavit_mlx.lavit", "ImageTokens"),
    "LaVITError": ("lavit_mlx.errors", "LaVITError"),
    "CheckpointError": ("lavit_mlx.errors", "CheckpointError"),
    "ImageError": ("lavit_mlx.errors", "ImageError"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'lavit_mlx' has no attribute {name!r}")
