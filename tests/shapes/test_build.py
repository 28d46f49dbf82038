"""`lavit train shapes`: the bundled model's build, every stage at toy sizes, end to end."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from lavit_mlx.errors import LaVITError
from lavit_mlx.shapes.build import STAGES, BuildOptions, parse_overrides

pytestmark = pytest.mark.slow

# Every stage at toy sizes: the build's wiring is under test, not the model's quality.
TINY = [
    "encoder.model.width=32", "encoder.model.depth=1", "encoder.model.num_heads=2", "encoder.model.embed_dim=16",
    "encoder.model.text_width=32", "encoder.model.text_depth=1", "encoder.model.text_heads=2",
    "encoder.train.batch_size=8", "encoder.train.eval_batches=1",
    "tokenizer.model.codebook_size=64", "tokenizer.model.num_heads=2", "tokenizer.model.merger_depth=1",
    "tokenizer.model.highres_decoder.width=32", "tokenizer.model.highres_decoder.depth=1",
    "tokenizer.model.highres_decoder.num_heads=2", "tokenizer.model.highres_decoder.context_dims=[16, 16]",
    "tokenizer.model.highres_decoder.pooled_dim=16", "tokenizer.train.batch_size=8",
    "tokenizer.train.eval_batches=1",
    "vae.model.channels=[8, 8, 8, 8]", "vae.model.norm_num_groups=4", "vae.loss.crop_size=32",
    "vae.loss.eval_images=2", "vae.train.batch_size=4",
    "llm.model.llm={hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2, "
    "max_position_embeddings: 256}", "llm.train.batch_size=8", "llm.train.eval_batches=1",
    "pixel.model.unet={block_out_channels: [16, 32], down_block_types: [DownBlock2D, CrossAttnDownBlock2D], "
    "up_block_types: [CrossAttnUpBlock2D, UpBlock2D], attention_head_dim: [1, 2], norm_num_groups: 8, "
    "addition_time_embed_dim: 8}", "pixel.model.defaults={steps: 2, guidance: 2.0}", "pixel.train.batch_size=4",
    "pixel.loss.eval_images=2", "pixel.train.eval_batches=1",
]


def lavit(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "lavit_cli.cli", *map(str, args)], capture_output=True, text=True)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def build_args(out: Path, *extra):
    sets = [item for value in TINY for item in ("--set", value)]
    return ["train", "shapes", "--out", out, "--scenes", 64, "--steps-scale", 0.01, *sets, *extra]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_one_command_builds_a_model_every_command_opens(tmp_path):
    out = tmp_path / "build"
    proc = lavit(*build_args(out))
    model = out / "model"
    assert proc.stdout.strip().endswith(str(model))
    assert "time per stage:" in proc.stderr
    for stage in STAGES:
        assert (out / stage / "DONE.json").is_file(), stage
    info = json.loads((model / "build.json").read_text())
    assert set(info["stage_seconds"]) >= {"encoder", "tokenizer", "vae", "llm", "pixel"}
    config = json.loads((model / "config.json").read_text())
    assert set(config["components"]) >= {"eva", "tokenizer", "highres_decoder", "llm", "understanding",
                                          "highres_pixel"}
    described = lavit("info", "--model", model, "--verify").stdout
    assert described.count("all files match") == 1 and "MLX folder (float16" in described
    picture = out / "data" / "eval" / "images" / "000000.png"
    caption = lavit("caption", "--model", model, picture, "--max-tokens", 8)  # caption's option
    assert caption.stdout.strip()
    generated = tmp_path / "g.png"
    lavit("generate", "--model", model, "--prompt", "a red circle at the top left", "--out", generated,
          "--seed", 3)
    assert generated.stat().st_size > 0
    # a second run finds every stage done and changes nothing
    before = digest(model / "eva.safetensors")
    again = lavit(*build_args(out))
    assert again.stderr.count("skipped") == len(STAGES) and digest(model / "eva.safetensors") == before


def test_the_same_seed_gives_the_same_encoder_and_another_seed_does_not(tmp_path):
    runs = {}
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        lavit(*build_args(tmp_path / name, "--seed", seed, "--stop-after", "encoder"))
        runs[name] = digest(tmp_path / name / "encoder" / "model" / "eva.safetensors")
    assert runs["a"] == runs["b"] != runs["c"]


def test_the_quantizer_pass_has_the_tokenizer_sizes():
    """configs/quantizer.yaml re-runs the tokenizer stage on the first pass's export: its model
    sizes must be tokenizer.yaml's (the build hands the quantizer step the tokenizer's --set sizes)."""
    from lavit_mlx.shapes.build import CONFIGS, stage_overrides
    from lavit_mlx.training.config import load_run_config

    first = load_run_config("tokenizer", CONFIGS / "tokenizer.yaml", [f"model.init={CONFIGS}"]).model
    second = load_run_config("tokenizer", CONFIGS / "quantizer.yaml", [f"model.init={CONFIGS}"]).model
    for name in ("merger_depth", "num_heads", "mlp_dim", "codebook_size", "code_dim", "decoders", "highres_decoder"):
        assert getattr(first, name) == getattr(second, name), name
    options = BuildOptions(out=Path("runs/x"), overrides=parse_overrides(["tokenizer.model.merger_depth=1",
                                                                          "tokenizer.train.steps=3"]))
    overrides = stage_overrides("quantizer", options)
    assert "merger_depth=1" in " ".join(overrides) and "train.steps=3" not in overrides
    assert f"model.tokenizer_init={Path('runs/x/tokenizer/model')}" in overrides


def test_bad_build_options_are_one_line_errors(tmp_path):
    with pytest.raises(LaVITError, match="STAGE.KEY=VALUE"):
        parse_overrides(["train.steps"])
    with pytest.raises(LaVITError, match="must be one of"):
        BuildOptions(out=tmp_path, overrides=parse_overrides(["decoder.train.steps=3"])).check()
    for args, message in ((["--stop-after", "nothing"], "stop-after"), (["--seed", "-1"], "seed"),
                          (["--config", "x.yaml"], "--config")):
        proc = lavit("train", "shapes", "--out", tmp_path / "x", *args, check=False)
        assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr
        assert not (tmp_path / "x").exists()
