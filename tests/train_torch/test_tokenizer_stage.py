"""Stage 1 in PyTorch: the loss falls, a SIGKILLed run resumes to the same weights bit for bit
(data-loader workers included), the run folder holds what the docs promise, and the export
converts to MLX (`lavit_convert.to_mlx`) with the same outputs as the PyTorch modules."""

from __future__ import annotations

import json

import pytest
import torch

import builders
from harness import checked, run_driver


def losses(out):
    return [r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r]


def test_loss_falls_and_the_run_folder_is_complete(tokenizer_run):
    out = tokenizer_run
    values = losses(out)
    assert len(values) == 16
    assert sum(values[-3:]) / 3 < 0.8 * sum(values[:3]) / 3, values
    record = json.loads((out / "log.jsonl").read_text().splitlines()[0])
    for key in ("tokens_per_image", "keep_fraction", "perplexity", "codes_used", "learning_rate", "samples_per_s"):
        assert key in record
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000008", "step-00000016"]
    exported = sorted(p.name for p in (out / "model" / "visual_tokenizer").iterdir())
    assert exported == ["eva_vitg_psz14.bin", "highres_tokenizer_decoder.bin", "tokenizer_encoder.bin"]


@pytest.mark.slow
def test_sigkill_during_async_saves_then_resume_gives_the_same_weights(tokenizer_config, tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    checked(run_driver(tokenizer_config, whole, "--workers", "2"))
    # asynchronous saves: step 4's folder is renamed only when the next save begins, so the kill
    # leaves it partial and the run resumes from step 2
    result = run_driver(tokenizer_config, killed, "--workers", "2", "--kill-at", "5", "--async-save")
    assert result.returncode == -9, result.stderr[-2000:]
    assert not (killed / "final.pt").exists()
    assert [p.name for p in (killed / "checkpoints").iterdir() if p.name.startswith("step-")] == ["step-00000002"]
    checked(run_driver(tokenizer_config, killed, "--workers", "2", "--async-save"))
    expected, got = torch.load(whole / "final.pt"), torch.load(killed / "final.pt")
    assert expected.keys() == got.keys() and len(expected) > 10
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    assert losses(whole) == losses(killed)


def test_export_converts_to_mlx_with_the_same_outputs(tokenizer_run, tmp_path):
    import mlx.core as mx
    import numpy as np

    import lavit_mlx
    from lavit_convert.to_mlx import ConvertOptions, convert_to_mlx
    from lavit_train import checkpoint as release
    from support import max_rel

    export = tokenizer_run / "model"
    convert_to_mlx(export, tmp_path / "mlx", ConvertOptions(vision_heads=builders.HEADS))
    model = lavit_mlx.load(tmp_path / "mlx")
    eva, tokenizer = release.load_eva(export, builders.HEADS), release.load_tokenizer(export, builders.HEADS)
    decoder = release.load_decoder(export, True, builders.HEADS)
    pixels = np.random.default_rng(0).standard_normal((2, 3, 28, 28)).astype(np.float32)
    with torch.no_grad():
        features = eva(torch.from_numpy(pixels))
        ours = tokenizer(features[:, 1:])
        # every position's code (a tiny trained selector may keep none of random pixels)
        prompt, pooled = decoder([tokenizer.quantize.embedding(ours.codes[i]) for i in range(2)])
    theirs = model.tokenizer_forward(mx.array(pixels))
    assert max_rel(np.array(model.encode(mx.array(pixels))), features.numpy()) <= 1e-4
    assert np.array_equal(np.array(theirs.keep), ours.keep.numpy())
    assert max_rel(np.array(theirs.merged), ours.merged.numpy()) <= 1e-4
    assert np.array_equal(np.array(theirs.codes), ours.codes.numpy())
    mlx_prompt, mlx_pooled = model.decode_codes([ours.codes[i].numpy() for i in range(2)])
    assert max_rel(np.array(mlx_prompt), prompt.numpy()) <= 1e-4
    assert max_rel(np.array(mlx_pooled), pooled.numpy()) <= 1e-4


def test_requantization_keeps_frozen_parts(tokenizer_config, tokenizer_run, tmp_path):
    """The shapes build's quantizer step in PyTorch: a run from the first run's export with the
    selector, merger and projection frozen; the projection is the kept merger outputs' PCA."""
    from lavit_train import checkpoint as release

    first = tokenizer_run / "model"
    out = tmp_path / "requantized"
    checked(run_driver(tokenizer_config, out, "--set", "train.steps=4", "--set", f"model.init={first}",
                       "--set", f"model.tokenizer_init={first}", "--set", "model.frozen=[selector, merger, projection]",
                       "--set", "loss.projection_init=pca", "--set", "loss.kmeans_on=kept",
                       "--set", "loss.center_features=false", "--vision-heads", str(builders.HEADS)))
    before = release.load_tokenizer(first, builders.HEADS).state_dict()
    after = release.load_tokenizer(out / "model", builders.HEADS).state_dict()
    for key in before:
        same = torch.equal(before[key], after[key])
        if key.startswith(("token_predictor.", "causal_encoder.")):
            assert same, key
        elif key.startswith(("encode_task_layer.", "quantize.")):
            assert not same, key
    w2 = after["encode_task_layer.2.weight"]
    assert torch.equal(w2[:, :w2.shape[0]], torch.eye(w2.shape[0]))
    decoder_before = release.load_decoder(first, vision_heads=builders.HEADS).state_dict()
    decoder_after = release.load_decoder(out / "model", vision_heads=builders.HEADS).state_dict()
    assert not torch.equal(decoder_before["decode_task_layer.0.weight"], decoder_after["decode_task_layer.0.weight"])


def test_decoder_only_run_in_whitened_space(tokenizer_config, tokenizer_run, tmp_path):
    """`model.frozen: [selector, merger, projection, codebook]` + `loss.target_space: whitened` in
    PyTorch: the whole tokenizer, codebook included, stays bit-equal; the decoder trains."""
    from lavit_train import checkpoint as release

    first = tokenizer_run / "model"
    out = tmp_path / "decoder-only"
    checked(run_driver(tokenizer_config, out, "--set", "train.steps=4", "--set", f"model.init={first}",
                       "--set", f"model.tokenizer_init={first}",
                       "--set", "model.frozen=[selector, merger, projection, codebook]",
                       "--set", "loss.target_space=whitened", "--set", "loss.kmeans_iters=0",
                       "--set", "loss.center_features=false", "--set", "loss.init_batches=1",
                       "--vision-heads", str(builders.HEADS)))
    before = release.load_tokenizer(first, builders.HEADS).state_dict()
    after = release.load_tokenizer(out / "model", builders.HEADS).state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before)
    decoder_before = release.load_decoder(first, vision_heads=builders.HEADS).state_dict()
    decoder_after = release.load_decoder(out / "model", vision_heads=builders.HEADS).state_dict()
    assert not torch.equal(decoder_before["decode_task_layer.0.weight"], decoder_after["decode_task_layer.0.weight"])
