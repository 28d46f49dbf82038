"""Stage 1 in PyTorch: the loss falls, a SIGKILLed run resumes to the same weights bit for bit
(data-loader workers included), and the run folder holds what the docs promise."""

from __future__ import annotations

import json

import torch

from harness import checked, run_driver


def losses(out):
    return [r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r]


def test_loss_falls_and_the_run_folder_is_complete(tokenizer_config, tmp_path):
    out = tmp_path / "run"
    checked(run_driver(tokenizer_config, out, "--set", "train.steps=16", "--set", "train.save_every=8"))
    values = losses(out)
    assert len(values) == 16
    assert sum(values[-3:]) / 3 < 0.8 * sum(values[:3]) / 3, values
    record = json.loads((out / "log.jsonl").read_text().splitlines()[0])
    for key in ("tokens_per_image", "keep_fraction", "perplexity", "codes_used", "learning_rate", "samples_per_s"):
        assert key in record
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000008", "step-00000016"]
    exported = sorted(p.name for p in (out / "model" / "visual_tokenizer").iterdir())
    assert exported == ["eva_vitg_psz14.bin", "highres_tokenizer_decoder.bin", "tokenizer_encoder.bin"]


def test_sigkill_then_resume_gives_the_same_weights(tokenizer_config, tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    checked(run_driver(tokenizer_config, whole, "--workers", "2"))
    result = run_driver(tokenizer_config, killed, "--workers", "2", "--kill-at", "5")
    assert result.returncode == -9, result.stderr[-2000:]
    assert not (killed / "final.pt").exists()
    assert (killed / "checkpoints" / "step-00000004").is_dir()
    checked(run_driver(tokenizer_config, killed, "--workers", "2"))
    expected, got = torch.load(whole / "final.pt"), torch.load(killed / "final.pt")
    assert expected.keys() == got.keys() and len(expected) > 10
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    assert losses(whole) == losses(killed)
