"""Running the test driver alone or under torchrun (gloo, CPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

DRIVER = Path(__file__).resolve().parent / "driver.py"


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def run_driver(config: Path, out: Path, *args, procs: int = 1, timeout: int = 240) -> subprocess.CompletedProcess:
    """The driver under torchrun (`procs` > 1, gloo) or as one process; its output is returned."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    if procs > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs),
                    "--master-port", str(29500 + os.getpid() % 1000), "--max-restarts", "0"]
    else:
        launcher = [sys.executable]
    result = subprocess.run([*launcher, str(DRIVER), str(config), str(out), *args], env=env, capture_output=True,
                            text=True, timeout=timeout)
    return result


def checked(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr[-4000:]
    return result
