"""Where a worker's CPU time goes: Linux `perf` sampling of a stretch of a run, by kind of work.

`Recording(path)` samples every thread of this process with `perf record -e cpu-clock` from
its `start()` to its `stop()` (perf attaches to the running process: imports, set-up and
warm-up steps are left out);
each sample is 1/`FREQUENCY` s of one thread on a core, so samples / frequency is CPU
time. `categories(path)` reads the samples back (`perf report`) and sorts each symbol into
a kind of work, the same kinds for MLX and PyTorch:

- gemm: the BLAS matrix products (OpenBLAS, MKL, oneDNN);
- threads waiting: BLAS and OpenMP worker threads spinning or yielding between calls (a
  core that holds no useful work);
- elementwise (compiled): MLX's JIT-compiled fused kernels (`mx.compile`);
- elementwise and other ops: MLX's uncompiled unary/binary ops, PyTorch's ATen kernels;
- copies: transposes and strided copies; reductions; convolutions (MLX's own);
- scalar math: libm calls (exp, log, erf one element at a time);
- memory: malloc, memcpy/memset, page faults and the rest of the kernel;
- Python: the interpreter, numpy, PIL (the training loop, data, logging);
- other.

Needs `perf` on PATH and `kernel.perf_event_paranoid` <= 2 (sampling one's own processes).
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Tuple

FREQUENCY = 499  # samples per second of each running thread
KINDS = ("gemm", "threads waiting", "elementwise (compiled)", "elementwise and other ops", "copies", "reductions",
         "convolutions", "scalar math", "memory", "Python", "other")
_LINE = re.compile(r"\s*([\d.]+)%\s+(\S+)\s+\[(.)\]\s+(.*)")
_WAITING = re.compile(r"blas_thread_server|exec_blas_async_wait|gomp_(team_)?barrier|do_spin|do_wait|"
                      r"gomp_simple_barrier|sched_yield|futex", re.I)
_COMPILED_MLX = re.compile(r"^lib[A-Z]+f[0-9]|_f[0-9]+(f[0-9]+)*_\d+_(strided|contiguous)")


def unavailable() -> str:
    """Why this machine cannot profile ('' when it can)."""
    if shutil.which("perf") is None:
        return "--profile needs Linux perf on PATH (Debian: apt install linux-perf)"
    try:
        level = int(Path("/proc/sys/kernel/perf_event_paranoid").read_text())
    except (OSError, ValueError):
        return "--profile needs Linux perf events (/proc/sys/kernel/perf_event_paranoid is unreadable)"
    if level > 2:
        return f"--profile: kernel.perf_event_paranoid is {level}; perf needs 2 or less (sysctl -w ...=2)"
    return ""


class Recording:
    """Samples all threads of this process into `path` (perf.data) from `start()` to `stop()`."""

    def __init__(self, path: Path):
        self.path, self.proc, self.seconds = Path(path), None, 0.0

    def start(self) -> None:
        if self.proc is None:
            self.proc = subprocess.Popen(["perf", "record", "-q", "-e", "cpu-clock", "-F", str(FREQUENCY),
                                          "-p", str(os.getpid()), "-o", str(self.path)],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            time.sleep(0.5)  # perf attaches to every thread before the work goes on
            self.started = time.perf_counter()

    def stop(self) -> None:
        if self.proc is None:
            return
        self.seconds = time.perf_counter() - self.started
        self.proc.send_signal(signal.SIGINT)
        _, err = self.proc.communicate(timeout=120)
        if not self.path.exists():
            raise RuntimeError(f"perf record failed: {err.decode(errors='replace').strip()[:300]}")


def kind_of(dso: str, symbol: str) -> str:
    """The kind of work of one sampled symbol in one shared object."""
    low = symbol.lower()
    if _WAITING.search(symbol) or dso.startswith("libgomp"):
        return "threads waiting"
    if "openblas" in dso or "gemm" in low or "mkl_blas" in low or "dnnl" in low and "gemm" in low:
        return "gemm"
    if _COMPILED_MLX.search(dso) or "simd::" in symbol or symbol.startswith("fmaf"):
        return "elementwise (compiled)"
    if dso.startswith("libm.so") or dso.startswith("libm-"):
        return "scalar math"
    if "conv" in low or "im2col" in low or "col2im" in low:
        return "convolutions"
    if "copy" in low or "transpose" in low:
        return "copies"
    if "reduc" in low or "sum_kernel" in low or "norm_kernel" in low or "softmax" in low:
        return "reductions"
    if dso in ("libmlx.so", "libtorch_cpu.so", "libc10.so") or "torch" in dso:
        return "elementwise and other ops"
    if dso.startswith("libc.so") or dso.startswith("[kernel") or dso.startswith("ld-linux"):
        return "memory"
    if "python" in dso or dso.endswith(".so") and ("cpython" in dso or "_imaging" in dso) or dso.startswith("[JIT]"):
        return "Python"
    return "other"


def samples(path: Path) -> List[Tuple[float, str, str]]:
    """[(percent, dso, symbol)] of a perf.data file."""
    report = subprocess.run(["perf", "report", "-i", str(path), "--no-children", "--sort", "dso,sym", "-g", "none",
                             "--stdio", "--percent-limit", "0"], capture_output=True, text=True, check=True).stdout
    rows = []
    for line in report.splitlines():
        found = _LINE.match(line)
        if found:
            rows.append((float(found[1]), found[2], found[4].strip()))
    return rows


def exact_total(path: Path) -> int:
    """The number of samples (perf report rounds large counts to thousands)."""
    out = subprocess.run(["perf", "report", "-i", str(path), "--stdio", "--sort", "dso", "-g", "none", "-n"],
                         capture_output=True, text=True).stdout
    return sum(int(parts[1]) for parts in (line.split() for line in out.splitlines())
               if len(parts) > 2 and parts[0].endswith("%") and parts[1].isdigit())


def categories(path: Path) -> Dict[str, object]:
    """CPU seconds by kind of work, and the top symbols, of one recording."""
    rows = samples(path)
    seconds = exact_total(path) / FREQUENCY
    kinds: Dict[str, float] = collections.Counter()
    top: Dict[Tuple[str, str], float] = collections.Counter()
    for percent, dso, symbol in rows:
        kind = kind_of(dso, symbol)
        kinds[kind] += percent / 100 * seconds
        top[(kind, symbol[:70])] += percent / 100 * seconds
    return {"cpu_seconds": seconds, "kinds": {k: kinds.get(k, 0.0) for k in KINDS},
            "top": [[kind, symbol, s] for (kind, symbol), s in top.most_common(8)]}
