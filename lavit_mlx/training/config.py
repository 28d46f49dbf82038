"""Run configuration: one YAML file describes a training run, for the MLX trainers here and
for the PyTorch trainers in `lavit_train` (pure Python, no mlx, no torch).

    stage: tokenizer            # encoder | tokenizer | llm | pixel | vae
    out: runs/shapes-tokenizer  # the run folder: checkpoints, log.jsonl, the exported model
    model: {...}                # the stage's model section (sizes or a starting folder)
    data: {train: data/train.jsonl, eval: data/eval.jsonl, shuffle_buffer: 1000}
    train: {steps: 2000, batch_size: 32, learning_rate: 3e-4, ...}
    loss: {...}                 # the stage's loss section

Values come from the defaults, then the YAML file, then `--set key=value` overrides
(dotted keys: `train.steps=100`). An unknown key is an error naming it and the nearest
valid key. Every section is a dataclass: the stage's own sections are registered by the
stage (`register_stage`).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Type

from ..errors import LaVITError

STAGES = ("encoder", "tokenizer", "llm", "pixel", "vae")


@dataclass
class DataSection:
    """Where the samples come from (`lavit_mlx.data.DataStream` sources)."""

    train: Any = None  # a JSONL manifest, tar shards (a brace pattern or a list), or a folder of them
    eval: Any = None
    shuffle_buffer: int = 1000
    lines_per_shard: int = 1000  # a single JSONL is split into virtual shards of this many lines
    image_size: int = 224


@dataclass
class TrainSection:
    """The optimisation, shared by every stage (AdamW, warmup then cosine decay)."""

    steps: int = 1000
    batch_size: int = 8
    grad_accumulation: int = 1
    learning_rate: float = 1e-4
    min_learning_rate: float = 0.0
    warmup_steps: int = 0
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 1.0  # global norm; 0 turns clipping off
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0: only at the end
    eval_batches: int = 4
    save_every: int = 500
    keep_checkpoints: int = 2
    gradient_checkpointing: bool = False
    compile: bool = True
    # parts of each batch computed at once, one MLX stream (a CPU thread) each (loop.ParallelParts):
    # 1 whole batches; N parts (lowered until it divides the batch); 0 one per usable core on a
    # CPU device, 1 on a GPU. On a CPU it pays where a step's ops are large (the shapes stages
    # 1.1-2x), not on tiny steps (benchmarks/train.py at EVA width 64: 0.5x)
    streams: int = 1
    max_memory_gb: float = 0.0  # stop with a message when the first step's peak passes this (0: off)

    def check(self) -> None:
        problems = [
            (self.steps >= 1, f"train.steps {self.steps}: expected at least 1"),
            (self.batch_size >= 1, f"train.batch_size {self.batch_size}: expected at least 1"),
            (self.grad_accumulation >= 1, f"train.grad_accumulation {self.grad_accumulation}: expected at least 1"),
            (self.learning_rate > 0, f"train.learning_rate {self.learning_rate}: expected > 0"),
            (0 <= self.warmup_steps <= self.steps, f"train.warmup_steps {self.warmup_steps}: expected 0..steps"),
            (self.keep_checkpoints >= 1, f"train.keep_checkpoints {self.keep_checkpoints}: expected at least 1"),
            (self.log_every >= 1, f"train.log_every {self.log_every}: expected at least 1"),
            (self.save_every >= 0 and self.eval_every >= 0, "train.save_every and train.eval_every must be >= 0"),
            (0 <= self.seed <= 2**32 - 1, f"train.seed {self.seed}: expected 0..4294967295"),
            (self.streams >= 0, f"train.streams {self.streams}: expected 0 (automatic) or more"),
        ]
        for ok, message in problems:
            if not ok:
                raise LaVITError(message)


@dataclass
class RunConfig:
    """A whole run: the stage, the run folder and the sections."""

    stage: str = "tokenizer"
    out: str = "runs/lavit"
    model: Any = None  # the stage's model section (a dataclass)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    loss: Any = None  # the stage's loss section (a dataclass)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# stage name -> (model section class, loss section class, train defaults)
_STAGE_SECTIONS: Dict[str, Tuple[Type, Type, dict]] = {}


def register_stage(name: str, model_section: Type, loss_section: Type, train_defaults: Optional[dict] = None):
    """Declare a stage's own sections (called by each stage module at import)."""
    _STAGE_SECTIONS[name] = (model_section, loss_section, dict(train_defaults or {}))


def _sections(stage: str) -> Tuple[Type, Type, dict]:
    if stage not in STAGES:
        raise LaVITError(f"unknown stage {stage!r}; choose from {', '.join(STAGES)}")
    if stage not in _STAGE_SECTIONS:
        from . import stages  # noqa: F401  (registers every stage)
    if stage not in _STAGE_SECTIONS:
        raise LaVITError(f"the {stage!r} stage is not available in this installation")
    return _STAGE_SECTIONS[stage]


def _nearest(key: str, valid: List[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.4)
    return f" (did you mean {close[0]!r}?)" if close else f" (valid: {', '.join(valid)})"


def _fill(cls: Type, values: Any, where: str):
    """A dataclass from a mapping, refusing unknown keys (named with the nearest valid one)."""
    if values is None:
        return cls()
    if not isinstance(values, dict):
        raise LaVITError(f"{where}: expected a mapping of keys to values, got {type(values).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in names:
            raise LaVITError(f"unknown key {where}.{key}{_nearest(key, names)}")
    kinds = {f.name: f for f in dataclasses.fields(cls)}
    out = {}
    for key, value in values.items():
        default = kinds[key].default
        if dataclasses.is_dataclass(default) or (kinds[key].default_factory is not dataclasses.MISSING
                                                 and dataclasses.is_dataclass(kinds[key].default_factory())):
            sub = type(default) if dataclasses.is_dataclass(default) else type(kinds[key].default_factory())
            out[key] = _fill(sub, value, f"{where}.{key}")
        else:
            out[key] = _coerce(value, default, f"{where}.{key}")
    return cls(**out)


def _coerce(value: Any, default: Any, where: str) -> Any:
    """Check a value against the type of its default (ints accepted for floats)."""
    if default is None or default is dataclasses.MISSING or value is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise LaVITError(f"{where}: expected true or false, got {value!r}")
        return value
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as text
            try:
                value = float(value) if any(c in value for c in ".eE") else int(value)
            except ValueError:
                raise LaVITError(f"{where}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise LaVITError(f"{where}: expected a number, got {value!r}")
        if isinstance(default, int) and not isinstance(value, int):
            if float(value).is_integer():
                return int(value)
            raise LaVITError(f"{where}: expected an integer, got {value!r}")
        return type(default)(value) if isinstance(default, float) else value
    if isinstance(default, str) and not isinstance(value, str):
        raise LaVITError(f"{where}: expected text, got {value!r}")
    if isinstance(default, (list, tuple)) and not isinstance(value, (list, tuple)):
        raise LaVITError(f"{where}: expected a list, got {value!r}")
    return value


def parse_override(text: str) -> Tuple[List[str], Any]:
    """`a.b=value` -> (["a", "b"], value), the value read as YAML (numbers, true/false, lists)."""
    import yaml

    if "=" not in text:
        raise LaVITError(f"--set {text!r}: expected KEY=VALUE, e.g. train.steps=100")
    key, raw = text.split("=", 1)
    path = [part for part in key.strip().split(".") if part]
    if not path:
        raise LaVITError(f"--set {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return path, value


def read_yaml(path) -> dict:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise LaVITError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LaVITError(f"{path}: not valid YAML ({first})") from None
    if not isinstance(data, dict):
        raise LaVITError(f"{path}: expected a mapping at the top level")
    return data


def load_run_config(stage: Optional[str] = None, path=None, overrides: List[str] = ()) -> RunConfig:
    """Defaults < YAML file < `--set` overrides; every key checked.

    Args:
        stage: the stage asked for on the command line (must agree with the file's).
        path: the YAML file (optional).
        overrides: `key=value` strings.
    """
    data = read_yaml(path) if path else {}
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for key in keys[:-1]:
            if not isinstance(node.setdefault(key, {}), dict):
                raise LaVITError(f"--set {text!r}: {key} is not a section")
            node = node[key]
        node[keys[-1]] = value
    file_stage = data.get("stage")
    if stage and file_stage and stage != file_stage:
        raise LaVITError(f"{path}: this config is for stage {file_stage!r}, not {stage!r}")
    stage = stage or file_stage or "tokenizer"
    model_cls, loss_cls, train_defaults = _sections(stage)
    valid = ["stage", "out", "model", "data", "train", "loss"]
    for key in data:
        if key not in valid:
            raise LaVITError(f"unknown key {key}{_nearest(key, valid)}")
    train_values = {**train_defaults, **(data.get("train") or {})}
    config = RunConfig(
        stage=stage,
        out=str(data.get("out", f"runs/{stage}")),
        model=_fill(model_cls, data.get("model"), "model"),
        data=_fill(DataSection, data.get("data"), "data"),
        train=_fill(TrainSection, train_values, "train"),
        loss=_fill(loss_cls, data.get("loss"), "loss"),
    )
    config.train.check()
    for section in (config.model, config.loss):
        if hasattr(section, "check"):
            section.check()
    return config


def config_json(config: RunConfig) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True)
