"""Two processes under torchrun (gloo): DDP and FSDP2 (with activation checkpointing) give the
weights of one process on the same global batch; a checkpoint saved by DDP on 2 ranks resumes
on 1 rank and under FSDP2 on 3, with every sample of the epoch delivered exactly once."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from harness import checked, run_driver

pytestmark = pytest.mark.slow


def test_ddp_and_fsdp2_match_one_process(tokenizer_config, tmp_path):
    common = ["--global-batches", "--set", "train.steps=4", "--set", "loss.init_batches=0",
              "--set", "train.save_every=0"]
    checked(run_driver(tokenizer_config, tmp_path / "one", *common, "--set", "train.batch_size=8"))
    # activation checkpointing on the 2-process runs only: it must not change the result
    checked(run_driver(tokenizer_config, tmp_path / "two", *common, "--set", "train.batch_size=4",
                       "--set", "train.gradient_checkpointing=true", "--strategy", "ddp,fsdp", procs=2))
    expected = torch.load(tmp_path / "one" / "final.pt")
    for strategy in ("ddp", "fsdp"):
        got = torch.load(tmp_path / "two" / strategy / "final.pt")
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            if value.is_floating_point():
                # absolute: Adam turns the rounding noise of a gradient that should be 0 (the
                # key biases) into steps of up to lr; a wrong gradient moves by lr every step
                assert float((got[key] - value).abs().max()) < 1e-4, (strategy, key)
            else:
                assert torch.equal(got[key], value), (strategy, key)
        one = [r["loss"] for r in map(json.loads, (tmp_path / "one" / "log.jsonl").read_text().splitlines())
               if "loss" in r]
        two = [r["loss"] for r in map(json.loads, (tmp_path / "two" / strategy / "log.jsonl").read_text().splitlines())
               if "loss" in r]
        assert two == pytest.approx(one, rel=1e-4)


def epoch_zero(out, procs_files=None):
    uids = []
    for path in sorted(out.glob("samples-*.jsonl")):
        uids += [uid for uid, epoch in map(json.loads, path.read_text().splitlines()) if epoch == 0]
    return uids


def test_saved_on_two_ranks_resumes_on_one_and_three(tokenizer_config, tmp_path):
    first = tmp_path / "first"
    checked(run_driver(tokenizer_config, first, "--record", "--set", "train.steps=3", "--set",
                       "train.save_every=3", procs=2))
    before = epoch_zero(first)
    assert len(before) == 24 and len(set(before)) == 24
    for procs in (1, 3):
        resumed = tmp_path / f"on-{procs}"
        shutil.copytree(first, resumed)
        (resumed / "model").exists() and shutil.rmtree(resumed / "model")
        strategy = "fsdp" if procs == 3 else "ddp"
        result = checked(run_driver(tokenizer_config, resumed, "--record", "--set", "train.steps=9",
                                    "--strategy", strategy, procs=procs))
        assert "saved on 2 rank(s), now %d" % procs in result.stderr
        uids = epoch_zero(resumed)
        assert len(uids) == len(set(uids)), f"repeated on {procs}: {sorted(uids)}"
        assert sorted(uids) == list(range(40)), f"skipped on {procs}"
