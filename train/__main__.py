"""`python -m lavit_train STAGE --config run.yaml` (under `torchrun` for several processes).

    torchrun --nproc-per-node 8 -m lavit_train tokenizer --config run.yaml --strategy fsdp

The YAML is the one the MLX trainer reads (`lavit train STAGE --config run.yaml`); the
flags here say how this machine runs it.
"""

from __future__ import annotations

import argparse
import sys

from lavit_mlx.errors import LaVITError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lavit_train", description=__doc__.splitlines()[0])
    parser.add_argument("stage", nargs="?", help="tokenizer | llm | pixel (default: the config's)")
    parser.add_argument("--config", help="the run's YAML file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value (train.steps=100); repeatable")
    parser.add_argument("--strategy", default="ddp", choices=("ddp", "fsdp"), help="data parallelism (default ddp)")
    parser.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available")
    parser.add_argument("--workers", type=int, default=0, help="data-loader processes per rank (default 0)")
    parser.add_argument("--async-save", action="store_true", help="write checkpoints in the background")
    parser.add_argument("--no-tensorboard", action="store_true")
    parser.add_argument("--vision-heads", type=int, help="head count of a released-layout init folder whose "
                        "vision parts are not the release's 1408 wide (an MLX folder records it)")
    parser.add_argument("--fresh", action="store_true", help="ignore existing checkpoints of the run")
    args = parser.parse_args(argv)
    from .loop import Launch, run

    launch = Launch(strategy=args.strategy, workers=args.workers, async_save=args.async_save,
                    tensorboard=not args.no_tensorboard, resume=not args.fresh,
                    vision_heads=args.vision_heads)
    try:
        run(args.stage, args.config, args.overrides, launch, args.device)
    except LaVITError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
