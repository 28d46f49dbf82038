"""Loading the released layout: strict keys and shapes, known extras, clear errors."""

from __future__ import annotations

import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
import torch

import lavit_mlx
from support import replace_file
from lavit_mlx.errors import CheckpointError
from lavit_mlx.models.eva_vit import EVAVisionTransformer
from lavit_mlx.weights import read_weights


def edit_state(path, edit):
    state = torch.load(path, weights_only=True)
    edit(state)
    replace_file(path, lambda p: torch.save(state, p))


def test_loads_and_reports(official_checkpoint):
    model = lavit_mlx.load(official_checkpoint, vision_heads=2)
    assert model.loaded == []  # nothing read until used
    assert model.eva.config.width == 96 and model.eva.config.depth == 2
    assert model.tokenizer.config.merger_depth == 2
    assert set(model.loaded) == {"eva", "tokenizer"}
    model.unload("eva")
    assert model.loaded == ["tokenizer"]
    info = model.describe()
    assert "32000" in info["token ids"] and info["vision heads"] == "2 (given)"


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda s: s.pop("causal_encoder.blocks.1.mlp.fc2.bias"), "missing key 'causal_encoder.blocks.1.mlp.fc2.bias'"),
        (lambda s: s.update({"mystery.weight": torch.zeros(3)}), "unexpected key 'mystery.weight'"),
        (lambda s: s.update({"encode_task_layer.2.weight": torch.zeros(16, 96)}),
         r"'encode_task_layer.2.weight' has shape \(16, 96\), the model expects \(32, 96\)"),
    ],
)
def test_strict_tokenizer_file(checkpoint_copy, edit, message):
    ckpt = checkpoint_copy()
    path = ckpt / "visual_tokenizer" / "tokenizer_encoder.bin"
    edit_state(path, edit)
    with pytest.raises(CheckpointError, match=message) as info:
        lavit_mlx.load(ckpt, vision_heads=2).tokenizer
    assert "tokenizer_encoder.bin" in str(info.value)


def test_strict_eva_file(checkpoint_copy):
    ckpt = checkpoint_copy()
    edit_state(ckpt / "visual_tokenizer" / "eva_vitg_psz14.bin", lambda s: s.pop("blocks.1.attn.q_bias"))
    with pytest.raises(CheckpointError, match="eva_vitg_psz14.bin: missing key 'blocks.1.attn.q_bias'"):
        lavit_mlx.load(ckpt, vision_heads=2).eva


def test_known_extras_are_accepted(checkpoint_copy, official_checkpoint):
    ckpt = checkpoint_copy()
    tokenizer = torch.load(official_checkpoint / "visual_tokenizer" / "tokenizer_encoder.bin", weights_only=True)
    # vit_proj next to the tokenizer; a copy of the selector next to the merger
    edit_state(ckpt / "visual_tokenizer" / "tokenizer_encoder.bin",
               lambda s: s.update({"vit_proj.weight": torch.zeros(64, 96), "vit_proj.bias": torch.zeros(64)}))
    selector = {k: v for k, v in tokenizer.items() if k.startswith("token_predictor.")}
    selector["token_predictor.out_conv.4.bias"] = torch.tensor([5.0, -5.0], dtype=torch.float16)
    edit_state(ckpt / "language_model" / "visual_weight.bin", lambda s: s.update(selector))
    model = lavit_mlx.load(ckpt, vision_heads=2)
    assert model.tokenizer is not None
    # the official code loads visual_weight.bin over the tokenizer: its selector wins
    bias = np.array(model.understanding.token_predictor.out_conv[4].bias)
    np.testing.assert_allclose(bias, [5.0, -5.0])


def test_unknown_key_in_visual_weight(checkpoint_copy):
    ckpt = checkpoint_copy()
    edit_state(ckpt / "language_model" / "visual_weight.bin", lambda s: s.update({"llm_head.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match="unexpected key 'llm_head.weight'"):
        lavit_mlx.load(ckpt, vision_heads=2).understanding


def test_missing_file(checkpoint_copy):
    ckpt = checkpoint_copy()
    (ckpt / "visual_tokenizer" / "eva_vitg_psz14.bin").unlink()
    model = lavit_mlx.load(ckpt, vision_heads=2)
    with pytest.raises(CheckpointError, match="missing visual_tokenizer/eva_vitg_psz14.bin"):
        model.eva


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        lavit_mlx.load(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="not a LaVIT checkpoint folder"):
        lavit_mlx.load(tmp_path)


def test_heads_must_divide_width(official_checkpoint):
    with pytest.raises(CheckpointError, match="vision heads 5 does not divide"):
        lavit_mlx.load(official_checkpoint, vision_heads=5).eva


def test_corrupt_and_unsafe_pickles(tmp_path):
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        read_weights(bad)

    class Payload:
        def __reduce__(self):
            return (print, ("code ran",))

    unsafe = tmp_path / "unsafe.bin"
    torch.save({"x": torch.zeros(2), "y": Payload()}, unsafe)
    with pytest.raises(CheckpointError, match=r"refused to unpickle: the file holds a Python object \(print\)"):
        read_weights(unsafe)


def test_bfloat16_pickles(tmp_path):
    path = tmp_path / "w.bin"
    values = torch.tensor([1.5, -2.25, 3.0e-3], dtype=torch.bfloat16)
    torch.save({"w": values}, path)
    weights = read_weights(path)
    assert weights["w"].dtype == mx.bfloat16
    np.testing.assert_array_equal(np.array(weights["w"].astype(mx.float32)), values.float().numpy())


def test_sanitize_is_idempotent(official_checkpoint):
    weights = read_weights(official_checkpoint / "visual_tokenizer" / "eva_vitg_psz14.bin")
    from lavit_mlx.config import EVAConfig

    model = EVAVisionTransformer(EVAConfig(width=96, depth=2, num_heads=2))
    once = model.sanitize(weights)
    twice = model.sanitize(once)
    assert once["patch_embed.proj.weight"].shape == (96, 14, 14, 3)
    assert all(mx.array_equal(once[k], twice[k]) for k in once)


def test_without_torch(official_checkpoint):
    """lavit_mlx imports without torch and says how to read .bin files."""
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import lavit_mlx, lavit_mlx.lavit, lavit_mlx.models.eva_vit, lavit_mlx.models.visual_tokenizer\n"
        "from lavit_mlx.errors import MissingDependencyError\n"
        "try:\n"
        f"    lavit_mlx.load({str(official_checkpoint)!r}, vision_heads=2).eva\n"
        "except MissingDependencyError as e:\n    print('MESSAGE', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "MESSAGE" in out.stdout and "pip install 'lavit-mlx[torch]'" in out.stdout


def test_config_module_needs_no_mlx():
    code = "import sys; sys.modules['mlx'] = None; import lavit_mlx.config, lavit_mlx.layout; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr
