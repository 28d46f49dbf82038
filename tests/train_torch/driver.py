"""Runs one PyTorch training stage for the tests, alone or under torchrun, and leaves evidence:

    python driver.py CONFIG.yaml OUT [--set k=v ...] [--strategy ddp|fsdp] [--workers N]
                     [--kill-at N] [--global-batches] [--record]

--kill-at N     SIGKILL this process when the loop asks for its (N+1)-th batch
--global-batches  every step's global batch is the same whatever the world size: the
                first `batch_size x world` manifest lines from a step-dependent offset, each
                rank taking its rows (for DDP/FSDP2 against one process)
--record        append the consumed samples' (uid, epoch) to OUT/samples-RANK.jsonl
--async-save    checkpoints written in the background

At the end rank 0 writes OUT/final.pt: the trainable parameters and the saved buffers.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from lavit_train.distributed import World  # noqa: E402
from lavit_train.loop import Launch, full_state, train  # noqa: E402
from lavit_train.sections import load_run_config  # noqa: E402
from lavit_train.stages import build_stage  # noqa: E402


def global_batches(stage, world, lines: list, image_size: int):
    """Batches whose concatenation over ranks is the same for every world size."""
    from PIL import Image

    from lavit_mlx.image_processing import preprocess

    folder = Path(stage.config.data.train).parent
    size = stage.config.train.batch_size
    step = 0
    while True:
        rows = [lines[(step * size * world.size + i) % len(lines)] for i in range(size * world.size)]
        mine = rows[world.rank_slice(size)]
        images = [Image.open(folder / line["image"]).convert("RGB") for line in mine]
        batch = {"pixels": torch.from_numpy(preprocess(images, image_size)),
                 "num_objects": torch.tensor([line.get("num_objects", 0) for line in mine])}
        step += 1
        yield batch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("out")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--strategy", default="ddp", help="ddp, fsdp, or both in turn (ddp,fsdp: OUT/ddp, OUT/fsdp)")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--kill-at", type=int)
    parser.add_argument("--global-batches", action="store_true")
    parser.add_argument("--record", action="store_true")
    parser.add_argument("--vision-heads", type=int)
    parser.add_argument("--async-save", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    world = World.init("cpu")
    strategies = args.strategy.split(",")
    for strategy in strategies:
        out = Path(args.out) / strategy if len(strategies) > 1 else Path(args.out)
        run(args, world, strategy, out)
    world.close()


def run(args, world: World, strategy: str, out: Path) -> None:
    config = load_run_config(None, args.config, [*args.overrides, f"out={out}"])
    launch = Launch(strategy=strategy, workers=args.workers, tensorboard=False, vision_heads=args.vision_heads,
                    async_save=args.async_save)
    stage = build_stage(config, world, launch)
    if args.record:
        transform = stage.data.transform

        def tagged(sample, stream):
            example = transform(sample, stream)
            if example is not None:
                example["uid"] = np.int64(sample.meta["uid"])
                example["epoch"] = np.int64(stream.epoch)
            return example

        stage.data.transform = tagged
    if args.global_batches:
        lines = [json.loads(line) for line in Path(config.data.train).read_text().splitlines()]
        source = global_batches(stage, world, lines, config.data.image_size)
    else:
        source = None
    plain = stage.batches

    def batches():
        iterator = source if source is not None else plain()
        count = 0
        while True:
            if args.kill_at is not None and count == args.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            batch = next(iterator)
            count += 1
            if args.record:
                out.mkdir(parents=True, exist_ok=True)
                with open(out / f"samples-{world.rank}.jsonl", "a") as handle:
                    for uid, epoch in zip(batch.pop("uid").tolist(), batch.pop("epoch").tolist()):
                        handle.write(json.dumps([uid, epoch]) + "\n")
            yield batch

    stage.batches = batches
    train(stage, config)
    state = full_state(stage.module)
    if world.main:
        torch.save({k: v.clone() for k, v in state.items() if stage.saved_keys(k)}, out / "final.pt")
    world.barrier()


if __name__ == "__main__":
    main()
