"""The VQ decoders: MLX against the PyTorch mirror on padded batches, and bad input."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch

import lavit_mlx
from lavit_convert.torch_io import tensor_to_mx
from lavit_mlx.config import VQDecoderConfig, mlp_width
from lavit_mlx.errors import LaVITError
from lavit_mlx.models.vq_decoder import VQDecoder
from lavit_mlx.weights import load_strict
from lavit_train.models.vq_decoder import VQDecoder as TorchVQDecoder


@pytest.mark.parametrize("highres,heads", [(False, 4), (True, 2), (True, 4)])
def test_mlx_matches_mirror_on_padded_batch(highres, heads):
    torch.manual_seed(heads)
    config = VQDecoderConfig(highres=highres, width=64, depth=2, num_heads=heads, mlp_dim=mlp_width(64),
                             feature_dim=96, context_dims=(32, 48) if highres else (40,), pooled_dim=24)
    reference = TorchVQDecoder(config).eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.normal_(0.0, 0.1)
    model = load_strict(VQDecoder(config), {k: tensor_to_mx(v) for k, v in reference.state_dict().items()}, "mirror")
    rows = [torch.randn(n, config.code_dim) for n in (7, 31, 1)]
    with torch.no_grad():
        expected = reference(rows)
    ours = model([mx.array(r.numpy()) for r in rows])
    if not highres:
        expected, ours = (expected,), (ours,)
    for a, b in zip(ours, expected):
        assert a.shape == tuple(b.shape)
        np.testing.assert_allclose(np.array(a), b.numpy(), rtol=0, atol=1e-4 * float(b.abs().max()))
    # padding does not leak: an image decodes the same alone and in a batch
    alone = model([mx.array(rows[0].numpy())])
    alone = alone if highres else (alone,)
    for a, b in zip(alone, ours):
        np.testing.assert_allclose(np.array(a[0]), np.array(b[0]), atol=1e-5)


def test_decode_codes_errors(official_checkpoint):
    model = lavit_mlx.load(official_checkpoint, vision_heads=2)
    with pytest.raises(LaVITError, match="no visual tokens"):
        model.decode_codes([np.array([], dtype=np.int64)])
    with pytest.raises(LaVITError, match="out of range"):
        model.decode_codes([np.array([16384])])
    prompt, pooled = model.decode_codes([np.array([1, 2, 3]), np.arange(200)])
    assert prompt.shape == (2, 256, 2048) and pooled.shape == (2, 1280)
    assert "tokenizer" not in model.loaded  # text-to-image reads only the codebook
