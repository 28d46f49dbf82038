"""tests/parity.py on the official fixture and on fixtures of other sizes and dtypes."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from support import run_parity

# Keys the built components must pass (later issues add to this list).
TOKENIZER_KEYS = [
    "pixel_values", "encoder_features", "selector_logprobs", "keep_mask", "merged_features",
    "code_ids", "quantized", "understanding_visual_embeds",
    "json:num_tokens", "json:code_ids", "json:llm_token_ids", "json:keep_margin", "json:code_margin",
    "json:config",
]




def test_official_tiny(official_tiny):
    """Every key of the fixture passes, with no SKIP."""
    proc, status = run_parity(official_tiny)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(status) >= 31 and set(status.values()) == {"ok"}, proc.stdout
    for key in TOKENIZER_KEYS:
        assert status.get(key) == "ok", f"{key}: {status.get(key)}\n{proc.stdout}"
    # every line has the documented format; inputs are marked and counted apart
    inputs = {"llm_generation_input_ids", "unet_latents", "lowres_unet_mask", "highres_time_ids"}
    for line in proc.stdout.splitlines():
        if line.startswith("#"):
            continue
        if line.split()[0] in inputs:
            assert " ok input  # used as given, not compared" in line, line
        else:
            assert " max_abs=" in line and " max_rel=" in line, line
    assert proc.stdout.strip().splitlines()[-1].startswith("# 31 ok (27 compared, 4 inputs used as given), 0 FAIL")


def test_skip_needs_allow_skip(official_tiny):
    proc, status = run_parity(official_tiny)
    expected = 1 if "SKIP" in status.values() else 0
    assert proc.returncode == expected, proc.stdout


def _fixture_copy(official_tiny: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "fixture"
    dest.mkdir()
    (dest / "checkpoint").symlink_to(official_tiny / "checkpoint")
    for name in ("input.png", "expected.json"):
        shutil.copy(official_tiny / name, dest / name)
    shutil.copy(official_tiny / "expected.safetensors", dest / "expected.safetensors")
    return dest


def test_unknown_key_fails(official_tiny, tmp_path):
    fixture = _fixture_copy(official_tiny, tmp_path)
    tensors = load_file(str(fixture / "expected.safetensors"))
    tensors["something_new"] = np.zeros(3, np.float32)
    save_file(tensors, str(fixture / "expected.safetensors"))
    proc, status = run_parity(fixture, "--allow-skip")
    assert proc.returncode == 1
    assert status["something_new"] == "FAIL"


def test_wrong_reference_fails(official_tiny, tmp_path):
    fixture = _fixture_copy(official_tiny, tmp_path)
    tensors = load_file(str(fixture / "expected.safetensors"))
    tensors["merged_features"] = tensors["merged_features"] * (1 + 1e-3)
    save_file(tensors, str(fixture / "expected.safetensors"))
    proc, status = run_parity(fixture, "--allow-skip")
    assert proc.returncode == 1
    assert status["merged_features"] == "FAIL"
    assert status["encoder_features"] == "ok"


def test_not_a_fixture(tmp_path):
    proc, _ = run_parity(tmp_path)
    assert proc.returncode == 2
    assert "not a fixture folder" in proc.stderr


@pytest.mark.parametrize("dtype,width,heads", [("bfloat16", 64, 4), ("float16", 48, 3)])
def test_generated_fixture(tmp_path, dtype, width, heads):
    """Another size, head count, weight dtype and image: parity.py works unchanged."""
    import torch

    from support.fixture_builder import build_fixture
    from lavit_train.tiny import TinySpec

    spec = TinySpec(width=width, heads=heads, eva_depth=3, merger_depth=2, dtype=getattr(torch, dtype),
                    llm_hidden=40, seed=heads)
    fixture = build_fixture(tmp_path / "fixture", spec, image_seed=heads)
    proc, status = run_parity(fixture, "--allow-skip")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for key in TOKENIZER_KEYS:
        assert status.get(key) == "ok", f"{key}\n{proc.stdout}"
