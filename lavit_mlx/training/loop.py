"""The training loop every MLX stage shares (mlx-lm `tuner/trainer.py` shape).

A `Stage` owns its model, its losses and its data; the loop differentiates only the
trainable parameters with `nn.value_and_grad`, in one compiled step whose captured state
is `[model.state, optimizer.state, mx.random.state, stage.state]` (the Gumbel and
diffusion noise draw from the random state, re-seeded from (seed, step) before every
step so that a resumed run draws the same; EMA statistics live in the stage state), with
gradient accumulation, global-norm clipping, `nn.average_gradients` across data-parallel
ranks (`mx.distributed`), AdamW with warmup and cosine decay, periodic evaluation, a JSONL
log of every metric, and atomic checkpoints that resume bit-identically.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map

from ..errors import LaVITError
from .checkpoints import CheckpointStore
from .config import RunConfig, TrainSection, config_json


@dataclass
class World:
    """This process' place among the data-parallel ranks."""

    rank: int = 0
    size: int = 1
    group: Optional[object] = None

    @classmethod
    def init(cls) -> "World":
        group = mx.distributed.init()
        return cls(group.rank(), group.size(), group)

    @property
    def main(self) -> bool:
        return self.rank == 0


class Stage:
    """What a training stage provides to the loop (see `stages/`).

    `loss(model, batch)` -> (scalar loss, {name: array}) is pure in arrays (it runs
    compiled and differentiated); metric values of size 1 are logged, larger ones are for
    `update`. `update(model, metrics)` runs inside the compiled step after the optimizer
    (non-gradient updates such as a norm-EMA codebook); `state` holds the arrays it keeps.
    """

    name = "stage"

    def __init__(self, config: RunConfig, world: World):
        mx.random.seed(config.train.seed)  # the same seed builds the same initial weights
        self.config = config
        self.world = world
        self.state: Dict[str, mx.array] = {}
        self.model: nn.Module = None

    def loss(self, model: nn.Module, batch: dict) -> Tuple[mx.array, Dict[str, mx.array]]:
        raise NotImplementedError

    def update(self, model: nn.Module, metrics: Dict[str, mx.array]) -> None:
        """Non-gradient updates inside the compiled step (default: none)."""

    def batches(self) -> Iterator[dict]:
        """Training batches of mx arrays, endless (the loop counts steps)."""
        raise NotImplementedError

    def data_state(self) -> dict:
        """This rank's data cursor (JSON-serialisable)."""
        return {}

    def load_data_state(self, state: dict) -> None:
        """Restore the cursor saved by `data_state` (merged over ranks when there were several)."""

    def merge_data_states(self, states: List[dict]) -> dict:
        return states[0] if states else {}

    def saved_parameters(self) -> Dict[str, mx.array]:
        """The parameters a checkpoint holds: the trainable ones and any the stage updates itself."""
        return dict(tree_flatten(self.model.trainable_parameters()))

    def evaluate(self) -> Dict[str, float]:
        """Metrics on held-out data (default: none)."""
        return {}

    def export(self, folder: Path) -> None:
        """Write the trained component(s) where the pipelines can load them (default: nothing)."""

    def samples_in(self, batch: dict) -> int:
        first = next(iter(batch.values()))
        return int(first.shape[0])

    def close(self) -> None:
        """Called once at the end (the data streams' skip counts are reported here)."""


def learning_rate_schedule(train: TrainSection):
    """Linear warmup to the peak, then cosine decay to `min_learning_rate` (mlx.optimizers)."""
    decay_steps = max(1, train.steps - train.warmup_steps)
    cosine = optim.cosine_decay(train.learning_rate, decay_steps, train.min_learning_rate)
    if train.warmup_steps == 0:
        return cosine
    warmup = optim.linear_schedule(train.learning_rate / max(1, train.warmup_steps), train.learning_rate,
                                   train.warmup_steps)
    return optim.join_schedules([warmup, cosine], [train.warmup_steps])


def make_optimizer(train: TrainSection) -> optim.Optimizer:
    return optim.AdamW(learning_rate=learning_rate_schedule(train), betas=[train.beta1, train.beta2],
                       weight_decay=train.weight_decay)


def clip_by_global_norm(grads, max_norm: float):
    if max_norm <= 0:
        return grads, mx.array(0.0)
    clipped, norm = optim.clip_grad_norm(grads, max_norm)
    return clipped, norm


class Logger:
    """Progress on stderr (a bar in a terminal, plain lines otherwise) and a JSONL log."""

    def __init__(self, path: Optional[Path], total: int, start_step: int, enabled: bool):
        self.path, self.total, self.enabled = path, total, enabled
        self.start_time = time.perf_counter()
        self.start_step = start_step
        self.interactive = enabled and sys.stderr.isatty()
        self.progress = None
        if self.interactive:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[info]}"), TimeRemainingColumn(), transient=False)
            self.progress.start()
            self.task = self.progress.add_task("training", total=total, completed=start_step, info="")

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        if self.path is not None:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(record) + "\n")
        text = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()
                        if k not in ("time",))
        if self.progress is not None:
            self.progress.update(self.task, completed=record.get("step", 0), info=text[:120])
        else:
            print(text, file=sys.stderr, flush=True)

    def eta(self, step: int) -> float:
        done = step - self.start_step
        elapsed = time.perf_counter() - self.start_time
        return elapsed / done * (self.total - step) if done > 0 else float("nan")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def _scalars(metrics: Dict[str, mx.array]) -> Dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if v.size == 1}


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines past `step` (written after the checkpoint a killed run resumes from)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in kept))


def _check_memory(limit_gb: float, step_seconds: float) -> None:
    peak = mx.get_peak_memory()
    if limit_gb and peak > limit_gb * 2**30:
        raise LaVITError(
            f"the first training step used {peak / 2**30:.1f} GiB, above train.max_memory_gb {limit_gb}: lower "
            "train.batch_size (and raise train.grad_accumulation) or turn on train.gradient_checkpointing")


def train(stage: Stage, config: RunConfig, resume: bool = True) -> Dict[str, float]:
    """Run (or resume) a stage's training to `config.train.steps`; returns the last metrics.

    Rank 0 writes the run folder: `config.json`, `log.jsonl`, `checkpoints/step-N/`, and the
    stage's export in `model/` at the end.
    """
    train_cfg = config.train
    world = stage.world
    out = Path(config.out)
    store = CheckpointStore(out / "checkpoints", keep=train_cfg.keep_checkpoints, writer=world.main)
    model = stage.model
    optimizer = make_optimizer(train_cfg)
    start_step = 0
    latest = store.latest() if resume else None
    if latest is not None:
        saved = store.load(latest)
        model.load_weights(list(saved.parameters.items()), strict=False)
        optimizer.state = saved.optimizer_state(optimizer)
        stage.state.update(saved.stage_state)
        stage.load_data_state(saved.data)
        start_step = saved.step
    if world.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(config_json(config))
        _truncate_log(out / "log.jsonl", start_step)
    mx.eval(model.parameters(), optimizer.state)

    loss_and_grad = nn.value_and_grad(model, stage.loss)
    state = [model.state, optimizer.state, mx.random.state, stage.state]
    accumulation = train_cfg.grad_accumulation
    parts = ParallelParts(train_cfg, model, stage, loss_and_grad)

    def step_fn(batch, previous, do_update, computed=None):
        (loss, metrics), grad = loss_and_grad(model, batch) if computed is None else computed
        if world.size > 1:
            grad = nn.average_gradients(grad, group=world.group)
            loss = mx.distributed.all_sum(loss, group=world.group) / world.size
        if previous is not None:
            grad = tree_map(lambda a, b: a + b, grad, previous)
        if do_update:
            if accumulation > 1:
                grad = tree_map(lambda g: g / accumulation, grad)
            grad, norm = clip_by_global_norm(grad, train_cfg.grad_clip)
            metrics = {**metrics, "grad_norm": norm}
            optimizer.update(model, grad)
            stage.update(model, metrics)
            grad = None
        return loss, metrics, grad

    compiled = partial(mx.compile, inputs=state, outputs=state)
    if parts.count == 1:
        step = compiled(step_fn) if train_cfg.compile else step_fn
    else:  # the parts compile on their own (a compiled step would run them on one thread)
        def update_fn(computed, previous, do_update):
            return step_fn(None, previous, do_update, computed)

        update = compiled(update_fn) if train_cfg.compile else update_fn
        step = lambda batch, previous, do_update: update(parts.gradients(batch), previous, do_update)  # noqa: E731
    logger = Logger(out / "log.jsonl" if world.main else None, train_cfg.steps, start_step, world.main)
    batches = stage.batches()
    pending = None
    last: Dict[str, float] = {}
    window_samples, window_start = 0, time.perf_counter()
    data_snapshot = None
    try:
        for current in range(start_step, train_cfg.steps):
            for micro in range(accumulation):
                # each micro-step's noise comes from (seed, step): a resumed run draws the same
                mx.random.seed(step_seed(train_cfg.seed, current, micro, world.rank))
                batch = next(batches)
                window_samples += stage.samples_in(batch) * world.size
                final = micro == accumulation - 1
                loss, metrics, pending = step(batch, pending, final)
                mx.eval(state, loss, metrics, pending)
            number = current + 1
            saving = number == train_cfg.steps or (train_cfg.save_every and number % train_cfg.save_every == 0)
            if current == start_step:
                _check_memory(train_cfg.max_memory_gb, 0.0)
            if saving:
                data_snapshot = _gather_data_state(stage, world)
            if number % train_cfg.log_every == 0 or number == train_cfg.steps:
                elapsed = time.perf_counter() - window_start
                last = {"step": number, "loss": float(loss), **_scalars(metrics),
                        "learning_rate": float(optimizer.learning_rate),
                        "samples_per_s": window_samples / elapsed if elapsed > 0 else 0.0,
                        "eta_s": logger.eta(number), "time": time.time()}
                if not math.isfinite(last["loss"]):
                    raise LaVITError(f"the loss became {last['loss']} at step {number}: lower train.learning_rate "
                                     "or raise train.warmup_steps")
                logger.write(last)
                window_samples, window_start = 0, time.perf_counter()
            if train_cfg.eval_every and number % train_cfg.eval_every == 0 and number != train_cfg.steps:
                logger.write({"step": number, "split": "eval", **stage.evaluate()})
            if saving:
                store.save(number, stage.saved_parameters(), optimizer.state, stage.state, data_snapshot,
                           config_json(config))
        evaluation = stage.evaluate()
        if evaluation:
            logger.write({"step": train_cfg.steps, "split": "eval", **evaluation})
            last.update({f"eval_{k}": v for k, v in evaluation.items()})
        if world.main:
            stage.export(out / "model")
    finally:
        parts.close()
        logger.close()
        stage.close()
    return last


class ParallelParts:
    """`train.streams`: each batch split into equal parts whose gradients are computed at once,
    one part per MLX stream (on the CPU each stream is a thread), then averaged.

    MLX's CPU backend runs the ops of one stream one after another; only its BLAS products use
    more than one core, so a training step kept one core of two busy for most of its time
    (benchmarks/train.py --profile). Parts on their own streams run their elementwise work,
    reductions and copies side by side, each with a one-threaded BLAS. A part is like a
    data-parallel rank inside the process: losses that couple the samples of a batch (the
    encoder's contrastive negatives, the tokenizer's keep-ratio term) see one part, scalar
    metrics are the parts' mean, and per-sample metric arrays (for `Stage.update`) are joined.
    Each part's value-and-grad is compiled on its own: one compiled step over all parts ran
    them on one thread.
    """

    def __init__(self, train_cfg: TrainSection, model: nn.Module, stage: Stage, loss_and_grad):
        self.count = resolve_streams(train_cfg.streams, train_cfg.batch_size // max(1, stage.world.size))
        self.streams: List = []
        self._blas_threads = None
        if self.count == 1:
            return
        device = mx.default_device()
        self.streams = [mx.default_stream(device)] + [mx.new_stream(device) for _ in range(self.count - 1)]
        captured = [model.state, mx.random.state, stage.state]
        part = lambda batch: loss_and_grad(model, batch)  # noqa: E731
        self.part = partial(mx.compile, inputs=captured, outputs=captured)(part) if train_cfg.compile else part
        if device == mx.cpu:
            from ..cpu import runtime

            self._blas_threads = runtime.set_blas_threads(1)  # one BLAS thread per part

    def gradients(self, batch: dict):
        """((mean loss, joined metrics), mean gradient) of `batch`, its parts on their streams."""
        pieces = split_batch(batch, self.count)
        results = []
        for stream, piece in zip(self.streams, pieces):
            with mx.stream(stream):
                results.append(self.part(piece))
        losses, metrics = zip(*(values for values, _ in results))
        grads = [grad for _, grad in results]
        loss = sum(losses[1:], losses[0]) / len(losses)
        grad = tree_map(lambda *g: sum(g[1:], g[0]) / len(g), *grads)
        joined = {k: (sum((m[k] for m in metrics[1:]), metrics[0][k]) / len(metrics) if metrics[0][k].size == 1
                      else mx.concatenate([m[k] for m in metrics])) for k in metrics[0]}
        return (loss, joined), grad

    def close(self) -> None:
        if self._blas_threads is not None:
            from ..cpu import runtime

            runtime.set_blas_threads(self._blas_threads)
            self._blas_threads = None


def resolve_streams(setting: int, rank_batch: int) -> int:
    """The number of parts: `setting`, or for 0 the usable cores on a CPU device (1 on a GPU),
    lowered to the largest number that divides this rank's batch."""
    if setting == 0:
        if mx.default_device() != mx.cpu:
            return 1
        from ..cpu.runtime import usable_cores

        setting = usable_cores()
    count = max(1, min(setting, rank_batch))
    while rank_batch % count:
        count -= 1
    return count


def split_batch(batch: dict, count: int) -> List[dict]:
    """`count` equal parts of a batch along its sample axis (arrays of another first size are shared)."""
    samples = max(int(v.shape[0]) for v in batch.values() if hasattr(v, "shape") and v.ndim)
    size = samples // count
    return [{k: v[i * size:(i + 1) * size] if hasattr(v, "shape") and v.ndim and v.shape[0] == samples else v
             for k, v in batch.items()} for i in range(count)]


def step_seed(seed: int, step: int, micro: int = 0, rank: int = 0) -> int:
    """The random seed of one micro-step (so nothing of the random state needs saving)."""
    return (seed * 1_000_003 + step * 1009 + micro * 31 + rank * 7919) % 2**63


def _gather_data_state(stage: Stage, world: World) -> dict:
    """Every rank's data cursor merged into one (rank 0 saves it): JSON bytes all-gathered."""
    mine = stage.data_state()
    if world.size == 1:
        return stage.merge_data_states([mine])
    raw = json.dumps(mine).encode()
    length = mx.distributed.all_gather(mx.array([len(raw)], dtype=mx.int32), group=world.group)
    longest = int(mx.max(length))
    padded = mx.array(list(raw) + [32] * (longest - len(raw)), dtype=mx.uint8)
    gathered = mx.distributed.all_gather(padded[None], group=world.group)
    states = [json.loads(bytes(row.tolist()).decode()) for row in gathered]
    return stage.merge_data_states(states)
