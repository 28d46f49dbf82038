"""The four benchmarks run end to end at their --quick sizes and print the shared header
(machine, versions, both frameworks' BLAS measured in the workers, the allocator) and a table.

The four run at once (each is mostly process start-up and imports), so they stay well
under 90 s on two cores; their numbers are not checked, only what they print. Each
framework gets one thread: on a loaded machine OpenMP's waiting threads can make a tiny
step 50x slower. The training benchmark (`train.py`: eight workers, one per stage and
framework plus LoRA and QLoRA) runs on its own afterwards, about a minute and a half.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ("tokenizer", "llm", "pixel", "convert")
TIMEOUT = 120
TRAIN_TIMEOUT = 420
TABLE_RULE = re.compile(r"^\|(:?-{3,}:?\|)+$")
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory):
    """{benchmark: (returncode, stdout, stderr)} of `python benchmarks/NAME.py --quick`."""
    logs = tmp_path_factory.mktemp("benchmarks")
    started = {}
    for name in BENCHMARKS:
        out, err = (logs / f"{name}.out").open("w"), (logs / f"{name}.err").open("w")
        proc = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), "--quick"],
                                cwd=ROOT, stdout=out, stderr=err, env={**os.environ, **ONE_THREAD})
        started[name] = (proc, out, err)
    done = {}
    for name, (proc, out, err) in started.items():
        try:
            code = proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = f"timed out after {TIMEOUT} s"
        out.close()
        err.close()
        done[name] = (code, (logs / f"{name}.out").read_text(), (logs / f"{name}.err").read_text())
    return done


@pytest.mark.slow
@pytest.mark.parametrize("name", BENCHMARKS)
def test_quick_run_prints_header_then_table(quick_runs, name):
    code, stdout, stderr = quick_runs[name]
    assert code == 0, f"{name}.py --quick failed ({code}):\n{stderr[-3000:]}"
    lines = check_header_then_table(stdout)
    first_row = lines[[i for i, line in enumerate(lines) if TABLE_RULE.match(line)][0] + 1]
    assert first_row.startswith("| ") and re.search(r"\d", first_row), first_row


def check_header_then_table(stdout: str) -> list:
    """The shared header (machine, software, each worker's BLAS, the allocator, the workers), then
    a table; returns the lines."""
    lines = stdout.splitlines()
    assert lines[0].startswith("# "), f"the header does not come first:\n{stdout}"
    assert lines[1].startswith("machine: ") and "logical CPUs" in lines[1]
    assert lines[2].startswith("software: Python ") and " mlx " in lines[2] and " torch " in lines[2]
    for framework in ("MLX", "PyTorch"):
        blas = [line for line in lines if line.startswith(f"{framework} BLAS (")]
        assert blas, f"no {framework} BLAS line measured in a worker:\n{stdout}"
        assert all(re.search(r"kernel \S+.*; float32 1024\^2 matmul \d+ GFLOP/s", line) for line in blas), blas
    allocator = next(line for line in lines if line.startswith("allocator: "))
    assert "mallopt in every worker" in allocator and " NO" not in allocator, allocator
    assert any(line.startswith("workers: each in its own process") for line in lines)
    assert any(TABLE_RULE.match(line) for line in lines), f"no table:\n{stdout}"
    return lines


@pytest.mark.slow
def test_train_quick_run_prints_the_stage_and_lora_tables():
    """`train.py --quick`: per stage, MLX and PyTorch steps/s and samples/s and their ratio; LoRA
    and QLoRA tokens/s and peak memory, their ratio; both targets' verdicts."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import cpu_profile

    profile = [] if cpu_profile.unavailable() else ["--profile"]  # where perf can sample, the profile too
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train.py"), "--quick", *profile], cwd=ROOT,
                          capture_output=True, text=True, timeout=TRAIN_TIMEOUT, env={**os.environ, **ONE_THREAD})
    assert done.returncode == 0, f"train.py --quick failed ({done.returncode}):\n{done.stderr[-3000:]}"
    lines = check_header_then_table(done.stdout)
    assert "1 thread each" in lines[0], lines[0]  # the workers' threads follow OMP_NUM_THREADS
    for stage in ("tokenizer", "llm", "pixel"):
        row = next((line for line in lines if line.startswith(f"| {stage} |")), None)
        assert row, f"no {stage} row:\n{done.stdout}"
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert all(float(cell) > 0 for cell in cells[1:5]), row  # steps/s and samples/s of both
        assert re.fullmatch(r"\d+\.\d\dx", cells[5]), row
    for label in ("LoRA", "QLoRA, 4-bit base (group 64)"):
        row = next((line for line in lines if line.startswith(f"| {label} |")), None)
        assert row and float(row.split("|")[2]) > 0, f"no {label} row with tokens/s:\n{done.stdout}"
        assert re.search(r"\| \d+\.\d+ (MiB|GiB) \|", row), row  # the peak memory
    ratio = next(line for line in lines if line.startswith("| QLoRA / LoRA |"))
    assert re.search(r"\| \d+% \|", ratio), ratio
    assert re.search(r"^target: MLX >= 1\.0x PyTorch in every stage: (met|MISSED)", done.stdout, re.M)
    assert re.search(r"^target: QLoRA peak memory <= 40% of LoRA's: (met|MISSED) \(\d+%\)$", done.stdout, re.M)
    if profile:
        for stage in ("tokenizer", "llm", "pixel"):
            table = done.stdout.split(f"Where the time goes, {stage} stage")[1].split("top symbols")[0]
            rows = {line.split("|")[1].strip(): line.split("|")[2:4] for line in table.splitlines()
                    if line.startswith("| ") and not line.startswith("| kind")}
            assert float(rows["all CPU time"][0]) > 0 and float(rows["all CPU time"][1]) > 0, table
            assert len(set(rows) & set(cpu_profile.KINDS)) >= 3, table  # kinds of work were told apart
            kinds = sum(float(cells[0]) for name, cells in rows.items() if name in cpu_profile.KINDS)
            assert abs(kinds - float(rows["all CPU time"][0])) <= 0.2 + 0.01 * kinds, table


def test_profile_kinds_of_work():
    """The symbols perf reports, sorted into the kinds the profile table prints."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from cpu_profile import kind_of

    assert kind_of("libscipy_openblas.so", "sgemm_kernel_SKYLAKEX") == "gemm"
    assert kind_of("libscipy_openblas.so", "blas_thread_server") == "threads waiting"
    assert kind_of("libgomp.so.1", "0x000000000001de62") == "threads waiting"
    assert kind_of("libtorch_cpu.so", "mkl_blas_avx512_sgemm_kernel_0") == "gemm"
    assert kind_of("libCf4IErfADf4IBroadcastBEf4OAddCD_VC_f4_10159970873491820195_contiguous.so",
                   "Cf4IErfADf4IBroadcastBEf4OAddCD_VC_f4_10159970873491820195_contiguous") == "elementwise (compiled)"
    assert kind_of("libmlx.so", "mlx::core::(anonymous namespace)::copy_general_general<float, float>") == "copies"
    assert kind_of("libmlx.so", "mlx::core::reduction_op<float, float, mlx::core::SumReduce>") == "reductions"
    assert kind_of("libmlx.so", "mlx::core::binary_op<float, float, mlx::core::detail::Multiply>") == \
        "elementwise and other ops"
    assert kind_of("libm.so.6", "__expm1f") == "scalar math"
    assert kind_of("libc.so.6", "_int_malloc") == "memory"
    assert kind_of("libpython3.11.so.1.0", "_PyEval_EvalFrameDefault") == "Python"


def test_profile_without_perf_is_a_one_line_error(monkeypatch):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import cpu_profile

    monkeypatch.setattr(cpu_profile.shutil, "which", lambda name: None)
    assert cpu_profile.unavailable().startswith("--profile needs Linux perf")


@pytest.mark.slow
def test_llm_bound_is_from_read_bandwidth(quick_runs):
    stdout = quick_runs["llm"][1]
    assert "copy bandwidth" not in stdout
    assert re.search(r"^read bandwidth \d+\.\d+ GB/s", stdout, re.M), stdout
    assert re.search(r"^\| decode bound: read bandwidth / weight bytes per token \(tokens/s\) \| \d", stdout, re.M)


@pytest.mark.slow
def test_pixel_reused_context_row_is_timed_on_both_sides(quick_runs):
    stdout = quick_runs["pixel"][1]
    row = next(line for line in stdout.splitlines() if line.startswith("| UNet step, context K/V projected once"))
    mlx_s, diffusers_s = row.split("|")[2:4]
    assert float(mlx_s) > 0 and float(diffusers_s) > 0, row


def test_quick_sizes_yield_to_given_options_and_reach_the_workers():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import common

    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    common.add_arguments(parser, rounds=2)
    quick = dict(repeats=1, rounds=1, batch_sizes=[1, 2])
    args = common.parse(parser, quick, ["--quick", "--rounds", "2", "--batch-sizes=4"])
    assert (args.repeats, args.rounds, args.batch_sizes) == (1, 2, [4])  # a given option wins, even at its default
    assert common.parse(parser, quick, ["--repeats", "5"]).batch_sizes == [1, 8]  # no --quick: defaults
    assert common.forward(args) == ["--repeats=1", "--batch-sizes", "4"]  # the workers get the resolved sizes
    assert parser.parse_args(common.forward(args)).batch_sizes == [4]
