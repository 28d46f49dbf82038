"""Training checkpoints with `torch.distributed.checkpoint`: sharded, atomic, resharding.

    RUN/checkpoints/step-00000500/
        .metadata, __0_0.distcp, ...   DCP: the saved parameters and AdamW's state, by name
        state.json                     step, the merged data cursor, the run config, the world

Every rank writes its own shards (DDP's replicated tensors once) into
`.partial-step-N/`; after a barrier rank 0 writes `state.json` and renames the folder, so a
run killed at any moment leaves the previous checkpoint or the new one, never half of one
(leftovers are removed at the next start). DCP stores each tensor by its name and global
shape, so a checkpoint saved on 2 ranks under FSDP2 loads on 1 or 3, or under DDP
(`get_state_dict`/`set_state_dict` name parameters the same under every wrapper). The last
`keep` checkpoints are kept. With `async_save` the shards are written in the background
(`dcp.async_save`) and the folder is renamed once they are complete, before the next save.

What is saved is the stage's choice (`saved_keys`): the trained parameters, the ones it
updates itself (the norm-EMA codebook) and its buffers; frozen encoders are not repeated
in every checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict, set_optimizer_state_dict,
                                                     set_model_state_dict)

from lavit_mlx.errors import LaVITError

from .distributed import World

PARTIAL = ".partial-"


@dataclass
class Resumed:
    step: int
    data: dict
    config: dict
    world_size: int


class CheckpointStore:
    """The `checkpoints/` folder of a run (see the module docstring)."""

    def __init__(self, folder: Path, world: World, keep: int = 2, async_save: bool = False):
        self.folder, self.world, self.keep, self.async_save = Path(folder), world, keep, async_save
        self.pending = None  # (future, partial folder, final folder, state.json text)
        if world.main and self.folder.is_dir():
            for stale in self.folder.glob(f"{PARTIAL}*"):
                shutil.rmtree(stale, ignore_errors=True)  # a write killed half way
        world.barrier()

    def checkpoints(self) -> list:
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.iterdir() if p.is_dir() and p.name.startswith("step-")
                      and (p / "state.json").is_file())

    def latest(self) -> Optional[Path]:
        found = self.checkpoints()
        return found[-1] if found else None

    # ----- saving
    def save(self, step: int, module: nn.Module, optimizer: torch.optim.Optimizer, saved_keys: Callable[[str], bool],
             data: dict, config: dict) -> None:
        """Save (every rank calls this); the previous async save is finalised first."""
        self.finish()
        model_state, optim_state = get_state_dict(module, optimizer)
        state = {"model": {k: v for k, v in model_state.items() if saved_keys(k)}, "optim": optim_state}
        final = self.folder / f"step-{step:08d}"
        partial = self.folder / f"{PARTIAL}step-{step:08d}"
        if self.world.main:
            self.folder.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir()
        self.world.barrier()
        text = json.dumps({"step": step, "data": data, "config": config, "world_size": self.world.size})
        if self.async_save:
            future = dcp.async_save(state, checkpoint_id=str(partial))
            self.pending = (future, partial, final, text)
        else:
            dcp.save(state, checkpoint_id=str(partial))
            self._finalise(partial, final, text)

    def finish(self) -> None:
        """Wait for an async save and rename its folder (every rank calls this)."""
        if self.pending is None:
            return
        future, partial, final, text = self.pending
        future.result()
        self.pending = None
        self._finalise(partial, final, text)

    def _finalise(self, partial: Path, final: Path, text: str) -> None:
        self.world.barrier()  # every rank's shards are written
        if self.world.main:
            (partial / "state.json").write_text(text)
            if final.exists():
                shutil.rmtree(final)
            os.rename(partial, final)
            for old in self.checkpoints()[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        self.world.barrier()

    # ----- loading
    def load(self, path: Path, module: nn.Module, optimizer: torch.optim.Optimizer,
             saved_keys: Callable[[str], bool]) -> Resumed:
        """Load a checkpoint into the (wrapped) module and optimizer, on any world size."""
        path = Path(path)
        try:
            info = json.loads((path / "state.json").read_text())
        except (OSError, ValueError) as exc:
            raise LaVITError(f"{path}: not a readable training checkpoint ({exc})") from None
        model_state, optim_state = get_state_dict(module, optimizer)
        wanted = {k: v for k, v in model_state.items() if saved_keys(k)}
        state = {"model": wanted, "optim": optim_state}
        try:
            dcp.load(state, checkpoint_id=str(path))
        except (RuntimeError, ValueError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise LaVITError(f"{path}: does not fit this run's model ({first[:300]})") from None
        # the frozen parts (not saved) stay as the stage built them
        result = set_model_state_dict(module, state["model"], options=StateDictOptions(strict=False))
        unexpected = [k for k in result.unexpected_keys]
        loaded_missing = [k for k in result.missing_keys if saved_keys(k)]
        if unexpected or loaded_missing:
            raise LaVITError(f"{path}: keys do not match the model ({(unexpected or loaded_missing)[0]})")
        set_optimizer_state_dict(module, optimizer, state["optim"])
        return Resumed(step=int(info["step"]), data=info.get("data") or {}, config=info.get("config") or {},
                       world_size=int(info.get("world_size", 1)))
