"""`lavit convert`: the MLX folder format, the way back to PyTorch, and the safety rules."""

from __future__ import annotations

import json
import os
import shutil

import mlx.core as mx
import numpy as np
import pytest
import torch

import lavit_mlx
from support import replace_file
from lavit_convert import to_mlx
from lavit_convert.to_mlx import ConvertOptions, convert_to_mlx
from lavit_convert.to_torch import convert_to_torch
from lavit_convert.writer import PARTIAL_PREFIX
from lavit_mlx.errors import CheckpointError, LaVITError
from support import run_parity


@pytest.fixture(scope="module")
def converted(official_checkpoint, tmp_path_factory):
    """official-tiny converted once to the MLX folder format (float16, as stored)."""
    out = tmp_path_factory.mktemp("convert") / "mlx"
    convert_to_mlx(official_checkpoint, out, ConvertOptions(vision_heads=2))
    return out


def all_tensors(folder):
    """{(file, or its folder for shards) : key -> array} of every safetensors file."""
    tensors = {}
    for path in sorted(folder.rglob("*.safetensors")):
        where = path.parent.relative_to(folder) if "-of-" in path.name else path.relative_to(folder)
        for key, value in mx.load(str(path)).items():
            tensors[f"{where}:{key}"] = value
    return tensors


def llm_weights(folder):
    weights = {}
    for path in sorted((folder / "language_model").glob("model*.safetensors")):
        weights.update(mx.load(str(path)))
    return weights


def test_layout_and_config(converted):
    config = json.loads((converted / "config.json").read_text())
    assert config["format"] == "lavit-mlx" and config["format_version"] == 2
    assert config["vision"]["num_heads"] == 2 and config["vision"]["width"] == 96
    assert config["tokenizer"]["num_heads"] == 2 and config["understanding_dim"] == 64
    assert config["token_ids"]["num_text"] == 32000
    assert config["llm"]["hidden_size"] == 64 and config["highres_pixel"]["unet"]["cross_attention_dim"] == 2048
    assert config["lowres_pixel"]["scheduler"]["_class_name"] == "DDIMScheduler"
    # the stored config is the one the model is built from
    from lavit_mlx.config import LaVITConfig

    assert lavit_mlx.load(converted).config == LaVITConfig.from_dict(config)
    for name in ("eva", "tokenizer", "understanding", "lowres_decoder", "highres_decoder", "codebook"):
        assert (converted / f"{name}.safetensors").is_file()
    # one output shard per input shard (the fixture's LLM has two)
    assert (converted / "language_model" / "model.safetensors.index.json").is_file()
    assert len(list((converted / "language_model").glob("model-*-of-00002.safetensors"))) == 2
    assert (converted / "highres_pixel_decoding" / "unet" / "diffusion_mlx_model.safetensors").is_file()
    assert (converted / "pixel_decoding" / "uncond_embeddings.safetensors").is_file()
    model = lavit_mlx.load(converted)
    assert model.checkpoint.kind == "mlx" and "MLX folder" in model.checkpoint.describe()
    assert list(model.checkpoint.verify()) == []
    assert not any(p.name.startswith(PARTIAL_PREFIX) for p in converted.parent.iterdir())


def test_parity_on_converted_folder(official_tiny, converted, tmp_path):
    fixture = tmp_path / "fixture"
    fixture.mkdir()
    (fixture / "checkpoint").symlink_to(converted)
    for name in ("input.png", "expected.json", "expected.safetensors"):
        shutil.copy(official_tiny / name, fixture / name)
    proc, status = run_parity(fixture, "--allow-skip")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "FAIL" not in status.values()
    assert status["json:code_ids"] == "ok" and status["understanding_visual_embeds"] == "ok"


def test_mlx_lm_loads_the_language_model(converted):
    import mlx_lm

    model, tokenizer = mlx_lm.load(str(converted / "language_model"))
    text = mlx_lm.generate(model, tokenizer, prompt="a photo of", max_tokens=4, verbose=False)
    assert isinstance(text, str)


def test_round_trip_is_bit_exact(converted, official_checkpoint, tmp_path):
    back = tmp_path / "torch"
    convert_to_torch(converted, back)
    # official keys and layout, readable with weights_only=True
    for relative in ("visual_tokenizer/eva_vitg_psz14.bin", "visual_tokenizer/tokenizer_encoder.bin",
                     "highres_pixel_decoding/unet/diffusion_pytorch_model.bin"):
        ours = torch.load(back / relative, weights_only=True)
        theirs = torch.load(official_checkpoint / relative, weights_only=True)
        assert set(ours) == set(theirs)
        for key in theirs:
            assert ours[key].shape == theirs[key].shape and torch.equal(ours[key], theirs[key]), key
    again = tmp_path / "mlx-again"
    convert_to_mlx(back, again, ConvertOptions(vision_heads=2))
    first, second = all_tensors(converted), all_tensors(again)
    first = {k: v for k, v in first.items() if not k.startswith("language_model")}
    second = {k: v for k, v in second.items() if not k.startswith("language_model")}
    first.update({f"llm:{k}": v for k, v in llm_weights(converted).items()})
    second.update({f"llm:{k}": v for k, v in llm_weights(again).items()})
    assert set(first) == set(second)
    for key, value in first.items():
        assert value.dtype == second[key].dtype and mx.array_equal(value, second[key]), key


def test_quantized_conversion(official_checkpoint, tmp_path):
    out = tmp_path / "q4"
    report = convert_to_mlx(official_checkpoint, out, ConvertOptions(
        vision_heads=2, quantize=4, quantize_vision=True, components=["eva", "tokenizer", "llm"]))
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["llm"] == {"bits": 4, "group_size": 64}
    assert config["quantization"]["vision"] == {"bits": 8, "group_size": 64}
    weights = llm_weights(out)
    assert "model.layers.0.mlp.down_proj.scales" in weights and "lm_head.scales" in weights
    # widths the group size does not divide stay in float and are reported
    assert "token_predictor.out_conv.4" in report.unquantized["tokenizer"]
    model = lavit_mlx.load(out)
    tokens = model.tokenize([official_checkpoint.parent / "input.png"])[0]
    assert tokens.num_tokens > 0
    # the 4-bit LLM loads quantized and generates
    from lavit_mlx.image_tokens import ImageTokenDecoding, generate_image_tokens

    lm = model.llm
    assert "QuantizedLinear" in type(lm.model.layers[0].mlp.down_proj).__name__
    generated = generate_image_tokens(lm, [model.text_tokenizer.encode("a red car")],
                                      ImageTokenDecoding(max_new_tokens=24), seed=0)
    assert 20 <= len(generated[0]) <= 24
    logits = model.llm(input_ids=mx.array([[1, 319, 2654]]))
    assert logits.shape == (1, 3, 48386) and bool(mx.all(mx.isfinite(logits)))


def test_components_and_dtype(official_checkpoint, tmp_path):
    out = tmp_path / "t2i"
    convert_to_mlx(official_checkpoint, out, ConvertOptions(
        vision_heads=2, dtype="bfloat16", components=["highres_decoder"]))
    assert not (out / "eva.safetensors").exists() and (out / "codebook.safetensors").is_file()
    assert mx.load(str(out / "highres_decoder.safetensors"))["in_proj.weight"].dtype == mx.bfloat16
    model = lavit_mlx.load(out)
    prompt, pooled = model.decode_codes([np.array([5, 6, 7])])
    assert prompt.shape == (1, 256, 2048)
    with pytest.raises(CheckpointError, match="missing eva.safetensors"):
        model.eva


def test_refuses_to_overwrite(official_checkpoint, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    options = ConvertOptions(vision_heads=2, components=["lowres_decoder"])
    with pytest.raises(LaVITError, match="already exists"):
        convert_to_mlx(official_checkpoint, out, options)
    assert (out / "keep.txt").read_text() == "mine"
    options.force = True
    convert_to_mlx(official_checkpoint, out, options)
    assert not (out / "keep.txt").exists() and (out / "lowres_decoder.safetensors").is_file()


def test_interrupted_conversion_leaves_nothing(official_checkpoint, tmp_path, monkeypatch):
    calls = {"n": 0}
    original = to_mlx.ShardWriter.add_group

    def fail_later(self, arrays):
        calls["n"] += 1
        if calls["n"] > 40:
            raise KeyboardInterrupt
        return original(self, arrays)

    monkeypatch.setattr(to_mlx.ShardWriter, "add_group", fail_later)
    with pytest.raises(KeyboardInterrupt):
        convert_to_mlx(official_checkpoint, tmp_path / "out", ConvertOptions(vision_heads=2))
    assert list(tmp_path.iterdir()) == []


def test_checks_everything_before_writing(checkpoint_copy, tmp_path):
    ckpt = checkpoint_copy()
    path = ckpt / "pixel_decoding" / "unet" / "diffusion_pytorch_model.bin"
    state = torch.load(path, weights_only=True)
    state.pop(next(iter(state)))
    replace_file(path, lambda p: torch.save(state, p))
    with pytest.raises(CheckpointError, match="missing key"):
        convert_to_mlx(ckpt, tmp_path / "out", ConvertOptions(vision_heads=2))
    assert not (tmp_path / "out").exists()
    assert not any(p.name.startswith(PARTIAL_PREFIX) for p in tmp_path.iterdir())


def test_refuses_unsafe_pickles(checkpoint_copy, tmp_path):
    ckpt = checkpoint_copy()

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    replace_file(ckpt / "visual_tokenizer" / "tokenizer_decoder.bin",
                 lambda p: torch.save({"in_proj.weight": Payload()}, p))
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        convert_to_mlx(ckpt, tmp_path / "out", ConvertOptions(vision_heads=2))
    assert not (tmp_path / "out").exists()


def test_hub_offline(official_checkpoint, tmp_path, monkeypatch):
    from lavit_convert.hub import resolve_source

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(LaVITError, match="not in the Hugging Face cache and HF_HUB_OFFLINE is set"):
        resolve_source("someone/LaVIT-nothing", ["highres_decoder"])
    # a cached snapshot resolves without the network
    repo = tmp_path / "hub" / "models--someone--LaVIT-tiny"
    revision = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    snapshot = repo / "snapshots" / revision
    shutil.copytree(official_checkpoint, snapshot)
    folder = resolve_source("someone/LaVIT-tiny", ["highres_decoder"])
    assert (folder / "visual_tokenizer" / "highres_tokenizer_decoder.bin").is_file()


def test_cli(cli, official_checkpoint, tmp_path):
    out = tmp_path / "cli-out"
    code, stdout, stderr = cli("convert", official_checkpoint, out, "--vision-heads", "2",
                               "--components", "tokenizer,highres_decoder")
    assert code == 0, stderr
    assert "wrote" in stdout and (out / "tokenizer.safetensors").is_file()
    code, stdout, stderr = cli("convert", official_checkpoint, out, "--vision-heads", "2")
    assert code == 1 and "already exists" in stderr and "Traceback" not in stderr
    code, _, stderr = cli("convert", official_checkpoint, tmp_path / "x", "--components", "eva,wings")
    assert code == 1 and "unknown component 'wings'" in stderr
    code, _, stderr = cli("convert", official_checkpoint, tmp_path / "x", "--quantize", "3")
    assert code == 2 and "--quantize" in stderr and "'3' is not one of '4', '8'" in stderr
    code, _, stderr = cli("convert", "nobody/nothing-here", tmp_path / "x", env={"HF_HUB_OFFLINE": "1",
                          "HF_HUB_CACHE": str(tmp_path / "empty-cache")})
    assert code == 1 and "HF_HUB_OFFLINE" in stderr
    code, stdout, stderr = cli("info", "--model", out, "--verify")
    assert code == 0 and "all files match" in stdout, stderr
    (out / "tokenizer.safetensors").write_bytes(b"tampered")
    code, _, stderr = cli("info", "--model", out, "--verify")
    assert code == 1 and "tokenizer.safetensors (checksum mismatch)" in stderr
