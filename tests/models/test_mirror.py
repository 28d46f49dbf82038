"""The PyTorch mirror (lavit_train) against the official fixture: same keys, same outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from lavit_train.checkpoint import load_decoder, load_eva, load_tokenizer, read_state_dict


@pytest.fixture(scope="module")
def expected(official_tiny):
    return load_file(str(official_tiny / "expected.safetensors"))


def close(ours, ref, tol=1e-4):
    ours = ours.detach().numpy() if isinstance(ours, torch.Tensor) else np.asarray(ours)
    ours = ours.reshape(ref.shape)
    return np.abs(ours - ref).max() <= tol * np.abs(ref).max()


def test_mirror_tokenizer_matches_official(official_checkpoint, expected):
    eva = load_eva(official_checkpoint, 2)
    tokenizer = load_tokenizer(official_checkpoint, 2)
    understanding = load_tokenizer(official_checkpoint, 2, understanding=True)
    with torch.no_grad():
        features = eva(torch.from_numpy(expected["pixel_values"]))
        out = tokenizer(features[:, 1:])
        visual = understanding(features[:, 1:]).visual_embeds[0]
    assert close(features, expected["encoder_features"])
    assert close(out.logprobs, expected["selector_logprobs"])
    np.testing.assert_array_equal(out.keep_mask.numpy(), expected["keep_mask"])
    assert close(out.merged, expected["merged_features"])
    np.testing.assert_array_equal(out.codes[0].numpy(), expected["code_ids"])
    assert close(out.quantized, expected["quantized"])
    assert close(visual, expected["understanding_visual_embeds"])


def test_mirror_decoders_match_official(official_checkpoint, expected):
    codebook = read_state_dict(official_checkpoint, "tokenizer")["quantize.embedding.weight"].float()
    rows = [codebook[torch.from_numpy(expected["code_ids"])]]
    with torch.no_grad():
        lowres = load_decoder(official_checkpoint, highres=False, vision_heads=2)(rows)
        prompt, pooled = load_decoder(official_checkpoint, highres=True, vision_heads=2)(rows)
    assert close(lowres, expected["lowres_condition"])
    assert close(prompt, expected["highres_prompt_embeds"])
    assert close(pooled, expected["highres_pooled"])


def test_mirror_keys_are_the_official_ones(official_checkpoint):
    for component, module in (("eva", load_eva(official_checkpoint, 2)), ("tokenizer", load_tokenizer(official_checkpoint, 2))):
        assert set(module.state_dict()) == set(read_state_dict(official_checkpoint, component))
