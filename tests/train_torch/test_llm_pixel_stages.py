"""Stages 2 and 3 in PyTorch train (the loss falls) and export the released layout."""

from __future__ import annotations

import json

import builders
from harness import checked, run_driver, write_config


def losses(out):
    return [r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r]


def test_llm_stage_loss_falls(folders, tmp_path):
    config = write_config(tmp_path / "llm.yaml", {
        "stage": "llm",
        "model": {"init": str(folders["mlx"]), "text_tokenizer": str(folders["text"]), "max_length": 64,
                  "llm": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                          "num_attention_heads": 2}},
        "data": {"train": str(folders["data"]), "image_size": 28, "shuffle_buffer": 4, "lines_per_shard": 10},
        "train": {"steps": 12, "batch_size": 4, "learning_rate": 1e-2, "warmup_steps": 1, "log_every": 1,
                  "save_every": 0, "gradient_checkpointing": True},
        "loss": {"content_words": ["red", "circle", "top"]},
    })
    out = tmp_path / "run"
    checked(run_driver(config, out))
    values = losses(out)
    assert sum(values[-3:]) / 3 < 0.8 * sum(values[:3]) / 3, values
    record = json.loads((out / "log.jsonl").read_text().splitlines()[0])
    assert record["tokens_per_image"] > 0 and "text_loss" in record and "image_loss" in record
    assert all(0 <= r["content_accuracy"] <= 1 for r in map(
        json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r)
    model = out / "model"
    assert (model / "language_model" / "model.safetensors").is_file()
    assert (model / "language_model" / "tokenizer.model").is_file()
    assert (model / "language_model" / "visual_weight.bin").is_file()
    vocab = json.loads((model / "language_model" / "config.json").read_text())["vocab_size"]
    assert vocab == 256 + 2 + builders.CODEBOOK
    # the export converts to MLX, whose LLM gives transformers' logits
    import mlx.core as mx
    import numpy as np
    import torch
    from transformers import LlamaForCausalLM

    import lavit_mlx
    from lavit_convert.to_mlx import ConvertOptions, convert_to_mlx
    from support import max_rel

    convert_to_mlx(model, tmp_path / "mlx", ConvertOptions(vision_heads=builders.HEADS))
    ids = [1, 40, 256, 270, 280, 257]
    with torch.no_grad():
        expected = LlamaForCausalLM.from_pretrained(model / "language_model").eval()(torch.tensor([ids])).logits
    logits = lavit_mlx.load(tmp_path / "mlx").llm.model(mx.array([ids]))
    assert max_rel(np.array(logits), expected.numpy()) <= 1e-4


def test_a_text_llama_grows_by_the_image_ids(folders, tmp_path):
    """model.language_model: a Hugging Face LLaMA of the text vocabulary grows by [IMG], [/IMG] and
    the codes, each new row near the mean of the text rows."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lavit_train.distributed import World
    from lavit_train.loop import Launch
    from lavit_train.sections import load_run_config
    from lavit_train.stages import build_stage

    text_llama = tmp_path / "llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(text_llama)
    shutil.copyfile(folders["text"] / "tokenizer.model", text_llama / "tokenizer.model")
    config = write_config(tmp_path / "llm.yaml", {
        "stage": "llm", "out": str(tmp_path / "run"),
        "model": {"init": str(folders["mlx"]), "language_model": str(text_llama), "grow_noise": 0.0},
        "data": {"train": str(folders["data"]), "image_size": 28},
        "train": {"steps": 2, "warmup_steps": 1},
    })
    stage = build_stage(load_run_config(None, config), World(), Launch(tensorboard=False))
    rows = stage.module.llm.get_input_embeddings().weight.detach()
    assert rows.shape[0] == 256 + 2 + builders.CODEBOOK and stage.token_ids.visual_offset == 258
    assert torch.allclose(rows[256:], rows[:256].mean(dim=0).expand(2 + builders.CODEBOOK, -1), atol=1e-6)


def test_pixel_stage_loss_falls(folders, tmp_path):
    config = write_config(tmp_path / "pixel.yaml", {
        "stage": "pixel",
        "model": {"init": str(folders["mlx"]), "vae": str(folders["pixel"]), "unet": builders.UNET,
                  "ema": {"decay": 0.9}},
        "data": {"train": str(folders["data"]), "image_size": 16, "shuffle_buffer": 4, "lines_per_shard": 10},
        "train": {"steps": 10, "batch_size": 8, "learning_rate": 2e-3, "warmup_steps": 1, "log_every": 1,
                  "save_every": 0, "gradient_checkpointing": True},
        "loss": {"snr_gamma": 5.0, "cond_dropout": 0.2},
    })
    out = tmp_path / "run"
    checked(run_driver(config, out))
    values = losses(out)
    assert sum(values[-3:]) / 3 < 0.8 * sum(values[:3]) / 3, values
    pixel = out / "model" / "highres_pixel_decoding"
    assert (pixel / "unet" / "diffusion_pytorch_model.bin").is_file()
    assert (pixel / "vae" / "config.json").is_file() and (pixel / "scheduler" / "scheduler_config.json").is_file()
    assert (out / "model" / "visual_tokenizer" / "highres_tokenizer_decoder.bin").is_file()
    import lavit_mlx
    from lavit_convert.to_mlx import ConvertOptions, convert_to_mlx

    report = convert_to_mlx(out / "model", tmp_path / "mlx", ConvertOptions(vision_heads=builders.HEADS))
    assert "highres_pixel" in report.components
    assert lavit_mlx.load(tmp_path / "mlx").pixel_decoder(True) is not None


def test_an_identity_understanding_merger_passes_the_features_through(folders):
    import torch

    from lavit_train.stages.llm import build_understanding

    torch.manual_seed(0)
    identity = build_understanding(folders["release"], 24, builders.HEADS, 0.02, "identity")
    copied = build_understanding(folders["release"], 24, builders.HEADS, 0.02)
    width = identity.vit_proj.weight.shape[1]
    features = torch.randn(2, 16, width)
    keep = (torch.rand(2, 16) < 0.4).float()
    with torch.no_grad():
        merged = identity.causal_encoder(features, keep)
        assert torch.allclose(merged, identity.causal_encoder.norm(features), atol=1e-5)
        assert not torch.allclose(copied.causal_encoder(features, keep), merged, atol=1e-3)
