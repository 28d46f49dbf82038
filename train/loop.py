"""The training loop every PyTorch stage shares (the MLX `lavit_mlx.training.loop` on
torch.distributed, for CUDA clusters).

A `Stage` owns its training module, whose `forward(batch)` returns `(loss, metrics)` (so
DDP and FSDP2 see every parameter use inside one forward), its data and its non-gradient
updates. The loop: AdamW (torch's) with linear warmup then cosine decay to
`min_learning_rate` (the MLX schedule, step for step), gradient accumulation (`no_sync` /
`set_requires_gradient_sync` on all but the last micro-step), global-norm clipping, bf16
autocast on CUDA (plus FSDP2's parameter policy; fp32 on CPU), activation
checkpointing per block, random draws re-seeded from (seed, step, micro-step) so that a
resumed run draws the same, a JSONL/TensorBoard log, periodic evaluation, DCP checkpoints
(`checkpoints.py`) and at the end the stage's export in the released layout (`out/model`).
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from lavit_mlx.errors import LaVITError
from lavit_mlx.training.config import RunConfig, TrainSection, config_json

from .checkpoints import CheckpointStore
from .distributed import World, wrap
from .logs import TrainLog


@dataclass
class Launch:
    """How a run is executed (the launcher's flags; the YAML says what is trained)."""

    strategy: str = "ddp"  # ddp | fsdp
    workers: int = 0  # data-loader processes per rank
    async_save: bool = False
    tensorboard: bool = True
    resume: bool = True
    vision_heads: Optional[int] = None  # head count of a released-layout init folder's vision parts (not 1408 wide)


class Stage:
    """What a training stage provides to the loop (see `stages/`).

    `module` is an `nn.Module` whose `forward(batch)` returns (scalar loss, {name: tensor});
    scalar metrics are logged (averaged over ranks), larger ones are for `after_step`.
    """

    name = "stage"

    def __init__(self, config: RunConfig, world: World, launch: Launch):
        torch.manual_seed(config.train.seed)  # the same seed builds the same initial weights
        self.config, self.world, self.launch = config, world, launch
        self.module: nn.Module = None

    # ----- the model
    def blocks(self) -> List[nn.Module]:
        """The transformer blocks: FSDP2's units and activation checkpointing's (default none)."""
        return []

    def enable_checkpointing(self) -> None:
        """Recompute each block's activations in the backward pass (`train.gradient_checkpointing`)."""
        checkpoint_blocks(self.blocks())

    def saved_keys(self, key: str) -> bool:
        """Whether a state-dict key goes into the training checkpoints (default: trained ones)."""
        return key in self._trainable_names()

    def _trainable_names(self) -> set:
        if not hasattr(self, "_trainable"):
            self._trainable = {name for name, p in self.module.named_parameters() if p.requires_grad}
        return self._trainable

    # ----- the data
    def batches(self) -> Iterator[Dict[str, torch.Tensor]]:
        """Training batches (CPU tensors), endless."""
        raise NotImplementedError

    def data_state(self) -> dict:
        """The merged data cursor of every rank (a collective)."""
        return {}

    def load_data_state(self, state: dict) -> None:
        """Restore `data_state` (before `batches` is first called)."""

    def samples_in(self, batch: Dict[str, torch.Tensor]) -> int:
        return int(next(iter(batch.values())).shape[0])

    def frozen(self) -> List[nn.Module]:
        """Frozen modules (encoders) that FSDP2 leaves whole on every rank (default none)."""
        return []

    # ----- the step's edges
    def before_training(self) -> None:
        """Once, on a fresh run, before wrapping (e.g. the codebook's k-means initialisation)."""

    @torch.no_grad()
    def after_step(self, model: nn.Module, metrics: Dict[str, torch.Tensor], step: int) -> None:
        """Non-gradient updates after each optimizer step (norm-EMA codebook, EMA weights)."""

    def evaluate(self, model: nn.Module) -> Dict[str, float]:
        """Metrics on held-out data (default: none); every rank calls it."""
        return {}

    def export(self, folder: Path, state: Dict[str, torch.Tensor]) -> None:
        """Rank 0 writes the trained components in the released layout from the full state dict."""

    def close(self) -> Optional[str]:
        """At the end; a line for the log (the data's skip counts)."""
        return None


def checkpoint_blocks(blocks) -> None:
    """`torch.utils.checkpoint` around each block's forward (names and state dicts unchanged)."""
    from torch.utils.checkpoint import checkpoint

    for block in blocks:
        original = block.forward

        def forward(*args, _original=original, **kwargs):
            return checkpoint(_original, *args, use_reentrant=False, **kwargs)

        block.forward = forward


# ----------------------------------------------------------------------------- optimisation
def learning_rate(train: TrainSection, step: int) -> float:
    """The MLX schedule: linear warmup from lr/warmup to lr over `warmup_steps`, then cosine
    decay to `min_learning_rate` over the remaining steps (`step` counts optimizer updates)."""
    peak, floor, warmup = train.learning_rate, train.min_learning_rate, train.warmup_steps
    if step < warmup:
        start = peak / max(1, warmup)
        return start + (peak - start) * step / warmup
    decay_steps = max(1, train.steps - warmup)
    progress = min(step - warmup, decay_steps) / decay_steps
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(parameters, train: TrainSection, cuda: bool) -> torch.optim.Optimizer:
    params = [p for p in parameters if p.requires_grad]
    if not params:
        raise LaVITError("nothing to train: every parameter of the stage is frozen")
    return torch.optim.AdamW(params, lr=learning_rate(train, 0), betas=(train.beta1, train.beta2),
                             weight_decay=train.weight_decay, fused=True if cuda else None)


def step_seed(seed: int, step: int, micro: int = 0) -> int:
    """The seed of one micro-step's draws: the same on every rank (the draws are made for the
    global batch and sliced), so nothing of the random state needs saving."""
    return (seed * 1_000_003 + step * 1009 + micro * 31) % 2**63


def _no_sync(model: nn.Module, sync: bool):
    """Skip the gradient all-reduce on all but the last micro-step of an accumulation."""
    if sync:
        return nullcontext()
    if hasattr(model, "no_sync"):  # DDP
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)

        class _Restore:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                model.set_requires_gradient_sync(True)

        return _Restore()
    return nullcontext()


def _scalars(metrics: Dict[str, torch.Tensor], world: World) -> Dict[str, float]:
    """Scalar metrics averaged over ranks (one all-reduce)."""
    names = [k for k, v in metrics.items() if torch.is_tensor(v) and v.numel() == 1]
    if not names:
        return {}
    values = torch.stack([metrics[k].detach().float().reshape(()) for k in names])
    values = world.global_sum(values) / world.size
    return dict(zip(names, values.tolist()))


# ----------------------------------------------------------------------------- the loop
def train(stage: Stage, config: RunConfig) -> Dict[str, float]:
    """Run (or resume) a stage's training to `config.train.steps`; returns the last metrics.

    Rank 0 writes the run folder: `config.json`, `log.jsonl`, `tensorboard/`,
    `checkpoints/step-N/` (every rank writes its shards there) and `model/` at the end.
    """
    train_cfg, world, launch = config.train, stage.world, stage.launch
    out = Path(config.out)
    store = CheckpointStore(out / "checkpoints", world, keep=train_cfg.keep_checkpoints,
                            async_save=launch.async_save)
    latest = store.latest() if launch.resume else None
    if latest is None:
        stage.before_training()
    if train_cfg.gradient_checkpointing:
        stage.enable_checkpointing()
    model = wrap(stage.module, world, launch.strategy, stage.blocks(), stage.frozen())
    optimizer = make_optimizer(model.parameters(), train_cfg, world.cuda)
    start_step = 0
    if latest is not None:
        resumed = store.load(latest, model, optimizer, stage.saved_keys)
        stage.load_data_state(resumed.data)
        start_step = resumed.step
    if world.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(config_json(config))
    log = TrainLog(out, train_cfg.steps, start_step, world.main, launch.tensorboard)
    if latest is not None:
        log.message(f"resumed from {latest} (saved on {resumed.world_size} rank(s), now {world.size})")

    # bf16 compute on CUDA (under FSDP2 too: its policy casts the parameters, autocast the
    # activations that frozen bf16 encoders and fp32 noise draws meet inside the forward)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if world.cuda else nullcontext()
    accumulation = train_cfg.grad_accumulation
    params = [p for p in model.parameters() if p.requires_grad]
    batches = stage.batches()
    last: Dict[str, float] = {}
    window_samples, window_start = 0, time.perf_counter()
    try:
        for current in range(start_step, train_cfg.steps):
            rate = learning_rate(train_cfg, current)
            for group in optimizer.param_groups:
                group["lr"] = rate
            model.train()
            losses = []
            for micro in range(accumulation):
                batch = {k: v.to(world.device, non_blocking=True) if torch.is_tensor(v) else v
                         for k, v in next(batches).items()}
                # after fetching: starting data-loader workers draws from the global generator
                torch.manual_seed(step_seed(train_cfg.seed, current, micro))
                window_samples += stage.samples_in(batch) * world.size
                with _no_sync(model, micro == accumulation - 1), autocast:
                    loss, metrics = model(batch)
                    (loss / accumulation).backward()
                losses.append(loss.detach())
            norm = torch.nn.utils.clip_grad_norm_(params, train_cfg.grad_clip if train_cfg.grad_clip > 0
                                                  else float("inf"))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            stage.after_step(model, metrics, current)
            number = current + 1
            saving = number == train_cfg.steps or (train_cfg.save_every and number % train_cfg.save_every == 0)
            if number % train_cfg.log_every == 0 or number == train_cfg.steps:
                elapsed = time.perf_counter() - window_start
                scalars = _scalars({"loss": torch.stack(losses).mean(), **metrics,
                                    "grad_norm": norm.full_tensor() if hasattr(norm, "full_tensor") else norm},
                                   world)
                last = {"step": number, **scalars, "learning_rate": rate,
                        "samples_per_s": window_samples / elapsed if elapsed > 0 else 0.0,
                        "eta_s": log.eta(number), "time": time.time()}
                if not math.isfinite(last["loss"]):
                    raise LaVITError(f"the loss became {last['loss']} at step {number}: lower train.learning_rate "
                                     "or raise train.warmup_steps")
                log.write(last)
                window_samples, window_start = 0, time.perf_counter()
            if train_cfg.eval_every and number % train_cfg.eval_every == 0 and number != train_cfg.steps:
                evaluation = stage.evaluate(model)
                if evaluation:
                    log.write({"step": number, "split": "eval", **evaluation}, prefix="eval")
            if saving:
                store.save(number, model, optimizer, stage.saved_keys, stage.data_state(), json.loads(config_json(config)))
        store.finish()
        evaluation = stage.evaluate(model)
        if evaluation:
            log.write({"step": train_cfg.steps, "split": "eval", **evaluation}, prefix="eval")
            last.update({f"eval_{k}": v for k, v in evaluation.items()})
        export_model(stage, model, out / "model")
        summary = stage.close()
        if summary:
            log.message(summary)
    finally:
        log.close()
    return last


def full_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The whole model's state dict on rank 0's CPU (a collective under FSDP2)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def export_model(stage: Stage, model: nn.Module, folder: Path) -> None:
    state = full_state(model)
    if stage.world.main:
        stage.export(folder, state)
    stage.world.barrier()


def run(stage_name: Optional[str], config_path=None, overrides=(), launch: Launch = Launch(),
        device: Optional[str] = None) -> Dict[str, float]:
    """Load the run config, start the world, build the stage and train it (`python -m lavit_train`)."""
    from .sections import load_run_config
    from .stages import build_stage

    config = load_run_config(stage_name, config_path, list(overrides))
    world = World.init(device)
    try:
        result = train(build_stage(config, world, launch), config)
    except BaseException:
        world.close(wait=False)
        raise
    world.close()
    return result
