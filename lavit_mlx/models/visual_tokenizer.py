"""LaVIT's dynamic visual tokenizer after the ViT: token selector, token merger, quantizer.

Follows the official `LaVIT/models/modeling_visual_tokenzier.py` (`TokenPredictor`,
`TokenMerger`, `VectorQuantizer`, `DynamicVisualTokenizer`) and the paper's section 3.1.
Submodule names are the checkpoint's (`token_predictor.in_conv.1`,
`causal_encoder.blocks.3.token_cross_attn.query`, `encode_task_layer.2`, ...).

The merger's masked softmax keeps the official epsilon terms exactly:
`p = (exp(a - max a) * policy + eps / N) / (sum(exp(a - max a) * policy) + eps)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..config import TokenizerConfig
from .. import ops
from .layers import GELU, CrossAttention, Mlp, SelfAttention

POLICY_EPS = 1e-6


def policy_attend(visible: mx.array):
    """Attention whose softmax is weighted by `visible` (B, 1, N|1, M) as in the release.

    The max is taken over all columns (visible or not) and every column keeps a weight of
    eps/M, exactly as `softmax_with_policy` computes it in float32.
    """

    def attend(q, k, v, scale):
        return ops.policy_attention(q, k, v, scale, visible)

    return attend


class TokenSelector(nn.Module):
    """`token_predictor`: scores each patch as keep (column 0) or drop (column 1)."""

    def __init__(self, config: TokenizerConfig):
        super().__init__()
        w = config.width
        self.in_conv = [nn.LayerNorm(w, eps=config.eps), nn.Linear(w, w), GELU()]
        self.out_conv = [
            nn.Linear(w, w // 2),
            GELU(),
            nn.Linear(w // 2, w // 4),
            GELU(),
            nn.Linear(w // 4, 2),
        ]

    def __call__(self, features: mx.array) -> mx.array:
        """Log-probabilities (B, N, 2) of [keep, drop] for patch features (B, N, width)."""
        x = features
        for layer in self.in_conv:
            x = layer(x)
        half = x.shape[-1] // 2
        local_x = x[..., :half]
        # The official mean is weighted by a policy that is all ones at inference.
        global_x = mx.mean(x[..., half:], axis=1, keepdims=True)
        x = mx.concatenate([local_x, mx.broadcast_to(global_x, local_x.shape)], axis=-1)
        for layer in self.out_conv:
            x = layer(x)
        return nn.log_softmax(x, axis=-1)


class MergerBlock(nn.Module):
    """`CausalFuserBlock`: causal self-attention over kept tokens, cross-attention to the
    dropped ones, MLP."""

    def __init__(self, config: TokenizerConfig):
        super().__init__()
        w = config.width
        self.norm0 = nn.LayerNorm(w, eps=config.eps)
        self.token_causal_attn = SelfAttention(w, config.num_heads)
        self.norm1 = nn.LayerNorm(w, eps=config.eps)
        self.token_cross_attn = CrossAttention(w, config.num_heads)
        self.norm2 = nn.LayerNorm(w, eps=config.eps)
        self.mlp = Mlp(w, config.mlp_dim)

    def __call__(self, x, x_origin, causal_visible, cross_visible):
        x = x + self.token_causal_attn(self.norm0(x), policy_attend(causal_visible))
        x = x + self.token_cross_attn(self.norm1(x), x_origin, policy_attend(cross_visible))
        return x + self.mlp(self.norm2(x))


class TokenMerger(nn.Module):
    """`causal_encoder`: kept tokens absorb the information of the dropped ones."""

    def __init__(self, config: TokenizerConfig):
        super().__init__()
        self.ln_vision = nn.LayerNorm(config.width, eps=config.eps)
        self.blocks = [MergerBlock(config) for _ in range(config.merger_depth)]
        self.norm = nn.LayerNorm(config.width, eps=config.eps)

    def __call__(self, features: mx.array, keep: mx.array) -> mx.array:
        """Merged features (B, N, width) for patch features (B, N, width) and keep (B, N) in {0, 1}."""
        n = features.shape[1]
        keep = keep.astype(mx.float32)
        rows = mx.arange(n)
        eye = (rows[:, None] == rows[None, :]).astype(mx.float32)
        causal = (rows[None, :] <= rows[:, None]).astype(mx.float32)
        column = keep[:, None, None, :]  # (B, 1, 1, N)
        causal_visible = (column + (1.0 - column) * eye) * causal  # (B, 1, N, N)
        cross_visible = 1.0 - column  # only dropped patches are attended
        x_origin = self.ln_vision(features)
        x = features
        for block in self.blocks:
            x = block(x, x_origin, causal_visible, cross_visible)
        return self.norm(x)


class VectorQuantizer(nn.Module):
    """`quantize`: nearest of `codebook_size` l2-normalised code vectors."""

    def __init__(self, config: TokenizerConfig):
        super().__init__()
        self.embedding = nn.Embedding(config.codebook_size, config.code_dim)

    def distances(self, z: mx.array) -> mx.array:
        """||z||^2 + ||e||^2 - 2 z.e for l2-normalised z (T, d) against every code (T, K)."""
        z = z / mx.maximum(mx.linalg.norm(z, axis=-1, keepdims=True), 1e-12)
        codebook = self.embedding.weight
        return (
            mx.sum(z * z, axis=-1, keepdims=True)
            + mx.sum(codebook * codebook, axis=-1)[None, :]
            - 2.0 * (z @ codebook.T)
        )

    def __call__(self, z: mx.array) -> mx.array:
        return mx.argmin(self.distances(z), axis=-1)


@dataclass
class TokenizerOutput:
    """What the tokenizer computed for a batch of images.

    `codes[i]` are the visual codes of image i (0..codebook_size-1) in raster order of
    its kept patches; `visual_embeds[i]` the projected merger outputs for the LLM.
    """

    logprobs: mx.array  # (B, N, 2) selector log-probabilities [keep, drop]
    keep_mask: mx.array  # (B, N) 1 where the patch is kept
    merged: mx.array  # (B, N, width) merger output (all positions)
    codes: List[np.ndarray]
    quantized: Optional[mx.array] = None  # (sum T, code_dim) codebook rows of all codes
    visual_embeds: Optional[List[mx.array]] = None  # (T_i, llm_hidden) per image
    code_margin: Optional[float] = None  # smallest gap between best and second-best code


class DynamicVisualTokenizer(nn.Module):
    """Selector + merger + (quantizer | understanding projection) after the EVA features.

    With `quantizer=True` this is the discrete tokenizer of `tokenizer_encoder.bin`; with
    `llm_hidden` set it also has `vit_proj`, the understanding path of `visual_weight.bin`.
    """

    def __init__(self, config: TokenizerConfig, quantizer: bool = True, llm_hidden: Optional[int] = None):
        super().__init__()
        self.config = config
        self.token_predictor = TokenSelector(config)
        self.causal_encoder = TokenMerger(config)
        if quantizer:
            w = config.width
            self.encode_task_layer = [nn.Linear(w, w), nn.Tanh(), nn.Linear(w, config.code_dim)]
            self.quantize = VectorQuantizer(config)
        if llm_hidden is not None:
            self.vit_proj = nn.Linear(config.width, llm_hidden)

    @property
    def has_quantizer(self) -> bool:
        return "quantize" in self

    def select(self, logprobs: mx.array, sample: bool = False, key: Optional[mx.array] = None) -> mx.array:
        """Keep mask (B, N) from selector log-probabilities.

        Deterministic: keep where logp[keep] > logp[drop]. Sampled: a hard Gumbel-softmax
        draw (`F.gumbel_softmax(hard=True)[..., 0]`, as the official inference does).
        """
        if not sample:
            return (logprobs[..., 0] > logprobs[..., 1]).astype(mx.float32)
        noisy = logprobs + mx.random.gumbel(logprobs.shape, key=key)
        return (noisy[..., 0] >= noisy[..., 1]).astype(mx.float32)

    def __call__(
        self,
        features: mx.array,
        sample: bool = False,
        key: Optional[mx.array] = None,
        keep_mask: Optional[mx.array] = None,
    ) -> TokenizerOutput:
        """Tokenize EVA patch features (B, N, width) (CLS removed).

        Args:
            features: patch features of the ViT's last block, before its final norm.
            sample: draw the keep mask (Gumbel) instead of the deterministic rule.
            key: PRNG key for sampling.
            keep_mask: use this (B, N) mask instead of selecting.
        """
        logprobs = self.token_predictor(features)
        keep = keep_mask if keep_mask is not None else self.select(logprobs, sample, key)
        merged = self.causal_encoder(features, keep)
        mx.eval(logprobs, keep, merged)
        keep_np = np.array(keep) > 0.5
        B, N, W = merged.shape
        counts = keep_np.sum(axis=1)
        flat_index = mx.array(np.flatnonzero(keep_np.reshape(-1)).astype(np.int32))
        kept = mx.take(merged.reshape(B * N, W), flat_index, axis=0)  # (sum T, W) raster order
        splits = np.cumsum(counts)[:-1].tolist()

        out = TokenizerOutput(logprobs=logprobs, keep_mask=keep, merged=merged, codes=[])
        if self.has_quantizer and kept.shape[0] == 0:  # no patch kept in the whole batch
            out.codes = [np.zeros((0,), np.int64) for _ in range(B)]
            out.quantized = mx.zeros((0, self.config.code_dim))
        elif self.has_quantizer:
            z = kept
            for layer in self.encode_task_layer:
                z = layer(z)
            distances = self.quantize.distances(z)
            codes = mx.argmin(distances, axis=-1)
            out.quantized = self.quantize.embedding(codes)
            best_two = mx.sort(distances, axis=-1)[:, :2] if distances.shape[0] else None
            mx.eval(codes, out.quantized)
            codes_np = np.array(codes).astype(np.int64)
            out.codes = [c for c in np.split(codes_np, splits)]
            if best_two is not None:
                out.code_margin = float(mx.min(best_two[:, 1] - best_two[:, 0]))
        if "vit_proj" in self:
            embeds = self.vit_proj(kept)
            mx.eval(embeds)
            bounds = [0] + np.cumsum(counts).tolist()
            out.visual_embeds = [embeds[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        return out
