"""The Linux runtime: a fast BLAS and allocator settings for MLX, loaded in-process.

The `mlx-cpu` wheel links a bundled reference BLAS (3-8 GFLOP/s for a float32 1024^2
matmul on a 2-core x86 machine). `prepare()` runs when `lavit_mlx` is imported, before
MLX is: it loads a fast BLAS with `ctypes` and a small shim (`native/blas_shim.c`)
with RTLD_GLOBAL, so that libmlx.so's `cblas_sgemm`/`dgemm`/`cgemm` resolve to it.
Nothing is re-executed and no system package is needed; the library API, notebooks,
servers and the CLI all get it. Which BLAS, in order:

1. `LAVIT_BLAS=/path/lib.so` (an OpenBLAS with plain `cblas_*` or `scipy_cblas_*`
   symbols), or `LAVIT_BLAS=reference` (also `LAVIT_NO_OPENBLAS=1`) to keep MLX's own;
2. the pip wheel `scipy-openblas32` (a dependency on Linux: a current OpenBLAS that
   detects new CPUs, symbols prefixed `scipy_`);
3. a system OpenBLAS (Debian's `libopenblas0-pthread`); 0.3.21 does not know recent
   Intel CPUs and falls back to an SSE3 kernel, so its core type is set from the CPU
   flags before it loads (unless `OPENBLAS_CORETYPE` is set) and checked after.

The shim is compiled once per machine with the system C compiler (cached under
~/.cache/lavit-mlx). It also computes 1-8-row products itself (LLM decoding at memory
speed). Without a compiler only a system OpenBLAS can be used (its symbols are
unprefixed) and `lavit info` says what is missing.

glibc's malloc is tuned with `mallopt` (large activations stay on the heap instead of
being page-faulted in from a fresh mmap on every use). On macOS nothing is done (MLX
uses Accelerate and Metal there). Importing this module imports no mlx.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Dict, List, Optional, Tuple

BLAS_ENV = "LAVIT_BLAS"
OPT_OUT_ENV = "LAVIT_NO_OPENBLAS"
SKINNY_OPT_OUT_ENV = "LAVIT_NO_SKINNY_SGEMM"
SHIM_SOURCE = Path(__file__).with_name("native") / "blas_shim.c"
FIX_HINT = "pip install scipy-openblas32 (and a C compiler: gcc), or set LAVIT_BLAS=/path/to/libopenblas.so"

# glibc mallopt parameters (malloc.h): serve buffers up to 512 MB from the heap and keep
# freed memory for reuse rather than returning it to the kernel after every op.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
MALLOC_TUNING = {_M_MMAP_THRESHOLD: 512 * 2**20, _M_TRIM_THRESHOLD: 1024 * 2**20, _M_TOP_PAD: 64 * 2**20}

# OpenBLAS kernels that mean "did not recognise this CPU" on an x86 machine with AVX2.
_FALLBACK_CORES = {"prescott", "core2", "katmai", "coppermine", "northwood", "banias", "atom", "penryn",
                   "dunnington", "nehalem", "opteron", "barcelona", "generic"}


@dataclass
class BlasState:
    """What `prepare()` did, for `lavit info` and benchmark headers."""

    library: str = "reference BLAS bundled with mlx-cpu"
    path: Optional[str] = None
    core: Optional[str] = None  # the kernel OpenBLAS chose (openblas_get_corename)
    version: Optional[str] = None
    mechanism: str = "none"  # "in-process (ctypes, RTLD_GLOBAL)", "Accelerate", "none"
    skinny_kernel: bool = False
    malloc_tuned: bool = False
    warnings: List[str] = field(default_factory=list)

    @property
    def fast(self) -> bool:
        return self.path is not None or sys.platform == "darwin"


STATE = BlasState()
_PREPARED = False
_HANDLES: list = []  # keep the loaded libraries alive for the process' lifetime
_PREFIX: List[Optional[str]] = [None]  # the loaded OpenBLAS' symbol prefix ("" or "scipy_")


def _cpu_flags() -> set:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _scipy_openblas() -> Optional[str]:
    """The library of the `scipy-openblas32` wheel, located without importing it."""
    import importlib.util

    spec = importlib.util.find_spec("scipy_openblas32")
    if spec is None or not spec.submodule_search_locations:
        return None
    lib_dir = Path(list(spec.submodule_search_locations)[0]) / "lib"
    found = sorted(lib_dir.glob("libscipy_openblas*.so*"))
    return str(found[0]) if found else None


def system_openblas() -> Optional[str]:
    """Path of a system `libopenblas.so.0` (Debian's libopenblas0-pthread, ...), or None."""
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


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lavit-mlx"


def build_shim() -> Tuple[Optional[str], Optional[str]]:
    """(path of the compiled shim, None) or (None, why it could not be built).

    Compiled with -march=native for this CPU (a shared home may see other CPUs: the
    cache key includes the CPU flags), once; concurrent builds agree (atomic rename).
    """
    if not SHIM_SOURCE.is_file():
        return None, f"{SHIM_SOURCE} is missing from the installation"
    source = SHIM_SOURCE.read_bytes()
    flags = " ".join(sorted(_cpu_flags()))
    digest = hashlib.sha256(source + platform.machine().encode() + flags.encode()).hexdigest()[:16]
    library = cache_dir() / f"liblavit_blas-{digest}.so"
    if library.is_file():
        return str(library), None
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        return None, "no C compiler (cc, gcc or clang) to build lavit's BLAS shim"
    try:
        library.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=".blas-", suffix=".so", dir=library.parent)
        os.close(handle)
        done = subprocess.run(
            [compiler, "-O3", "-march=native", "-shared", "-fPIC", "-pthread", "-o", temporary, str(SHIM_SOURCE)],
            capture_output=True, timeout=120, text=True,
        )
        if done.returncode != 0:
            os.unlink(temporary)
            first = (done.stderr.strip().splitlines() or ["unknown error"])[0]
            return None, f"building lavit's BLAS shim with {compiler} failed: {first}"
        os.replace(temporary, library)
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"building lavit's BLAS shim failed: {exc}"
    return str(library), None


def _symbols(lib: ctypes.CDLL) -> Optional[str]:
    """The symbol prefix of an OpenBLAS ('' or 'scipy_'), None if it is not a CBLAS."""
    for prefix in ("scipy_", ""):
        try:
            getattr(lib, f"{prefix}cblas_sgemm")
            return prefix
        except AttributeError:
            continue
    return None


def _describe_openblas(lib: ctypes.CDLL, prefix: str) -> Tuple[Optional[str], Optional[str]]:
    def call(name):
        try:
            fn = getattr(lib, f"{prefix}{name}")
        except AttributeError:
            return None
        fn.restype = ctypes.c_char_p
        value = fn()
        return value.decode(errors="replace").strip() if value else None

    return call("openblas_get_corename"), call("openblas_get_config")


def _choose_library() -> Tuple[Optional[str], str]:
    """(path, how it was chosen) or (None, reason)."""
    chosen = os.environ.get(BLAS_ENV, "").strip()
    if chosen.lower() in ("reference", "none", "0") or os.environ.get(OPT_OUT_ENV):
        return None, f"opted out ({BLAS_ENV}={chosen or 'unset'}, {OPT_OUT_ENV}={os.environ.get(OPT_OUT_ENV, '')})"
    if chosen:
        return chosen, BLAS_ENV
    pip_library = _scipy_openblas()
    if pip_library:
        return pip_library, "scipy-openblas32"
    system = system_openblas()
    if system:
        return system, "system"
    return None, "no fast BLAS found"


def tune_malloc() -> bool:
    """Apply `MALLOC_TUNING` to this process with glibc's `mallopt`; False where it cannot.

    Only the allocator part of `prepare()`, loading nothing: benchmarks call it in their
    PyTorch workers so that both frameworks run with the same malloc settings.
    """
    try:
        libc = ctypes.CDLL(None)
        return all(libc.mallopt(param, value) == 1 for param, value in MALLOC_TUNING.items())
    except (OSError, AttributeError):
        return False


def release_free_memory() -> bool:
    """Give the heap's free pages back to the kernel (glibc's `malloc_trim`); False where
    it cannot. With `MALLOC_TUNING` freed memory stays in the process for reuse, which is
    right during work; a server calls this when it goes idle so that fragmentation does not
    show as slowly rising resident memory.
    """
    try:
        return bool(ctypes.CDLL(None).malloc_trim(0))
    except (OSError, AttributeError):
        return False


def prepare() -> BlasState:
    """Load the fast BLAS into this process before MLX is imported (idempotent).

    Never raises: whatever goes wrong is recorded in `STATE.warnings` and MLX keeps its
    reference BLAS.
    """
    global _PREPARED
    if _PREPARED:
        return STATE
    _PREPARED = True
    if sys.platform == "darwin":
        STATE.library, STATE.mechanism = "Accelerate (macOS)", "Accelerate"
        return STATE
    if not sys.platform.startswith("linux"):
        return STATE
    STATE.malloc_tuned = tune_malloc()
    if "mlx.core" in sys.modules:
        STATE.warnings.append(
            "mlx was imported before lavit_mlx, so MLX keeps its slow reference BLAS; import lavit_mlx first"
        )
        return STATE
    path, how = _choose_library()
    if path is None:
        fix = FIX_HINT if how == "no fast BLAS found" else f"unset {BLAS_ENV}/{OPT_OUT_ENV} for ~50x faster matmuls"
        STATE.warnings.append(f"MLX uses its slow reference BLAS (~5 GFLOP/s): {how}; {fix}")
        return STATE
    try:
        _load(path, how)
    except OSError as exc:
        STATE.warnings.append(f"could not load {path} ({exc}); MLX uses its slow reference BLAS")
    return STATE


def _load(path: str, how: str) -> None:
    flags = _cpu_flags()
    if how == "system" and "OPENBLAS_CORETYPE" not in os.environ:
        # Debian's 0.3.21 picks an SSE3 kernel on CPUs newer than it; name the right one.
        if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
            os.environ["OPENBLAS_CORETYPE"] = "SkylakeX"
        elif {"avx2", "fma"} <= flags:
            os.environ["OPENBLAS_CORETYPE"] = "Haswell"
    lib = ctypes.CDLL(path, mode=ctypes.RTLD_LOCAL)
    prefix = _symbols(lib)
    if prefix is None:
        raise OSError("it has no cblas_sgemm (not a CBLAS library)")
    _HANDLES.append(lib)
    _PREFIX[0] = prefix
    STATE.core, STATE.version = _describe_openblas(lib, prefix)
    shim, why = build_shim()
    skinny = not os.environ.get(SKINNY_OPT_OUT_ENV)
    if shim is not None:
        shim_lib = ctypes.CDLL(shim, mode=ctypes.RTLD_GLOBAL)
        address = lambda name: ctypes.cast(getattr(lib, f"{prefix}{name}"), ctypes.c_void_p)  # noqa: E731
        shim_lib.lavit_blas_bind.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int]
        if shim_lib.lavit_blas_bind(address("cblas_sgemm"), address("cblas_dgemm"), address("cblas_cgemm"),
                                    int(skinny)) != 0:
            raise OSError("lavit's BLAS shim refused the library's functions")
        _HANDLES.append(shim_lib)
        STATE.skinny_kernel = skinny
    elif prefix == "":
        # Unprefixed symbols: the library itself can serve MLX, without the skinny kernel.
        _HANDLES.append(ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL))
        STATE.warnings.append(f"{why}; LLM decoding runs at about half speed without its skinny-GEMM kernel")
    else:
        STATE.warnings.append(f"{why}, so {path} cannot be used (its symbols are prefixed); {FIX_HINT}")
        return
    STATE.path = path
    STATE.library = {"scipy-openblas32": "OpenBLAS (pip scipy-openblas32)", "system": "OpenBLAS (system)",
                     BLAS_ENV: f"OpenBLAS ({BLAS_ENV})"}[how]
    STATE.mechanism = "in-process (ctypes, RTLD_GLOBAL, before mlx)"
    if STATE.core and STATE.core.lower() in _FALLBACK_CORES and "avx2" in flags:
        STATE.warnings.append(
            f"OpenBLAS chose its {STATE.core} kernel on a CPU with AVX2: it does not recognise this CPU "
            "(set OPENBLAS_CORETYPE, e.g. SkylakeX or Haswell, or use scipy-openblas32)"
        )


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def set_blas_threads(count: int) -> Optional[int]:
    """Set the loaded OpenBLAS' thread count; returns the previous one (None without one).

    The training loop's parallel parts (`train.streams`) each call the BLAS from their own
    thread, so they ask for one thread each and restore the count afterwards."""
    if not _HANDLES or _PREFIX[0] is None:
        return None
    lib = _HANDLES[0]
    getter = getattr(lib, f"{_PREFIX[0]}openblas_get_num_threads", None)
    setter = getattr(lib, f"{_PREFIX[0]}openblas_set_num_threads", None)
    if getter is None or setter is None:
        return None
    previous = int(getter())
    setter(ctypes.c_int(int(count)))
    return previous


def sgemm_calls() -> Optional[int]:
    """float32 products MLX has sent through lavit's BLAS shim so far (None without the shim)."""
    shim = next((h for h in _HANDLES if hasattr(h, "lavit_blas_sgemm_calls")), None)
    if shim is None:
        return None
    shim.lavit_blas_sgemm_calls.restype = ctypes.c_long
    return int(shim.lavit_blas_sgemm_calls())


def measure_gflops(size: int = 1024, repeats: int = 5) -> float:
    """Measured float32 matmul throughput of MLX on its default device (GFLOP/s)."""
    import mlx.core as mx

    a = mx.random.normal((size, size), key=mx.random.key(0))
    b = mx.random.normal((size, size), key=mx.random.key(1))
    mx.eval(a @ b)
    start = time.perf_counter()
    for _ in range(repeats):
        mx.eval(a @ b)
    return 2 * size**3 / ((time.perf_counter() - start) / repeats) / 1e9


def blas_line(measure: bool = True) -> str:
    """One line: the library, its kernel and the measured GFLOP/s (benchmark headers, info)."""
    parts = [STATE.library]
    if STATE.path:
        parts.append(STATE.path)
    if STATE.core:
        parts.append(f"kernel {STATE.core}")
    if STATE.skinny_kernel:
        parts.append("+ skinny-GEMM kernel")
    text = ", ".join(parts)
    if measure:
        text += f"; float32 1024^2 matmul {measure_gflops():.0f} GFLOP/s"
    return text


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def describe_runtime() -> Tuple[Dict[str, str], List[str]]:
    """({label: value}, [warnings]) describing the software, the device and the BLAS."""
    import mlx.core as mx

    from .. import __version__

    device = mx.default_device()
    if mx.metal.is_available():
        info = mx.metal.device_info() if hasattr(mx.metal, "device_info") else {}
        device_text = f"{device} (Metal: {info.get('device_name', 'Apple GPU')})"
    elif hasattr(mx, "cuda") and mx.cuda.is_available():
        device_text = f"{device} (CUDA)"
    else:
        device_text = f"{device} (no GPU backend; float32 on the CPU)"
    report = {
        "lavit-mlx": __version__,
        "python": f"{platform.python_version()} ({platform.system()} {platform.machine()})",
        "mlx": _version("mlx"),
        "mlx-lm": _version("mlx-lm"),
        "numpy": _version("numpy"),
        "torch": _version("torch") + " (optional: reads .bin pickles, train/, convert --to torch)",
        "device": device_text,
        "blas": blas_line(measure=device == mx.cpu),
        "blas loading": STATE.mechanism,
    }
    if sys.platform.startswith("linux"):
        report["malloc"] = "tuned (mallopt)" if STATE.malloc_tuned else "glibc defaults"
    return report, list(STATE.warnings)
