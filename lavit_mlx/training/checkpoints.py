"""Training checkpoints: atomic, resumable, the last N kept.

    RUN/checkpoints/step-00000500/
        parameters.safetensors   the trainable parameters (and any the stage updates itself)
        optimizer.safetensors    AdamW's state, flattened
        stage.safetensors        the stage's own arrays (EMA statistics, EMA weights)
        state.json               step, data cursor, the run config

A checkpoint is written into `.partial-step-N-PID/` and renamed when complete, so a run
killed at any moment leaves either the previous checkpoint or the new one, never half of
one; leftovers of killed writes are removed by the next save. Resuming restores every
piece, so a resumed run continues bit-identically.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from ..errors import LaVITError

PARTIAL = ".partial-"


@dataclass
class Saved:
    step: int
    parameters: Dict[str, mx.array]
    optimizer: Dict[str, mx.array]
    stage_state: Dict[str, mx.array]
    data: dict
    config: dict

    def optimizer_state(self, optimizer):
        """The optimizer state tree to assign to `optimizer.state`."""
        return tree_unflatten(list(self.optimizer.items()))


def _write_safetensors(path: Path, arrays: Dict[str, mx.array]) -> None:
    mx.save_safetensors(str(path), {k: v for k, v in arrays.items()})


class CheckpointStore:
    """The `checkpoints/` folder of a run."""

    def __init__(self, folder: Path, keep: int = 2, writer: bool = True):
        self.folder, self.keep, self.writer = Path(folder), keep, writer

    def checkpoints(self) -> list:
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.iterdir() if p.is_dir() and p.name.startswith("step-")
                      and (p / "state.json").is_file())

    def latest(self) -> Optional[Path]:
        found = self.checkpoints()
        return found[-1] if found else None

    def save(self, step: int, parameters: Dict[str, mx.array], optimizer_state, stage_state: Dict[str, mx.array],
             data: dict, config_text: str) -> Optional[Path]:
        if not self.writer:
            return None
        self.folder.mkdir(parents=True, exist_ok=True)
        for stale in self.folder.glob(f"{PARTIAL}*"):
            shutil.rmtree(stale, ignore_errors=True)  # a write killed half way
        final = self.folder / f"step-{step:08d}"
        partial = self.folder / f"{PARTIAL}step-{step:08d}-{os.getpid()}"
        partial.mkdir()
        try:
            _write_safetensors(partial / "parameters.safetensors", parameters)
            _write_safetensors(partial / "optimizer.safetensors", dict(tree_flatten(optimizer_state)))
            _write_safetensors(partial / "stage.safetensors", dict(tree_flatten(stage_state)) or {"_": mx.zeros(1)})
            state = {"step": step, "data": data, "config": json.loads(config_text)}
            (partial / "state.json").write_text(json.dumps(state))
            if final.exists():
                shutil.rmtree(final)
            os.rename(partial, final)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        for old in self.checkpoints()[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def load(self, path: Path) -> Saved:
        path = Path(path)
        try:
            state = json.loads((path / "state.json").read_text())
            parameters = dict(mx.load(str(path / "parameters.safetensors")))
            optimizer = dict(mx.load(str(path / "optimizer.safetensors")))
            stage = {k: v for k, v in mx.load(str(path / "stage.safetensors")).items() if k != "_"}
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            raise LaVITError(f"{path}: not a readable training checkpoint ({exc})") from None
        return Saved(state["step"], parameters, optimizer, tree_unflatten(list(stage.items())) if stage else {},
                     state.get("data") or {}, state.get("config") or {})
