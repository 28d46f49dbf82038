"""The runtime: fast BLAS and allocator settings for MLX on Linux, and `lavit info`'s report.

The `mlx-cpu` wheel links a bundled reference BLAS (about 8 GFLOP/s for fp32 matmul on a
2-core x86 machine). Debian's OpenBLAS (`apt-get install libopenblas0-pthread`) exports
the same symbols and is 30-40x faster, but it has to be in the process before MLX is:
the dynamic loader only honours `LD_PRELOAD` at process start. `ensure_fast_runtime()`
therefore re-executes the current command once with `LD_PRELOAD` set when the library
is present and not loaded yet.

The same re-execution raises glibc's mmap threshold: by default every activation larger
than 32 MB is a fresh mmap whose pages fault in on first touch, which made MLX's
elementwise kernels 5x slower on batched ViT activations.

Both are no-ops on macOS (MLX uses Accelerate/Metal there). Opt out with
`LAVIT_NO_OPENBLAS=1`. This module imports no mlx until `describe_runtime` is called.
"""

from __future__ import annotations

import ctypes.util
import os
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Dict, List, Optional, Tuple

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


# glibc malloc: serve buffers up to 512 MB from the heap and keep freed memory for reuse.
MALLOC_TUNING = {
    "MALLOC_MMAP_THRESHOLD_": str(512 * 2**20),
    "MALLOC_TRIM_THRESHOLD_": str(1024 * 2**20),
    "MALLOC_TOP_PAD_": str(64 * 2**20),
}


_SKINNY_SOURCE = Path(__file__).with_name("native") / "skinny_sgemm.c"
_SKINNY_OPT_OUT = "LAVIT_NO_SKINNY_SGEMM"


def skinny_sgemm_library() -> Optional[str]:
    """Path of the skinny-GEMM interposer (native/skinny_sgemm.c), built once per machine.

    OpenBLAS packs the whole weight matrix even for a one-row product, which halves the
    memory bandwidth of LLM decoding; the interposer streams the weights once for
    products of at most 8 rows and hands every other call on to OpenBLAS. It is compiled
    with the system C compiler into the user cache (keyed by the source's hash); without
    a compiler nothing is preloaded and decoding is slower, not wrong.
    """
    if os.environ.get(_SKINNY_OPT_OUT) or not _SKINNY_SOURCE.is_file():
        return None
    import hashlib
    import shutil
    import subprocess
    import tempfile

    source = _SKINNY_SOURCE.read_bytes()
    # -march=native: the build belongs to this CPU (a shared home may see other CPUs)
    try:
        cpu = next((l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("flags")), "")
    except OSError:
        cpu = ""
    digest = hashlib.sha256(source + platform.machine().encode() + cpu.encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lavit-mlx"
    library = cache / f"libskinny_sgemm-{digest}.so"
    if library.is_file():
        return str(library)
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        return None
    try:
        cache.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=".skinny-", suffix=".so", dir=cache)
        os.close(handle)
        done = subprocess.run(
            [compiler, "-O3", "-march=native", "-shared", "-fPIC", "-pthread", "-o", temporary,
             str(_SKINNY_SOURCE), "-ldl"],
            capture_output=True, timeout=120,
        )
        if done.returncode != 0:
            os.unlink(temporary)
            return None
        os.replace(temporary, library)  # atomic: concurrent builds agree
    except (OSError, subprocess.SubprocessError):
        return None
    return str(library)


def fast_runtime_env() -> Optional[Dict[str, str]]:
    """The environment to re-execute with, or None when this process needs no re-execution."""
    if not sys.platform.startswith("linux") or os.environ.get(_OPT_OUT):
        return None
    if os.environ.get(_REEXEC_FLAG):
        return None  # already re-executed once; never loop
    library = find_openblas()
    if library is None or library in os.environ.get("LD_PRELOAD", ""):
        return None
    env = dict(os.environ)
    preload = [skinny_sgemm_library(), library, env.get("LD_PRELOAD", "")]
    env["LD_PRELOAD"] = ":".join(p for p in preload if p)
    env[_REEXEC_FLAG] = "1"
    for key, value in MALLOC_TUNING.items():
        env.setdefault(key, value)
    return env


def ensure_fast_runtime(argv: Optional[list] = None) -> None:
    """Re-execute this process with OpenBLAS preloaded when that is possible and useful.

    Call it first thing in an entry point. Returns normally when nothing needs doing.
    """
    env = fast_runtime_env()
    if env is None:
        return
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
        skinny = "libskinny_sgemm" in os.environ.get("LD_PRELOAD", "")
        extra = " + lavit's skinny-GEMM kernel for 1-8 row products" if skinny else ""
        return f"OpenBLAS ({find_openblas()}){extra}", None
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
