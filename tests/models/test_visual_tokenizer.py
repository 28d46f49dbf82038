"""The MLX visual tokenizer against the PyTorch mirror, batching, sampling and ids."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from PIL import Image

import lavit_mlx
from lavit_convert.torch_io import tensor_to_mx
from lavit_mlx.config import TokenIds
from lavit_mlx.models.eva_vit import EVAVisionTransformer
from lavit_mlx.models.visual_tokenizer import DynamicVisualTokenizer
from lavit_mlx.weights import load_strict
from lavit_train.tiny import TinySpec, build_vision


def to_mlx(torch_module, mlx_module, sanitize=None):
    weights = {k: tensor_to_mx(v) for k, v in torch_module.state_dict().items()}
    return load_strict(mlx_module, sanitize(weights) if sanitize else weights, "mirror")


def assert_close(ours, ref, tol=1e-4):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= tol * np.abs(ref).max()


@pytest.mark.parametrize("spec", [TinySpec(width=64, heads=4), TinySpec(width=96, heads=2, eva_depth=1, merger_depth=3)])
def test_mlx_matches_mirror_on_a_batch(spec):
    t_eva, t_tok, t_und = build_vision(spec)
    m_eva = EVAVisionTransformer(spec.eva_config())
    m_eva = to_mlx(t_eva, m_eva, m_eva.sanitize)
    m_tok = to_mlx(t_tok, DynamicVisualTokenizer(spec.tokenizer_config()))
    m_und = to_mlx(t_und, DynamicVisualTokenizer(spec.tokenizer_config(), quantizer=False, llm_hidden=spec.llm_hidden))
    pixels = np.random.default_rng(0).standard_normal((3, 3, 224, 224)).astype(np.float32)
    with torch.no_grad():
        t_feat = t_eva(torch.from_numpy(pixels))
        t_out, t_uout = t_tok.tokenize(t_feat[:, 1:]), t_und.tokenize(t_feat[:, 1:])
    m_feat = m_eva(mx.array(pixels))
    m_out, m_uout = m_tok.tokenize(m_feat[:, 1:]), m_und.tokenize(m_feat[:, 1:])

    assert m_feat.dtype == mx.float32 and m_feat.shape == (3, 257, spec.width)
    assert_close(m_feat, t_feat)
    assert_close(m_out.logprobs, t_out.logprobs)
    np.testing.assert_array_equal(np.array(m_out.keep_mask), t_out.keep_mask.numpy())
    counts = np.array(m_out.keep_mask).sum(1)
    assert len(set(counts.tolist())) > 1, "the batch should hold different token counts"
    assert_close(m_out.merged, t_out.merged)
    for ours, ref in zip(m_out.codes, t_out.codes):
        np.testing.assert_array_equal(ours, ref.numpy())
    assert_close(m_out.quantized, t_out.quantized)
    for ours, ref, n in zip(m_uout.visual_embeds, t_uout.visual_embeds, counts):
        assert ours.shape == (n, spec.llm_hidden)
        assert_close(ours, ref)


def make_images(tmp_path, n=3):
    rng = np.random.default_rng(5)
    paths = []
    for i in range(n):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (40 + 30 * i, 60, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def test_batched_equals_one_at_a_time(tiny_release, tmp_path):
    model = lavit_mlx.load(tiny_release, vision_heads=4)
    paths = make_images(tmp_path)
    together = model.tokenize(paths, batch_size=3)
    alone = [model.tokenize([p], batch_size=1)[0] for p in paths]
    assert len({t.num_tokens for t in together}) > 1
    for a, b in zip(together, alone):
        np.testing.assert_array_equal(a.codes, b.codes)


def test_sampling_is_seeded(tiny_release, tmp_path):
    model = lavit_mlx.load(tiny_release, vision_heads=4)
    paths = make_images(tmp_path, 2)
    first = model.tokenize(paths, sample=True, seed=7)
    again = model.tokenize(paths, sample=True, seed=7, batch_size=1)  # batching does not matter
    other = model.tokenize(paths, sample=True, seed=8)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a.keep_mask, b.keep_mask)
        np.testing.assert_array_equal(a.codes, b.codes)
    assert any(not np.array_equal(a.keep_mask, c.keep_mask) for a, c in zip(first, other))
    deterministic = model.tokenize(paths)
    assert any(not np.array_equal(a.keep_mask, d.keep_mask) for a, d in zip(first, deterministic))


def test_image_with_no_kept_patch(tiny_release):
    model = lavit_mlx.load(tiny_release, vision_heads=4)
    features = model.encode(np.zeros((2, 3, 224, 224), np.float32))[:, 1:]
    out = model.tokenizer.tokenize(features, keep=mx.zeros((2, 256)))
    assert [len(c) for c in out.codes] == [0, 0]
    keep = mx.concatenate([mx.zeros((1, 256)), mx.ones((1, 256))])
    out = model.tokenizer.tokenize(features, keep=keep)
    assert [len(c) for c in out.codes] == [0, 256]


def test_token_ids_follow_the_vocabulary():
    ids = TokenIds.for_vocab(1000 + 2 + 16384)
    assert (ids.image_start, ids.image_end, ids.visual_offset, ids.vocab_size) == (1000, 1001, 1002, 17386)
    release = TokenIds()
    assert (release.image_start, release.image_end, release.visual_offset, release.vocab_size) == (32000, 32001, 32002, 48386)
    with pytest.raises(ValueError):
        TokenIds.for_vocab(16384)


def test_small_text_vocabulary_checkpoint(tmp_path):
    from lavit_train.tiny import write_release_checkpoint

    checkpoint = write_release_checkpoint(tmp_path / "ckpt", TinySpec(vocab_size=500 + 2 + 16384))
    model = lavit_mlx.load(checkpoint, vision_heads=4)
    tokens = model.tokenize(make_images(tmp_path, 1))[0]
    ids = tokens.llm_ids(model.token_ids)
    assert ids[0] == 500 and ids[-1] == 501
    assert all(502 <= i < 502 + 16384 for i in ids[1:-1])


def test_gpu_code_path_matches_fixture(official_tiny, monkeypatch):
    """The branch taken on a GPU (MLX's own erf, exp, attention), forced on the CPU."""
    from safetensors.numpy import load_file

    from lavit_mlx import ops

    monkeypatch.setattr(ops, "cpu_kernels", lambda x: False)
    expected = load_file(str(official_tiny / "expected.safetensors"))
    model = lavit_mlx.load(official_tiny / "checkpoint", vision_heads=2)
    out = model.tokenize_pixels(expected["pixel_values"])
    assert_close(out.merged, expected["merged_features"])
    np.testing.assert_array_equal(out.codes[0], expected["code_ids"])
    conditioning = np.array(model.decode_codes(out.codes, highres=False))
    assert_close(conditioning, expected["lowres_condition"])
