"""`benchmarks/serve.py --quick` runs end to end and prints the shared header and its two tables
(numbers are not checked: at --quick sizes they mean nothing)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
TABLE_RULE = re.compile(r"^\|(:?-{3,}:?\|)+$")


@pytest.mark.slow
def test_quick_run_prints_header_then_tables(official_tiny):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serve.py"), "--quick"], cwd=ROOT,
                          capture_output=True, text=True, timeout=240,
                          env={**os.environ, **ONE_THREAD, "LAVIT_FIXTURE": str(official_tiny)})
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("# lavit serve: captions") and lines[1].startswith("machine: ")
    assert any(re.match(r"MLX BLAS \(mlx worker\): .*; float32 1024\^2 matmul \d+ GFLOP/s", line) for line in lines)
    rules = [i for i, line in enumerate(lines) if TABLE_RULE.match(line)]
    assert len(rules) == 2, done.stdout
    captions = lines[rules[0] - 1]
    assert "batched captions/s" in captions and "one at a time captions/s" in captions and "p95" in captions
    rows = [lines[rules[0] + 1], lines[rules[0] + 2]]
    assert [row.split("|")[1].strip() for row in rows] == ["1", "4"]  # the --quick client counts
    assert re.search(r"\| 16x16, 1 steps, 1 image \| \d+\.\d+ \| \d+\.\d+ \|", lines[rules[1] + 1])
