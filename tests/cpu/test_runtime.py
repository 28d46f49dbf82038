"""The Linux runtime: the fast BLAS loaded in-process, and the skinny-GEMM kernel."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from lavit_mlx.cpu import runtime

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux runtime only")


def _python(code: str, env=None) -> str:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("LAVIT_BLAS", "LAVIT_NO_"))}
    full.update(env or {})
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@linux
def test_library_import_gets_a_fast_blas():
    """`import lavit_mlx` from plain Python (no CLI, no re-exec) sends MLX's matmuls to an
    OpenBLAS: counted by the shim, not timed (a loaded machine makes timings meaningless)."""
    out = _python("import lavit_mlx, mlx.core as mx; from lavit_mlx.cpu import runtime as r; "
                  "before = r.sgemm_calls(); mx.eval(mx.ones((64, 64)) @ mx.ones((64, 64))); "
                  "print(r.STATE.library, '|', before, r.sgemm_calls())")
    library, counts = out.rsplit("|", 1)
    before, after = map(int, counts.split())
    assert "OpenBLAS" in library and after == before + 1


@linux
def test_pip_openblas_chooses_a_kernel_for_this_cpu():
    if runtime._scipy_openblas() is None:
        pytest.skip("scipy-openblas32 is not installed")
    assert runtime.STATE.path == runtime._scipy_openblas()
    assert runtime.STATE.core and runtime.STATE.core.lower() not in runtime._FALLBACK_CORES


@linux
def test_opting_out_and_importing_mlx_first_are_reported():
    out = _python("import lavit_mlx; from lavit_mlx.cpu import runtime as r; print(r.STATE.library)",
                  env={"LAVIT_BLAS": "reference"})
    assert out.startswith("reference")
    out = _python("import mlx.core; import lavit_mlx; from lavit_mlx.cpu import runtime as r; print(r.STATE.warnings)")
    assert "imported before lavit_mlx" in out


@linux
def test_blas_named_by_environment_variable(tmp_path):
    library = runtime._scipy_openblas()
    if library is None:
        pytest.skip("scipy-openblas32 is not installed")
    moved = tmp_path / "libmyblas.so"
    moved.symlink_to(library)
    out = _python("import lavit_mlx; from lavit_mlx.cpu import runtime as r; print(r.STATE.library, r.STATE.path)",
                  env={"LAVIT_BLAS": str(moved)})
    assert "LAVIT_BLAS" in out and str(moved) in out
    out = _python("import lavit_mlx; from lavit_mlx.cpu import runtime as r; print(r.STATE.warnings)",
                  env={"LAVIT_BLAS": str(tmp_path / "missing.so")})
    assert "could not load" in out


@linux
def test_shim_build_failure_is_a_clear_message(tmp_path):
    out = _python("import lavit_mlx; from lavit_mlx.cpu import runtime as r; print(r.STATE.library, r.STATE.warnings)",
                  env={"XDG_CACHE_HOME": str(tmp_path), "CC": "/nonexistent", "PATH": str(tmp_path)})
    # no compiler at all: the pip OpenBLAS cannot be used (prefixed symbols) and the message says why
    assert "no C compiler" in out


@linux
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 9])
@pytest.mark.parametrize("inner,outer", [(256, 300), (512, 1031), (257, 256)])
def test_matmul_products_are_exact(rows, inner, outer):
    """x @ W.T for skinny x (the shim's own kernel) and just past it (OpenBLAS's)."""
    rng = np.random.default_rng(rows * inner + outer)
    x = rng.standard_normal((rows, inner)).astype(np.float32)
    w = rng.standard_normal((outer, inner)).astype(np.float32)
    c = rng.standard_normal((rows, outer)).astype(np.float32)
    expected = x.astype(np.float64) @ w.T.astype(np.float64)
    ours = np.array(mx.array(x) @ mx.array(w).T)
    assert np.abs(ours - expected).max() <= 1e-5 * np.abs(expected).max()
    # addmm: alpha * x @ W.T + beta * c (nn.Linear with a bias)
    ours = np.array(mx.addmm(mx.array(c), mx.array(x), mx.array(w).T, alpha=0.5, beta=2.0))
    np.testing.assert_allclose(ours, 0.5 * expected + 2.0 * c, rtol=0, atol=1e-5 * np.abs(expected).max())
    # a strided (non-contiguous) left operand
    wide = rng.standard_normal((rows, 2 * inner)).astype(np.float32)
    ours = np.array(mx.array(wide)[:, ::2] @ mx.array(w).T)
    expected = wide[:, ::2].astype(np.float64) @ w.T.astype(np.float64)
    assert np.abs(ours - expected).max() <= 1e-5 * np.abs(expected).max()


@linux
def test_double_and_complex_products_reach_the_fast_blas():
    rng = np.random.default_rng(3)
    a = rng.standard_normal((64, 48))
    b = rng.standard_normal((48, 32))
    with mx.stream(mx.cpu):
        ours = np.array(mx.array(a, dtype=mx.float64) @ mx.array(b, dtype=mx.float64))
    np.testing.assert_allclose(ours, a @ b, rtol=1e-12, atol=1e-12)


@linux
def test_skinny_kernel_is_active_when_built():
    if runtime.STATE.path is None:
        pytest.skip("no fast BLAS on this machine")
    if os.environ.get(runtime.SKINNY_OPT_OUT_ENV):
        pytest.skip("opted out")
    assert runtime.STATE.skinny_kernel
    assert any("liblavit_blas" in line for line in Path("/proc/self/maps").read_text().splitlines())


def test_releasing_free_memory_gives_the_heap_back():
    """With the tuned malloc a freed 256 MB buffer stays in the process (for reuse during
    work); `release_free_memory`, which the server calls when it goes idle, returns it."""
    script = (
        "import lavit_mlx, ctypes, numpy as np\n"
        "from pathlib import Path\n"
        "from lavit_mlx.cpu import runtime\n"
        "def rss(): return next(int(l.split()[1]) for l in Path('/proc/self/status').read_text().splitlines()"
        " if l.startswith('VmRSS')) // 1024\n"
        "assert runtime.tune_malloc()\n"
        "base = rss(); block = np.ones(64 * 2**20, np.float32); block += 1; del block\n"
        "kept = rss(); assert runtime.release_free_memory() is True; print(base, kept, rss())\n")
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc's malloc_trim: Linux only")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    base, kept, released = map(int, out.stdout.split())
    assert kept - base > 200, f"the freed buffer did not stay in the heap: {base} -> {kept} MiB"
    assert kept - released > 200, f"release_free_memory gave nothing back: {kept} -> {released} MiB"
