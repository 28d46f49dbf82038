"""Fast BLAS for MLX on Linux.

The `mlx-cpu` wheel links a bundled reference BLAS (about 8 GFLOP/s for fp32 matmul on a
2-core x86 machine). Debian's OpenBLAS (`apt-get install libopenblas0-pthread`) exports
the same symbols and is 30-40x faster, but it has to be in the process before MLX is:
the dynamic loader only honours `LD_PRELOAD` at process start. `ensure_fast_blas()`
therefore re-executes the current command once with `LD_PRELOAD` set when the library
is present and not loaded yet. It is a no-op on macOS (MLX uses Accelerate/Metal there).

Opt out with `LAVIT_NO_OPENBLAS=1`.
"""

from __future__ import annotations

import ctypes.util
import os
import platform
import sys
from pathlib import Path
from typing import Optional

_REEXEC_FLAG = "LAVIT_BLAS_REEXEC"
_OPT_OUT = "LAVIT_NO_OPENBLAS"
FIX_HINT = "install OpenBLAS (Debian/Ubuntu: apt-get install libopenblas0-pthread)"


def find_openblas() -> Optional[str]:
    """Path of a system `libopenblas.so.0`, or None."""
    machine = platform.machine()
    candidates = [
        f"/usr/lib/{machine}-linux-gnu/libopenblas.so.0",
        f"/usr/lib/{machine}-linux-gnu/openblas-pthread/libopenblas.so.0",
        "/usr/lib64/libopenblas.so.0",
        "/usr/lib/libopenblas.so.0",
    ]
    for path in candidates:
        if Path(path).is_file():
            return path
    name = ctypes.util.find_library("openblas")
    return name if name and Path(name).is_file() else None


def loaded_blas() -> str:
    """Which BLAS the current process has mapped: 'openblas', 'reference' or 'accelerate'."""
    if sys.platform == "darwin":
        return "accelerate"
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "unknown"
    if "libopenblas" in maps and "libopenblas" in os.environ.get("LD_PRELOAD", ""):
        return "openblas"
    if "libopenblas" in maps:
        # Loaded after MLX: MLX's calls still resolve to its bundled library.
        return "reference"
    return "reference" if "mlx_cpu.libs/libblas" in maps or "mlx" in maps else "unknown"


def ensure_fast_blas(argv: Optional[list] = None) -> None:
    """Re-execute this process with OpenBLAS preloaded when that is possible and useful.

    Call it first thing in an entry point. Returns normally when nothing needs doing.
    """
    if not sys.platform.startswith("linux") or os.environ.get(_OPT_OUT):
        return
    if os.environ.get(_REEXEC_FLAG):
        return  # already re-executed once; never loop
    library = find_openblas()
    if library is None or library in os.environ.get("LD_PRELOAD", ""):
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = ":".join(p for p in (library, env.get("LD_PRELOAD", "")) if p)
    env[_REEXEC_FLAG] = "1"
    args = argv if argv is not None else [sys.executable, *sys.orig_argv[1:]]
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(args[0], args, env)
    except OSError:
        return  # could not re-execute: carry on with the bundled BLAS


def blas_report() -> tuple[str, Optional[str]]:
    """(description, warning or None) for `lavit info`."""
    kind = loaded_blas()
    if kind == "accelerate":
        return "Accelerate (macOS)", None
    if kind == "openblas":
        return f"OpenBLAS ({find_openblas()})", None
    library = find_openblas()
    if library is None:
        return (
            "reference BLAS bundled with mlx-cpu (slow)",
            f"MLX uses a slow reference BLAS (~8 GFLOP/s); {FIX_HINT} and lavit will preload it",
        )
    if os.environ.get(_OPT_OUT):
        return (
            "reference BLAS bundled with mlx-cpu (slow)",
            f"{_OPT_OUT} is set, so {library} is not preloaded; unset it for ~30x faster matmuls",
        )
    return (
        "reference BLAS bundled with mlx-cpu (slow)",
        f"{library} is present but not preloaded; run with LD_PRELOAD={library}",
    )
