"""The bundled model from a cold start of the CLI: `lavit caption` of one image and
`lavit generate` of one image, as a user runs them (a new process each time: Python
start-up, imports, the fast BLAS's set-up, model load, the work, the PNG written).

    python benchmarks/bundled.py [--repeats 5] [--model DIR] [--quick]

Targets on the 2-core development machine: caption <= 3 s, generate <= 15 s. The worker
process describes MLX's BLAS (header) and times the commands as subprocesses; the median
and the slowest of `--repeats` runs are reported, with each command's peak RSS.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import common

QUICK = dict(repeats=1)
PROMPT = "a red circle at the top left and a blue square in the center"
TARGETS = {"caption": 3.0, "generate": 15.0}


def commands(model, folder: Path) -> dict:
    cli = [sys.executable, "-m", "lavit_cli.cli"]
    chosen = ["--model", str(model)] if model else []
    picture = folder / "shapes.png"
    return {
        "generate": [*cli, "generate", *chosen, "--prompt", PROMPT, "--out", str(picture), "--force", "--seed", "1"],
        "caption": [*cli, "caption", *chosen, str(picture)],
    }


def work(args) -> dict:
    folder = Path(args.out)
    runs = {name: [] for name in ("generate", "caption")}
    for _ in range(args.repeats):
        for name, cmd in commands(args.model, folder).items():  # generate first: caption reads its picture
            measured = common.run_measured(cmd)
            if measured.returncode:
                raise SystemExit(f"{name} failed (exit code {measured.returncode})")
            runs[name].append((measured.seconds, measured.peak_rss))
    return {name: {"seconds": [s for s, _ in values], "peak_rss": max(r for _, r in values)}
            for name, values in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_arguments(parser)
    parser.add_argument("--repeats", type=int, default=5, help="cold runs of each command")
    parser.add_argument("--model", default=None, help="a model folder (default: the bundled model)")
    args = common.parse(parser, QUICK)
    if args.worker:
        common.serve(args, work)
        return
    with tempfile.TemporaryDirectory() as folder:
        runs = common.run_rounds(__file__, [common.MLX], common.forward(args), Path(folder), args.rounds)
    common.print_header("the bundled model from a cold CLI start", runs)
    result = runs["mlx"][0].result
    rows = []
    for name in ("caption", "generate"):
        seconds = sorted(s for run in runs["mlx"] for s in run.result[name]["seconds"])
        median = statistics.median(seconds)
        verdict = "met" if median <= TARGETS[name] else "MISSED"
        rows.append([f"lavit {name} (one image)", f"{median:.2f}", f"{seconds[-1]:.2f}",
                     f"{result[name]['peak_rss'] / common.GIB:.2f}", f"<= {TARGETS[name]:.0f} s: {verdict}"])
    common.print_table(["command", "median s", "slowest s", "peak RSS GiB", "target"], rows)


if __name__ == "__main__":
    main()
