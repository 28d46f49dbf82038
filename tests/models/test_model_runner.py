"""Every component through the shared runner (tests/support/model_runner.py): float32 and
half precision, batch > 1 against single rows, save/reload, a gradient check, the cache."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from lavit_mlx.config import EVAConfig, LLMConfig, TokenizerConfig, VQDecoderConfig, mlp_width
from support import max_rel
from support.model_runner import ModelCase, run_all

W = 32  # vision width of these tiny components


def pixels(batch):
    return mx.array(np.random.default_rng(batch).standard_normal((batch, 3, 56, 56)).astype(np.float32))


def features(batch, n=16):
    return mx.array(np.random.default_rng(10 + batch).standard_normal((batch, n, W)).astype(np.float32))


def eva_case():
    from lavit_mlx.models.eva_vit import EVAVisionTransformer

    config = EVAConfig(width=W, depth=2, num_heads=2, mlp_dim=mlp_width(W), patch_size=14, image_size=56, head_dim_out=W)
    return ModelCase("eva", lambda: EVAVisionTransformer(config), lambda b: [pixels(b)], lambda m, x: m(x),
                     grad_params=("blocks.0.attn",))


def tokenizer_case(understanding: bool):
    from lavit_mlx.models.visual_tokenizer import DynamicVisualTokenizer

    config = TokenizerConfig(width=W, merger_depth=2, num_heads=2, mlp_dim=mlp_width(W), codebook_size=64, code_dim=8)
    keep = lambda b: mx.array((np.random.default_rng(b).random((b, 16)) > 0.5).astype(np.float32))  # noqa: E731
    if understanding:
        return ModelCase("understanding", lambda: DynamicVisualTokenizer(config, quantizer=False, llm_hidden=24),
                         lambda b: [features(b), keep(b)], lambda m, f, k: m(f, keep=k).visual_embeds,
                         grad_params=("causal_encoder.blocks.0",))
    # the straight-through selection: keep = hard Gumbel draw whose gradient reaches the selector
    noise = lambda b: mx.array(np.random.default_rng(20 + b).gumbel(size=(b, 16, 2)).astype(np.float32))  # noqa: E731
    return ModelCase("tokenizer", lambda: DynamicVisualTokenizer(config), lambda b: [features(b), noise(b)],
                     lambda m, f, g: m(f, noise=g).merged, grad_params=("causal_encoder.blocks.1.mlp",),
                     # the keep mask is hard: a half-precision flip of a near tie moves whole tokens
                     half_tol={"float16": 2e-2, "bfloat16": 1e-1})


def decoder_case(highres: bool):
    from lavit_mlx.models.vq_decoder import VQDecoder

    config = VQDecoderConfig(highres=highres, width=W, depth=2, num_heads=2, mlp_dim=mlp_width(W), code_dim=8,
                             num_patches=16, feature_dim=W, context_dims=(12, 20) if highres else (12,), pooled_dim=20)

    def rows(b):
        rng = np.random.default_rng(30 + b)
        return [mx.array(rng.standard_normal((n, 8)).astype(np.float32)) for n in (5, 9, 3)[:b]]

    def run(m, codes):
        out = m(codes)
        # prompt embeddings (B, N, 12 + 20) and the pooled vector (B, 20) as one (B, N * 32 + 20)
        return mx.concatenate([out[0].reshape(out[0].shape[0], -1), out[1]], axis=1) if highres else out

    class Rows(list):  # a list that slices like a batch
        def __getitem__(self, index):
            return Rows(super().__getitem__(index)) if isinstance(index, slice) else super().__getitem__(index)

        def astype(self, dtype):
            return Rows([r.astype(dtype) for r in self])

        @property
        def dtype(self):
            return self[0].dtype

    return ModelCase("highres_decoder" if highres else "lowres_decoder", lambda: VQDecoder(config),
                     lambda b: [Rows(rows(b))], run, grad_params=("blocks.0.cross_attn",))


def llm_case():
    from lavit_mlx.models.llm import build_llama

    config = LLMConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       vocab_size=200, max_position_embeddings=64)
    ids = lambda b: mx.array(np.random.default_rng(b).integers(0, 200, (b, 7)).astype(np.int32))  # noqa: E731

    def cache_path(model):
        from mlx_lm.models.cache import make_prompt_cache

        tokens = ids(1)
        full = model(tokens)
        cache = make_prompt_cache(model)
        steps = [model(tokens[:, :4], cache=cache)] + [model(tokens[:, i:i + 1], cache=cache) for i in range(4, 7)]
        assert max_rel(mx.concatenate(steps, axis=1), full) <= 1e-5

    return ModelCase("llm", lambda: build_llama(config), lambda b: [ids(b)], lambda m, x: m(x).astype(mx.float32),
                     grad_params=("model.layers.1.mlp",), cache_check=cache_path,
                     half_tol={"float16": 1e-2, "bfloat16": 5e-2})


def unet_case():
    from lavit_mlx.models.unet import UNet2DConditionModel, UNetConfig

    config = UNetConfig.from_dict(dict(
        in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=12, attention_head_dim=2))

    def inputs(b):
        rng = np.random.default_rng(40 + b)
        return [mx.array(rng.standard_normal((b, 4, 8, 8)).astype(np.float32)),
                mx.array(rng.standard_normal((b, 5, 12)).astype(np.float32))]

    return ModelCase("unet", lambda: UNet2DConditionModel(config), inputs, lambda m, x, c: m(x, 300, c),
                     grad_params=("down_blocks.0.attentions.0",), half_tol={"float16": 1e-2, "bfloat16": 5e-2})


def vae_case():
    from lavit_mlx.models.vae import AutoencoderKL, VAEConfig

    config = VAEConfig.from_dict(dict(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                                      up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, latent_channels=4))
    latents = lambda b: mx.array(np.random.default_rng(50 + b).standard_normal((b, 4, 6, 6)).astype(np.float32))  # noqa: E731
    return ModelCase("vae", lambda: AutoencoderKL(config), lambda b: [latents(b)], lambda m, z: m.decode(z),
                     grad_params=("decoder.mid_block",), half_tol={"float16": 1e-2, "bfloat16": 5e-2})


CASES = {
    "eva": eva_case, "tokenizer": lambda: tokenizer_case(False), "understanding": lambda: tokenizer_case(True),
    "lowres_decoder": lambda: decoder_case(False), "highres_decoder": lambda: decoder_case(True),
    "llm": llm_case, "unet": unet_case, "vae": vae_case,
}


@pytest.mark.parametrize("name", list(CASES))
def test_component(name, tmp_path):
    run_all(CASES[name](), tmp_path)
