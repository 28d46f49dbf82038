"""The Linux runtime: OpenBLAS preloading and the skinny-GEMM interposer."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from lavit_mlx.runtime import loaded_blas

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux runtime only")


@linux
def test_pytest_runs_with_openblas():
    from lavit_mlx.runtime import find_openblas

    if find_openblas() is None:
        pytest.skip("no OpenBLAS on this machine")
    assert loaded_blas() == "openblas"


@linux
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 9])
@pytest.mark.parametrize("inner,outer", [(256, 300), (512, 1031), (257, 256)])
def test_matmul_products_are_exact(rows, inner, outer):
    """x @ W.T for skinny x (the interposer's case) and just past it (OpenBLAS's)."""
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
def test_interposer_is_preloaded_when_it_can_be_built():
    import shutil

    from lavit_mlx.runtime import find_openblas, skinny_sgemm_library

    if find_openblas() is None or (shutil.which("cc") is None and shutil.which("gcc") is None):
        pytest.skip("needs OpenBLAS and a C compiler")
    library = skinny_sgemm_library()
    assert library is not None and Path(library).is_file()
    if os.environ.get("LAVIT_NO_SKINNY_SGEMM"):
        pytest.skip("opted out")
    assert "libskinny_sgemm" in Path("/proc/self/maps").read_text()
