"""What this process runs on: versions, MLX device, BLAS (for `lavit info`)."""

from __future__ import annotations

import platform
import sys
from importlib import metadata
from typing import Dict, List, Tuple

from .blas import blas_report


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def describe_runtime() -> Tuple[Dict[str, str], List[str]]:
    """({label: value}, [warnings]) describing the software and the compute device."""
    import mlx.core as mx

    from . import __version__

    warnings = []
    device = mx.default_device()
    if mx.metal.is_available():
        info = mx.metal.device_info() if hasattr(mx.metal, "device_info") else {}
        name = info.get("device_name", "Apple GPU")
        device_text = f"{device} (Metal: {name})"
    else:
        device_text = f"{device} (no GPU backend; float32 on the CPU)"
    blas, blas_warning = blas_report()
    if blas_warning and not sys.platform == "darwin":
        warnings.append(blas_warning)
    report = {
        "lavit-mlx": __version__,
        "python": f"{platform.python_version()} ({platform.system()} {platform.machine()})",
        "mlx": _version("mlx"),
        "mlx-lm": _version("mlx-lm"),
        "numpy": _version("numpy"),
        "torch": _version("torch") + " (optional: reads .bin pickles, train/, convert --to torch)",
        "device": device_text,
        "blas": blas,
    }
    return report, warnings
