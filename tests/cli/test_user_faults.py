"""What a new user hit (issue 8): each fault has a test that fails without its fix."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from support import assert_one_line_error

TINY = ["--vision-heads", "2"]


@pytest.fixture
def tiny_args(official_tiny):
    return ["-m", official_tiny / "checkpoint", *TINY]


# ------------------------------------------------------------------ 1, 4, 5, 6: options
def test_ratio_works_in_the_cli(cli, tiny_args, tmp_path, monkeypatch):
    """`--ratio` used to fail with 'give either --ratio or --width/--height' every time."""
    from lavit_mlx.generation import GenerationSettings

    settings = GenerationSettings(prompt="x", ratio="16:9", steps=1).resolved()
    assert (settings.height, settings.width) == (768, 1344) and settings.resolved() == settings


def test_options_are_checked_before_the_model_loads(cli, tmp_path):
    """A bad option fails at once, even with a model path that does not exist (nothing loads)."""
    nowhere = ["-m", tmp_path / "no-model"]
    for args, fragment in [
        (["generate", "-p", "x", "--scheduler", "plms"], "'plms' is not one of"),
        (["generate", "-p", "x", "--width", "64"], "--width needs --height"),
        (["generate", "-p", "x", "--width", "0", "--height", "64"], "--width"),
        (["generate", "-p", "x", "--width", "100", "--height", "64"], "--width 100: expected a multiple of 8"),
        (["generate", "-p", "x", "--ratio", "4:3", "--width", "64", "--height", "64"], "either --ratio"),
        (["generate", "-p", "x", "--seed", "-1"], "--seed"),
        (["generate", "-p", "x", "--seed", "99999999999999999999"], "--seed"),
        (["generate", "-p", "x", "--out", tmp_path / "missing-folder" / "x.png"], "does not exist"),
        (["generate", "-p", "x", "--out", tmp_path / "x.jpg"], "must be a .png"),
        (["generate", "-p", "<image> <image>", "--image", tmp_path / "a.png"], "placeholders"),
        (["generate", "-p", "x", "--image", tmp_path / "absent.png"], "no such file"),
        (["caption", tmp_path / "a.png", "--min-tokens", "20", "--max-tokens", "5"], "--min-tokens 20 is more than"),
        (["caption", tmp_path / "a.png", "--sample"], "--sample draws words one at a time: use it with --beams 1"),
        (["caption", tmp_path / "absent.png"], "no such file"),
        (["ask", tmp_path / "a.png", "  "], "the question is empty"),
        (["reconstruct", tmp_path / "absent.png"], "no such file"),
    ]:
        code, out, err = cli(*args, *nowhere)
        assert code != 0 and fragment in err, (args, err)
        assert "Traceback" not in err and "no-model" not in err, (args, err)
    existing = tmp_path / "exists.png"
    existing.write_bytes(b"x")
    code, _, err = cli("generate", "-p", "x", "--out", existing, *nowhere)
    assert code == 1 and "already exists" in err


# ------------------------------------------------------------------ 3: vision heads
def test_vision_heads_are_never_guessed_away_from_the_release_width(cli, official_tiny):
    ckpt = official_tiny / "checkpoint"
    assert_one_line_error(*cli("tokenize", official_tiny / "input.png", "-m", ckpt),
                          "not the release's 1408", "--vision-heads")
    code, out, err = cli("info", "--model", ckpt)
    assert code == 0, err
    assert "vision heads unknown: the width 96 is not the release's" in out
    code, out, _ = cli("info", "--model", ckpt, "--vision-heads", "2")
    assert "vision heads 2 (given)" in out


def test_convert_requires_heads_and_stores_them(cli, official_checkpoint, tmp_path):
    assert_one_line_error(*cli("convert", official_checkpoint, tmp_path / "a", "--components", "tokenizer"),
                          "--vision-heads")
    assert not (tmp_path / "a").exists()


# ------------------------------------------------------------------ 7: interrupted conversion
def _convert_process(src, out, env=None):
    return subprocess.Popen([sys.executable, "-m", "lavit_cli.cli", "convert", str(src), str(out), "--vision-heads",
                             "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def _wait_for_partial(parent: Path, timeout: float = 60.0) -> Path:
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = list(parent.glob(".lavit-partial-*"))
        if found:
            return found[0]
        time.sleep(0.05)
    raise AssertionError("the conversion never started writing")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_ctrl_c_leave_nothing(official_checkpoint, tmp_path, sig):
    proc = _convert_process(official_checkpoint, tmp_path / "out")
    _wait_for_partial(tmp_path)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "interrupted" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_sigkill_leftovers_are_removed_by_the_next_conversion(official_checkpoint, tmp_path):
    proc = _convert_process(official_checkpoint, tmp_path / "out")
    partial = _wait_for_partial(tmp_path)
    proc.kill()
    proc.wait(timeout=30)
    assert partial.exists() and str(proc.pid) in partial.name  # recognisable: named with its process id
    again = _convert_process(official_checkpoint, tmp_path / "out")
    again.communicate(timeout=300)
    assert again.returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_live_conversion_is_not_treated_as_a_leftover(tmp_path):
    from lavit_convert.writer import remove_stale_partials

    live = tmp_path / f".lavit-partial-out-{os.getpid()}-abc"
    dead = tmp_path / ".lavit-partial-out-999999999-abc"
    live.mkdir()
    dead.mkdir()
    assert remove_stale_partials(tmp_path) == [dead]
    assert live.exists() and not dead.exists()


# ------------------------------------------------------------------ 8: messages
def test_corrupt_mlx_config_is_named(cli, tmp_path, official_tiny):
    folder = tmp_path / "mlx"
    folder.mkdir()
    (folder / "config.json").write_text("{ not json")
    (folder / "manifest.json").write_text("{}")
    assert_one_line_error(*cli("tokenize", official_tiny / "input.png", "-m", folder),
                          "config.json", "not valid JSON")


def test_writing_torch_without_torch_says_writing(tmp_path):
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from lavit_convert.torch_io import require_torch\n"
        "from lavit_mlx.errors import LaVITError\n"
        "try:\n    require_torch('writing')\nexcept LaVITError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout
    assert out.startswith("writing PyTorch checkpoints (--to torch) needs torch")


def test_quantization_that_quantizes_nothing_is_refused(cli, official_checkpoint, tmp_path):
    # the tiny LLM is 64 wide: a group of 128 divides none of its layers
    assert_one_line_error(*cli("convert", official_checkpoint, tmp_path / "q", "--components", "llm",
                               "--quantize", "4", "--group-size", "128"), "--group-size 128", "nothing would be")
    assert not (tmp_path / "q").exists()


def test_dequantizing_to_torch_says_so(cli, official_checkpoint, tmp_path):
    code, out, err = cli("convert", official_checkpoint, tmp_path / "q", "--components", "llm", "--quantize", "4",
                         "--group-size", "32")
    assert code == 0, err
    code, out, err = cli("convert", tmp_path / "q", tmp_path / "back", "--to", "torch")
    assert code == 0, err
    assert "stored 4-bit" in err and "dequantized" in err


# ------------------------------------------------------------------ 9: one bad image in a batch
def test_one_bad_image_does_not_lose_the_others(cli, tiny_args, official_tiny, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    good = official_tiny / "input.png"
    for command in ("caption", "tokenize"):
        extra = ["--max-tokens", "3"] if command == "caption" else []
        code, out, err = cli(command, good, bad, *tiny_args, *extra)
        assert code == 1 and str(good) in out and "Traceback" not in err
        assert f"error: {bad}: not an image" in err
        code, out, err = cli(command, good, bad, *tiny_args, *extra, "--json")
        entries = json.loads(out)
        assert code == 1 and entries[1] == {"image": str(bad), "error": f"{bad}: not an image, or a format PIL cannot read"}
        assert "error" not in entries[0]


# ------------------------------------------------------------------ 10: progress, seeds, metadata
def test_generation_output_without_a_terminal(cli, tiny_args, tmp_path):
    out = tmp_path / "g.png"
    code, stdout, err = cli("generate", "-p", "a red car", *tiny_args, "--width", "32", "--height", "32",
                            "--steps", "2", "-n", "2", "--out", out)
    assert code == 0, err
    seed = int(err.split("seed ", 1)[1].split()[0])  # the drawn seed is printed
    for label in ("image tokens (LLM)", "VQ decoder", "denoising (UNet)", "VAE decode"):
        assert any(line.startswith(label + ":") for line in err.splitlines()), err  # one plain line per stage
    assert "wrote 2 image(s) of 32x32" in err and f"seed {seed}..{seed + 1}" in err
    first, second = (Image.open(tmp_path / f"g-{i}.png") for i in (1, 2))
    assert first.text["seed"] == str(seed) and second.text["seed"] == str(seed + 1)
    record = json.loads(second.text["lavit"])
    assert record["model"] == str(tiny_args[1]) and record["lavit_version"] and record["image_index"] == 1
    # image 2 made again alone from its own seed
    code, _, err = cli("generate", "-p", "a red car", *tiny_args, "--width", "32", "--height", "32", "--steps", "2",
                       "--seed", str(seed + 1), "--out", tmp_path / "again.png")
    assert code == 0, err
    # the same seed and path; a batch of 1 and of 2 may round differently in BLAS (seen on
    # OpenBLAS's Haswell kernel), so the pixels agree to a level, not always to the bit
    again = np.asarray(Image.open(tmp_path / "again.png")).astype(int)
    assert np.abs(np.asarray(second).astype(int) - again).max() <= 2


def test_reconstruction_metadata_has_no_llm_settings(cli, tiny_args, official_tiny, tmp_path):
    code, _, err = cli("reconstruct", official_tiny / "input.png", *tiny_args, "--width", "32", "--height", "32",
                       "--steps", "1", "--out", tmp_path / "r.png", "--seed", "4")
    assert code == 0, err
    record = json.loads(Image.open(tmp_path / "r.png").text["lavit"])
    assert record["task"] == "reconstruction" and record["seed"] == 4
    assert not {"llm_guidance", "top_k", "max_new_tokens", "prompt"} & set(record)


# ------------------------------------------------------------------ 11: help
def test_help_shows_choices_and_defaults(cli):
    code, out, _ = cli("generate", "--help")
    assert code == 0
    for fragment in ("<highres|lowres>", "<ddim|euler|dpm++2m>", "<1:1|4:3|3:2|16:9|2:3|3:4>", "<4|8>",
                     "25 highres, 50 lowres", "7.0 highres, 5.0 lowres", "1024x1024", "MLX folder",
                     "16 for the release's widths"):
        assert fragment in " ".join(out.split()), fragment
    assert "(released layout)" not in out
