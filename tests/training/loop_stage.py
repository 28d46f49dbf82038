"""A small stage that exercises every part of the loop: gradients, the random state (noise
in the loss), stage state (an EMA updated inside the compiled step), a data cursor.

Run as a script it trains and prints the final weights' checksum:
    python loop_stage.py OUT STEPS [KILL_AT_STEP]
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import lavit_mlx  # noqa: E402,F401
from lavit_mlx.training.config import RunConfig, TrainSection  # noqa: E402
from lavit_mlx.training.loop import Stage, World, train  # noqa: E402

NOISE = float(os.environ.get("LOOP_NOISE", "0.01"))
TRUE_W = np.linspace(-1, 1, 8 * 4).reshape(4, 8).astype(np.float32)


class Regression(Stage):
    name = "regression"

    def __init__(self, config, world, kill_at=None):
        super().__init__(config, world)
        self.model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        self.index = 0  # the data cursor: batches handed out so far (global batch)
        self.kill_at = kill_at
        self.state = {"ema": mx.zeros((4, 16))}

    def loss(self, model, batch):
        # draws from the captured random state (off for the data-parallel comparison, where
        # each rank draws its own noise)
        noise = NOISE * mx.random.normal(batch["y"].shape)
        pred = model(batch["x"])
        loss = mx.mean((pred - batch["y"] - noise) ** 2)
        return loss, {"mse": loss}

    def update(self, model, metrics):
        self.state["ema"] = 0.9 * self.state["ema"] + 0.1 * model.layers[2].weight

    def batches(self):
        size = self.config.train.batch_size
        while True:
            if self.kill_at is not None and self.index == self.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            rng = np.random.default_rng(self.index)  # batch i is a function of i alone
            x = rng.standard_normal((size * self.world.size, 8)).astype(np.float32)
            y = x @ TRUE_W.T
            part = slice(self.world.rank * size, (self.world.rank + 1) * size)
            self.index += 1
            yield {"x": mx.array(x[part]), "y": mx.array(y[part])}

    def data_state(self):
        return {"index": self.index}

    def load_data_state(self, state):
        self.index = state.get("index", 0)

    def saved_parameters(self):
        from mlx.utils import tree_flatten

        return dict(tree_flatten(self.model.parameters()))


def run(out, steps, kill_at=None, batch_size=8, accumulation=1, save_every=5, streams=None):
    streams = int(os.environ.get("LOOP_STREAMS", "1")) if streams is None else streams
    config = RunConfig(stage="tokenizer", out=str(out),
                       train=TrainSection(steps=steps, batch_size=batch_size, grad_accumulation=accumulation,
                                          learning_rate=3e-2, warmup_steps=2, save_every=save_every, log_every=1,
                                          keep_checkpoints=2, streams=streams))
    world = World.init()
    stage = Regression(config, world, kill_at)
    last = train(stage, config)
    from mlx.utils import tree_flatten

    weights = {k: np.array(v).tolist() for k, v in tree_flatten(stage.model.parameters())}
    return last, weights, np.array(stage.state["ema"]).tolist()


if __name__ == "__main__":
    out, steps = sys.argv[1], int(sys.argv[2])
    kill_at = int(sys.argv[3]) if len(sys.argv) > 3 and sys.argv[3] != "-" else None
    batch = int(sys.argv[4]) if len(sys.argv) > 4 else 8
    last, weights, ema = run(out, steps, kill_at, batch_size=batch)
    if World.init().rank == 0:
        print(json.dumps({"last": last, "weights": weights, "ema": ema}))
