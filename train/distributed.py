"""Data parallelism for the PyTorch trainers: `torchrun` ranks, DDP or FSDP2.

    torchrun --nproc-per-node 8 -m lavit_train tokenizer --config run.yaml --strategy fsdp

`World.init()` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and starts the
process group: NCCL for the GPU tensors plus gloo for CPU ones on CUDA
(`"cpu:gloo,cuda:nccl"`: the data cursor and other objects travel over gloo), gloo alone on
a CPU machine. One process without torchrun is a world of one and starts no group.

`wrap()` applies the strategy to a stage's training module: DDP of the whole module, or
FSDP2 (`fully_shard` on each transformer block the stage names, then on the root), with
`MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)` on CUDA. The optimizer is
built afterwards, over the (sharded) parameters.

Every sum the losses normalise by (kept tokens, target tokens) is taken over the whole
world (`global_sum`), and random draws are made for the global batch and sliced
(`rank_slice`), so a step on any number of ranks equals the step of one process on the
concatenated batch.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Iterable, List, Optional

import torch
import torch.distributed as dist
from torch import nn

from lavit_mlx.errors import LaVITError

STRATEGIES = ("ddp", "fsdp")


@dataclass
class World:
    """This process' place among the data-parallel ranks, and its device."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @classmethod
    def init(cls, device: Optional[str] = None, timeout_s: int = 1800) -> "World":
        """The world torchrun describes (a world of one without it).

        Args:
            device: "cuda" or "cpu" (default: cuda when available).
            timeout_s: collective timeout (a rank that stops answering fails the run).
        """
        size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        kind = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if kind == "cuda":
            if not torch.cuda.is_available():
                raise LaVITError("--device cuda: no CUDA device is visible")
            torch.cuda.set_device(local)
            target = torch.device("cuda", local)
        else:
            target = torch.device("cpu")
        if size > 1 and not dist.is_initialized():
            # gloo for CPU tensors next to NCCL: object collectives (the data cursor) and a
            # CPU FSDP2 group on a CUDA machine would otherwise hit NCCL with CPU tensors
            backend = "cpu:gloo,cuda:nccl" if kind == "cuda" else "gloo"
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s),
                                    device_id=target if kind == "cuda" else None)
        return cls(rank, size, local, target)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self, wait: bool = True) -> None:
        """Tear the process group down; with `wait`, once every rank is here (a rank that
        destroyed its gloo group while a peer was still in a collective died at exit,
        "terminate called without an active exception", SIGABRT: seen once in the 2-process
        benchmark after all its steps). After an error there is no waiting: the peers may never come."""
        if self.distributed and dist.is_initialized():
            try:
                if wait:
                    dist.barrier()
            finally:
                dist.destroy_process_group()

    # ----- collectives
    def global_sum(self, value: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of a tensor, outside autograd (counts that normalise a loss)."""
        value = value.detach().clone()
        if self.distributed:
            dist.all_reduce(value)
        return value

    def differentiable_sum(self, value: torch.Tensor) -> torch.Tensor:
        """The sum over ranks, with the gradient flowing back to every rank's part."""
        if not self.distributed:
            return value
        from torch.distributed.nn.functional import all_reduce

        return all_reduce(value)

    def all_gather(self, value: torch.Tensor) -> torch.Tensor:
        """Every rank's tensor (same shape on all), concatenated along dim 0 in rank order."""
        if not self.distributed:
            return value
        parts = [torch.empty_like(value) for _ in range(self.size)]
        dist.all_gather(parts, value.contiguous())
        return torch.cat(parts)

    def gather_objects(self, obj) -> List:
        """Every rank's picklable object, in rank order (over gloo on CUDA machines too)."""
        if not self.distributed:
            return [obj]
        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj):
        """Rank 0's object on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def rank_slice(self, batch_size: int) -> slice:
        """This rank's rows of a global batch of `batch_size` rows per rank."""
        return slice(self.rank * batch_size, (self.rank + 1) * batch_size)


def wrap(module: nn.Module, world: World, strategy: str, blocks: Iterable[nn.Module] = (),
         frozen: Iterable[nn.Module] = ()) -> nn.Module:
    """The training module made data-parallel (returned; call it instead of `module`).

    Args:
        module: the stage's training module (its forward computes the loss).
        strategy: "ddp" or "fsdp" (a world of one runs the module as it is).
        blocks: the transformer blocks that FSDP2 shards one by one (and that hold most
            of the parameters); the rest goes with the root.
        frozen: modules FSDP2 leaves whole on every rank (frozen encoders, already in the
            compute dtype: nothing to shard, reduce or cast).
    """
    if strategy not in STRATEGIES:
        raise LaVITError(f"--strategy {strategy!r}: choose from {', '.join(STRATEGIES)}")
    if not world.distributed:
        return module
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        trainable = any(p.requires_grad for p in module.parameters())
        if not trainable:
            raise LaVITError("nothing to train: every parameter of the stage is frozen")
        return DistributedDataParallel(module, device_ids=[world.local_rank] if world.cuda else None,
                                       find_unused_parameters=False)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if world.cuda \
        else MixedPrecisionPolicy()
    ignored = {p for part in frozen for p in part.parameters()}
    for block in blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(module, mp_policy=policy, ignored_params=ignored or None)
    return module


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole value of a parameter or buffer, whether FSDP2 sharded it (a DTensor) or not."""
    data = tensor.detach()
    return data.full_tensor() if hasattr(data, "full_tensor") else data


def assign_full(tensor: torch.Tensor, value: torch.Tensor) -> None:
    """Set a parameter (sharded or not) to a whole value that every rank computed alike."""
    with torch.no_grad():
        if hasattr(tensor, "device_mesh"):
            from torch.distributed.tensor import distribute_tensor

            # every rank holds the whole value: cut the local shard, no communication
            shard = distribute_tensor(value.to(tensor.dtype), tensor.device_mesh, tensor.placements, src_data_rank=None)
            tensor.to_local().copy_(shard.to_local())
        else:
            tensor.copy_(value.to(tensor.dtype))


class unsharded:
    """Parameters gathered for calls outside the wrapped module's forward (evaluation): FSDP2's
    `unshard()`/`reshard()` on the root; nothing to do for DDP or a single process."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        if hasattr(self.model, "unshard"):
            self.model.unshard()
        return self.model

    def __exit__(self, *exc):
        if hasattr(self.model, "reshard"):
            self.model.reshard()
