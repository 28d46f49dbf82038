"""Training throughput of the PyTorch trainers (`lavit_train`) per stage, 1 vs 2 processes.

    python benchmarks/train_torch.py [--stages tokenizer,llm,pixel] [--steps 12] [--width 64] [--quick]

The parent writes small starting points once (`lavit_train.tiny.write_training_fixture`),
then runs one worker per (stage, process count), each its own process (`common.py`): the
2-process worker starts two ranks (gloo, DDP) itself. Every rank has the same micro-batch,
so 2 processes train twice the samples per step. Each rank runs one thread: on a shared,
oversubscribed machine two OpenMP threads in one process ran this loop 15x slower than one
(their barriers spin against other jobs), which would measure the machine's load, not the
scaling. Samples/s is the median over the logged steps after the warm-up
ones (the loop's own `samples_per_s`); scaling efficiency = 2-process samples/s / (2 x
1-process samples/s). On a CPU this measures the loop, the data path and gloo's all-reduce,
not a GPU cluster. The header describes the workers; a 2-process worker's peak RSS is its
own (the ranks are its children).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import common

QUICK = dict(steps=4, width=32, image_size=28, patch=7, batch_size=2, stages="tokenizer,llm,pixel")
WARMUP = 2


def stage_config(stage: str, fixture: dict, args, out: Path) -> dict:
    data = {"train": str(fixture["data"]), "image_size": args.image_size, "shuffle_buffer": 16,
            "lines_per_shard": 8}
    train = {"steps": args.steps, "batch_size": args.batch_size, "learning_rate": 1e-3, "warmup_steps": 1,
             "log_every": 1, "save_every": 0}
    init = str(fixture["release"])
    model = {
        "tokenizer": {"init": init, **fixture["model"]},
        "llm": {"init": init, "text_tokenizer": str(fixture["text"]), "max_length": 128, "vision_heads": 4,
                "llm": {"hidden_size": 2 * args.width, "intermediate_size": 4 * args.width,
                        "num_hidden_layers": 2, "num_attention_heads": 4}},
        "pixel": {"init": init, "vae": str(fixture["pixel"]), "unet": fixture["unet"]},
    }[stage]
    if stage == "pixel":
        data = {**data, "image_size": 32}  # the VAE's pictures (EVA reads its own size)
    return {"stage": stage, "out": str(out), "model": model, "data": data, "train": train,
            **({"loss": {"init_batches": 1}} if stage == "tokenizer" else {})}


def rank_main(rank: int, procs: int, config_path: str, port: int) -> None:
    """One rank of a worker's run (also the only rank of a 1-process worker)."""
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(procs), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    import torch

    torch.set_num_threads(1)  # see the module docstring
    from lavit_train.loop import Launch, run

    run(None, config_path, [], Launch(tensorboard=False, resume=False, vision_heads=4), "cpu")


def work(args) -> dict:
    """One stage at one process count; samples/s from the run's log."""
    import torch.multiprocessing as mp

    stage, procs = args.worker.rsplit("-", 1)
    procs = int(procs)
    out = Path(args.out)
    config = json.loads(Path(args.fixture, f"{stage}.json").read_text())
    config["out"] = str(out / "run")
    config_path = out / "run.json"
    config_path.write_text(json.dumps(config))  # JSON is YAML
    port = 29600 + os.getpid() % 1000
    if procs == 1:
        rank_main(0, 1, str(config_path), port)
    else:
        mp.start_processes(rank_main, args=(procs, str(config_path), port), nprocs=procs, start_method="spawn")
    records = [json.loads(line) for line in (out / "run" / "log.jsonl").read_text().splitlines()]
    rates = [r["samples_per_s"] for r in records if "samples_per_s" in r and r["step"] > WARMUP]
    return {"samples_per_s": statistics.median(rates) if rates else 0.0, "procs": procs}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", default="tokenizer,llm,pixel")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=56)
    parser.add_argument("--patch", type=int, default=14)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--fixture", help=argparse.SUPPRESS)
    common.add_arguments(parser)
    args = common.parse(parser, QUICK)
    if args.worker:
        return common.serve(args, work)
    stages = args.stages.split(",")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from lavit_train.tiny import write_training_fixture

    with tempfile.TemporaryDirectory() as tmp:
        fixture = write_training_fixture(Path(tmp) / "fixture", width=args.width, image_size=args.image_size,
                                         patch=args.patch)
        for stage in stages:
            config = stage_config(stage, fixture, args, Path(tmp) / "unused")
            (Path(tmp) / "fixture" / f"{stage}.json").write_text(json.dumps(config))
        args.fixture = str(Path(tmp) / "fixture")
        workers = [common.Worker(f"{stage}-{procs}", ("torch",)) for stage in stages for procs in (1, 2)]
        runs = common.run_rounds(__file__, workers, common.forward(args), Path(tmp), args.rounds)

    common.print_header(f"PyTorch training throughput (lavit_train, DDP over gloo on the CPU): EVA width "
                        f"{args.width}, {args.image_size}px images, micro-batch {args.batch_size} per rank, "
                        f"{args.steps} steps (median after {WARMUP})", runs)
    rows = []
    for stage in stages:
        one = common.best(runs[f"{stage}-1"], "samples_per_s")
        two = common.best(runs[f"{stage}-2"], "samples_per_s")
        rows.append([stage, f"{one:.2f}", f"{two:.2f}", f"{two / (2 * one):.0%}" if one else "-"])
    common.print_table(["stage", "1 process samples/s", "2 processes samples/s", "scaling efficiency"], rows)


if __name__ == "__main__":
    main()
