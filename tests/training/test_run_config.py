"""Run configs: defaults < YAML < --set, every key checked with a one-line error."""

from __future__ import annotations

from dataclasses import dataclass

import re

import pytest

from lavit_mlx.errors import LaVITError
from lavit_mlx.training import config as run_config


@dataclass
class ModelSection:
    width: int = 64
    name: str = "tiny"


@dataclass
class LossSection:
    rho: float = 1 / 3
    ema: bool = True


@pytest.fixture(autouse=True)
def toy_stage(monkeypatch):
    monkeypatch.setitem(run_config._STAGE_SECTIONS, "vae", (ModelSection, LossSection, {"steps": 50}))


def test_defaults_then_yaml_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("stage: vae\nout: runs/x\nmodel: {width: 96}\ntrain: {batch_size: 4, learning_rate: 1e-3}\n")
    config = run_config.load_run_config("vae", path, ["train.steps=7", "loss.ema=false", "model.name=small"])
    assert (config.model.width, config.model.name) == (96, "small")
    assert (config.train.steps, config.train.batch_size, config.train.learning_rate) == (7, 4, 1e-3)
    assert config.loss.ema is False and config.out == "runs/x"
    assert run_config.load_run_config("vae").train.steps == 50  # the stage's own default


@pytest.mark.parametrize("overrides,message", [
    (["train.stpes=3"], "unknown key train.stpes (did you mean 'steps'?)"),
    (["model.widht=3"], "unknown key model.widht (did you mean 'width'?)"),
    (["trian.steps=3"], "unknown key trian (did you mean 'train'?)"),
    (["train.steps=many"], "train.steps: expected a number, got 'many'"),
    (["train.steps=2.5"], "train.steps: expected an integer, got 2.5"),
    (["loss.ema=3"], "loss.ema: expected true or false, got 3"),
    (["train.steps=0"], "train.steps 0: expected at least 1"),
    (["train.streams=-1"], "train.streams -1: expected 0 (automatic) or more"),
    (["steps"], "expected KEY=VALUE"),
])
def test_bad_values_are_one_line_errors(overrides, message):
    with pytest.raises(LaVITError, match=re.escape(message)):
        run_config.load_run_config("vae", None, overrides)


def test_bad_files(tmp_path):
    with pytest.raises(LaVITError, match="no such config file"):
        run_config.load_run_config("vae", tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(LaVITError, match="not valid YAML"):
        run_config.load_run_config("vae", bad)
    other = tmp_path / "other.yaml"
    other.write_text("stage: llm\n")
    with pytest.raises(LaVITError, match="for stage 'llm', not 'vae'"):
        run_config.load_run_config("vae", other)
