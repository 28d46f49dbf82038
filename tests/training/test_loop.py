"""The shared training loop: loss falls, checkpoints resume bit-identically after SIGKILL,
the log is rewritten consistently, and 2-process data parallel matches one process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).with_name("loop_stage.py")


def run_script(out, steps, kill_at=None, batch=8, launcher=(), env=None):
    cmd = [*launcher, sys.executable, str(SCRIPT), str(out), str(steps), "-" if kill_at is None else str(kill_at),
           str(batch)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})


def result(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_loss_falls_and_the_run_folder_is_complete(tmp_path):
    sys.path.insert(0, str(SCRIPT.parent))
    from loop_stage import run

    last, _, _ = run(tmp_path / "run", 30)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log[0]["loss"] > 5 * last["loss"]
    assert [r["step"] for r in log] == list(range(1, 31))
    assert {"loss", "mse", "grad_norm", "learning_rate", "samples_per_s", "eta_s"} <= set(log[-1])
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert checkpoints == ["step-00000025", "step-00000030"]  # the last 2 kept
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["steps"] == 30


@pytest.mark.parametrize("streams", ["1", "2"])
def test_sigkill_then_resume_is_bit_identical(tmp_path, streams):
    env = {"LOOP_STREAMS": streams}  # whole batches, or two parts on two streams (train.streams)
    straight = result(run_script(tmp_path / "a", 20, env=env))
    killed = run_script(tmp_path / "b", 20, kill_at=13, env=env)  # killed while fetching step 14's batch
    assert killed.returncode == -9
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["step-00000005", "step-00000010"]
    resumed = result(run_script(tmp_path / "b", 20, env=env))
    assert resumed["weights"] == straight["weights"] and resumed["ema"] == straight["ema"]
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 21))  # the steps after the checkpoint are logged once


def test_a_checkpoint_killed_while_written_is_ignored(tmp_path):
    result(run_script(tmp_path / "a", 10))
    partial = tmp_path / "a" / "checkpoints" / ".partial-step-00000015-1"
    partial.mkdir()
    (partial / "state.json").write_text("{")
    again = result(run_script(tmp_path / "a", 20))
    assert not partial.exists() and again["last"]["step"] == 20


@pytest.mark.skipif(shutil.which("mlx.launch") is None and not (Path(sys.executable).parent / "mlx.launch").exists(),
                    reason="mlx.launch not installed")
def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    quiet = {"LOOP_NOISE": "0"}
    single = result(run_script(tmp_path / "one", 12, batch=8, env=quiet))
    launcher = [str(Path(sys.executable).parent / "mlx.launch"), "-n", "2", "--backend", "ring", "--"]
    double = run_script(tmp_path / "two", 12, batch=4, launcher=launcher, env=quiet)
    both = result(double)
    one = [json.loads(line)["loss"] for line in (tmp_path / "one" / "log.jsonl").read_text().splitlines()]
    two = [json.loads(line)["loss"] for line in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    assert len(two) == 12
    assert max(abs(a - b) / a for a, b in zip(one, two)) < 1e-4  # float32 sums in another order
    assert (tmp_path / "two" / "checkpoints").is_dir()
    assert both["weights"].keys() == single["weights"].keys()


def test_parallel_parts_match_one_part(tmp_path, monkeypatch):
    """train.streams: a batch in 2 parts on 2 streams trains as the whole batch (a mean loss),
    with a one-threaded BLAS while it runs and the count restored afterwards."""
    sys.path.insert(0, str(SCRIPT.parent))
    monkeypatch.setenv("LOOP_NOISE", "0")
    import loop_stage
    from lavit_mlx.cpu import runtime

    monkeypatch.setattr(loop_stage, "NOISE", 0.0)
    before = runtime.set_blas_threads(3)
    try:
        _, one, _ = loop_stage.run(tmp_path / "one", 12, streams=1)
        _, two, _ = loop_stage.run(tmp_path / "two", 12, streams=2)
        if before is not None:
            assert runtime.set_blas_threads(3) == 3  # restored after the 2-part run
    finally:
        if before is not None:
            runtime.set_blas_threads(before)
    losses = [[json.loads(line)["loss"] for line in (tmp_path / name / "log.jsonl").read_text().splitlines()]
              for name in ("one", "two")]
    assert max(abs(a - b) / a for a, b in zip(*losses)) < 1e-4
    for key in one:
        a, b = np.array(one[key]), np.array(two[key])
        assert np.max(np.abs(a - b)) <= 1e-4 * max(1.0, np.max(np.abs(a))), key


def test_streams_resolve_and_split():
    import mlx.core as mx

    from lavit_mlx.training.loop import resolve_streams, split_batch

    assert resolve_streams(1, 8) == 1 and resolve_streams(2, 8) == 2 and resolve_streams(3, 8) == 2
    assert resolve_streams(4, 6) == 3 and resolve_streams(5, 2) == 2 and resolve_streams(2, 1) == 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if mx.default_device() == mx.cpu:
        assert resolve_streams(0, 64) == resolve_streams(cores, 64) >= 1
    else:
        assert resolve_streams(0, 64) == 1
    batch = {"x": mx.arange(12).reshape(6, 2), "w": mx.ones((3,)), "s": mx.array(2.0)}
    parts = split_batch(batch, 3)
    assert [p["x"][:, 0].tolist() for p in parts] == [[0, 2], [4, 6], [8, 10]]
    assert all(p["w"].shape == (3,) and p["s"].item() == 2.0 for p in parts)  # not per-sample: shared
