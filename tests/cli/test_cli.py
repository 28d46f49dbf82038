"""The `lavit` command: help, info, tokenize, and one-line errors for bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from support import assert_one_line_error, png_header_only, replace_file

COMMANDS = ["info", "tokenize"]


def test_version_and_help(cli):
    code, out, _ = cli("--version")
    assert code == 0 and out.startswith("lavit-mlx ")
    for command in COMMANDS:
        code, out, err = cli(command, "--help")
        assert code == 0 and "Usage: lavit " + command in out, err


def test_info(cli):
    code, out, err = cli("info")
    assert code == 0, err
    for label in ("lavit-mlx", "mlx", "device", "blas"):
        assert any(line.startswith(label) for line in out.splitlines()), out


def test_info_warns_without_openblas(cli):
    code, out, err = cli("info", env={"LAVIT_NO_OPENBLAS": "1"})
    assert code == 0
    assert "reference BLAS" in out
    assert "warning:" in err


def test_info_model(cli, official_checkpoint):
    code, out, err = cli("info", "--model", official_checkpoint, "--vision-heads", "2")
    assert code == 0, err
    assert "[IMG]=32000" in out and "released LaVIT layout" in out


def test_tokenize_json(cli, official_tiny):
    expected = json.loads((official_tiny / "expected.json").read_text())
    image = official_tiny / "input.png"
    code, out, err = cli("tokenize", image, image, "--model", official_tiny / "checkpoint", "--vision-heads", "2", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert [r["image"] for r in result] == [str(image)] * 2
    assert result[0]["num_tokens"] == expected["num_tokens"]
    assert result[0]["codes"] == expected["code_ids"]


def test_tokenize_text_and_sampling(cli, official_tiny):
    args = ["tokenize", official_tiny / "input.png", "--model", official_tiny / "checkpoint", "--vision-heads", "2"]
    code, out, err = cli(*args)
    assert code == 0 and "103 tokens" in out, err
    runs = [cli(*args, "--sample", "--seed", "3", "--json")[1] for _ in range(2)]
    assert runs[0] == runs[1]
    code, out, err = cli(*args, "--sample")
    assert code == 0 and "--seed" in err  # the random seed is printed for reproduction


def test_model_from_environment(cli, official_tiny):
    code, out, err = cli("tokenize", official_tiny / "input.png", "--vision-heads", "2",
                         env={"LAVIT_MODEL": str(official_tiny / "checkpoint")})
    assert code == 0, err
    code, out, err = cli("tokenize", official_tiny / "input.png", env={"LAVIT_MODEL": ""})
    assert code == 0 and "lavit-shapes-tiny (bundled)" in err, err  # no model given: the bundled one


def test_a_missing_bundled_model_is_a_one_line_error(monkeypatch, tmp_path):
    from lavit_mlx import zoo
    from lavit_mlx.errors import CheckpointError

    monkeypatch.setattr(zoo, "BUNDLED_MODEL", tmp_path / "absent")
    with pytest.raises(CheckpointError, match="bundled model is missing"):
        zoo.bundled_model()


@pytest.fixture
def bad_images(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.jpg").write_text("hello, I am text\n" * 10)
    (tmp_path / "huge.png").write_bytes(png_header_only(30000, 30000))
    full = tmp_path / "full.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8)).save(full)
    (tmp_path / "cut.png").write_bytes(full.read_bytes()[:300])
    return tmp_path


@pytest.mark.parametrize(
    "name,fragment",
    [("missing.png", "no such file"), ("empty.png", "file is empty"), ("notes.jpg", "not an image"),
     ("huge.png", "too large"), ("cut.png", "truncated or corrupt")],
)
def test_bad_images(cli, official_checkpoint, bad_images, name, fragment):
    code, out, err = cli("tokenize", bad_images / name, "--model", official_checkpoint, "--vision-heads", "2")
    assert_one_line_error(code, out, err, fragment, name)


def test_bad_checkpoints(cli, checkpoint_copy, official_tiny):
    image = official_tiny / "input.png"
    ckpt = checkpoint_copy("missing")
    (ckpt / "visual_tokenizer" / "tokenizer_encoder.bin").unlink()
    assert_one_line_error(*cli("tokenize", image, "-m", ckpt, "--vision-heads", "2"),
                          "missing visual_tokenizer/tokenizer_encoder.bin")

    for name, edit, fragment in [
        ("nokey", lambda s: s.pop("quantize.embedding.weight"), "missing key 'quantize.embedding.weight'"),
        ("extra", lambda s: s.update({"bogus": torch.zeros(1)}), "unexpected key 'bogus'"),
        ("shape", lambda s: s.update({"token_predictor.in_conv.1.bias": torch.zeros(7)}), "has shape (7,)"),
    ]:
        ckpt = checkpoint_copy(name)
        path = ckpt / "visual_tokenizer" / "tokenizer_encoder.bin"
        state = torch.load(path, weights_only=True)
        edit(state)
        replace_file(path, lambda p: torch.save(state, p))
        assert_one_line_error(*cli("tokenize", image, "-m", ckpt, "--vision-heads", "2"), fragment)

    assert_one_line_error(*cli("tokenize", image, "-m", image.parent / "nowhere"), "not found")
    assert_one_line_error(*cli("tokenize", image, "-m", official_tiny / "checkpoint", "--vision-heads", "7"),
                          "does not divide")


def test_bad_flags(cli, official_tiny):
    assert_one_line_error(*cli("tokenize", "--frobnicate"), "No such option")
    assert_one_line_error(*cli("tokenize"), "Missing argument")
    assert_one_line_error(*cli("tokenize", official_tiny / "input.png", "--batch-size", "0"), "--batch-size")
    assert_one_line_error(*cli("nonsense"), "No such command")
