"""One YAML for both frameworks: the PyTorch trainers' sections are the MLX stages' field for
field (compared wherever the MLX stage modules import), and a run config reads and checks
as the MLX trainer reads it."""

from __future__ import annotations

import dataclasses
import importlib

import pytest

from lavit_mlx.errors import LaVITError
from lavit_train import sections

MLX_SECTIONS = {
    "tokenizer": ("tokenizer", ("TokenizerModel", "TokenizerLoss", "DecoderSection")),
    "llm": ("llm", ("LLMModelSection", "LLMLossSection")),
    "pixel": ("pixel", ("PixelModel", "PixelLoss", "EMASection", "DevTokenizer")),
}


def shape(cls) -> dict:
    """Field names with their defaults (a nested section by its own shape)."""
    return dataclasses.asdict(cls())


@pytest.mark.parametrize("stage", sorted(MLX_SECTIONS))
def test_sections_equal_the_mlx_stages(stage):
    module_name, classes = MLX_SECTIONS[stage]
    try:
        mlx_stage = importlib.import_module(f"lavit_mlx.training.stages.{module_name}")
    except ImportError:
        pytest.skip(f"the MLX {stage} stage is not in this tree")
    for name in classes:
        if not hasattr(mlx_stage, name):
            pytest.skip(f"the MLX {stage} stage has no {name} (its sections are named otherwise)")
        ours, theirs = getattr(sections, name), getattr(mlx_stage, name)
        assert [f.name for f in dataclasses.fields(ours)] == [f.name for f in dataclasses.fields(theirs)], name
        assert shape(ours) == shape(theirs), name
    if stage == "llm":
        from lavit_mlx.training.lora import LoRASection

        assert shape(sections.LoRASection) == shape(LoRASection)
    from lavit_mlx.training import config as run_config

    assert run_config._STAGE_SECTIONS[stage][2] == sections.SECTIONS[stage][2]


def test_a_run_config_reads_with_overrides_and_refuses_unknown_keys(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("stage: tokenizer\nmodel: {init: some/folder, codebook_size: 64}\n"
                    "train: {steps: 10, warmup_steps: 1, learning_rate: 1e-3}\nloss: {keep_ratio: 0.25}\n")
    config = sections.load_run_config(None, path, ["train.batch_size=3", "model.highres_decoder.depth=3"])
    assert (config.train.steps, config.train.batch_size, config.train.learning_rate) == (10, 3, 1e-3)
    assert config.model.codebook_size == 64 and config.model.highres_decoder.depth == 3
    assert config.loss.keep_ratio == 0.25
    with pytest.raises(LaVITError, match="unknown key loss.keep_rato .*keep_ratio"):
        sections.load_run_config(None, path, ["loss.keep_rato=0.3"])
    with pytest.raises(LaVITError, match="'vae' stage"):  # MLX's only (not registered on main yet)
        sections.load_run_config("vae", None, ["train.warmup_steps=1"])


def test_mlx_only_llm_options_are_one_line_errors_in_pytorch():
    for section in (sections.LLMModelSection(init="x", projection_init="scene_labels"),
                    sections.LLMModelSection(init="x", train_projection=False),
                    sections.PixelModel(spatial_context=True)):
        with pytest.raises(LaVITError, match="MLX only") as info:
            section.check()
        assert "\n" not in str(info.value)
