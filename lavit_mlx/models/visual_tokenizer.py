"""LaVIT's dynamic visual tokenizer after the ViT: token selector, token merger, quantizer.

Follows the official `LaVIT/models/modeling_visual_tokenzier.py` (`TokenPredictor`,
`TokenMerger`, `VectorQuantizer`, `DynamicVisualTokenizer`) and the paper's section 3.1.
Submodule names are the checkpoint's (`token_predictor.in_conv.1`,
`causal_encoder.blocks.3.token_cross_attn.query`, `encode_task_layer.2`, ...).

The merger's masked softmax keeps the official epsilon terms exactly:
`p = (exp(a - max a) * policy + eps / N) / (sum(exp(a - max a) * policy) + eps)`.
"""

from __future__ import annotations

import math

from dataclasses import dataclass
from typing import List, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..config import TokenizerConfig
from .. import ops
from .layers import GELU, CrossAttention, Mlp, SelfAttention, split_heads

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

    def __call__(self, features: mx.array, policy: Optional[mx.array] = None) -> mx.array:
        """Log-probabilities (B, N, 2) of [keep, drop] for patch features (B, N, width).

        The global half is a mean over patches weighted by `policy` (B, N, 1) (the paper's
        policy-weighted mean; all ones, a plain mean, when not given).
        """
        x = features
        for layer in self.in_conv:
            x = layer(x)
        half = x.shape[-1] // 2
        local_x, rest = x[..., :half], x[..., half:]
        if policy is None:
            global_x = mx.mean(rest, axis=1, keepdims=True)
        else:
            global_x = mx.sum(rest * policy, axis=1, keepdims=True) / mx.sum(policy, axis=1, keepdims=True)
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

    def absorption(self, features: mx.array, keep: mx.array) -> mx.array:
        """How much each token draws from each dropped patch: the cross-attention weights
        (B, N queries, N patches), averaged over heads and blocks (for pictures; the same
        computation as `__call__`)."""
        n = features.shape[1]
        keep = keep.astype(mx.float32)
        rows = mx.arange(n)
        eye = (rows[:, None] == rows[None, :]).astype(mx.float32)
        causal = (rows[None, :] <= rows[:, None]).astype(mx.float32)
        column = keep[:, None, None, :]
        causal_visible = (column + (1.0 - column) * eye) * causal
        cross_visible = 1.0 - column
        x_origin = self.ln_vision(features)
        x, total = features, 0.0
        for block in self.blocks:
            x = x + block.token_causal_attn(block.norm0(x), policy_attend(causal_visible))
            attn = block.token_cross_attn
            q = split_heads(attn.query(block.norm1(x)), attn.num_heads)
            k, _ = attn.project_context(x_origin)
            total = total + mx.mean(ops.policy_probabilities(q, k, attn.scale, cross_visible), axis=1)
            x = x + attn(block.norm1(x), x_origin, policy_attend(cross_visible))
            x = x + block.mlp(block.norm2(x))
        return total / len(self.blocks)

    def __init__(self, config: TokenizerConfig):
        super().__init__()
        self.ln_vision = nn.LayerNorm(config.width, eps=config.eps)
        self.blocks = [MergerBlock(config) for _ in range(config.merger_depth)]
        self.norm = nn.LayerNorm(config.width, eps=config.eps)

    def __call__(self, features: mx.array, keep: mx.array) -> mx.array:
        """Merged features (B, N, width) for patch features (B, N, width) and keep (B, N) in {0, 1}.

        `keep` may carry a straight-through gradient: it enters only as attention weights,
        which is how the selector learns (the dropped tokens are masked inside the softmax).
        """
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


def l2_normalize(z: mx.array) -> mx.array:
    return z / mx.maximum(mx.linalg.norm(z, axis=-1, keepdims=True), 1e-12)


class VectorQuantizer(nn.Module):
    """`quantize`: nearest of `codebook_size` l2-normalised code vectors."""

    def __init__(self, config: TokenizerConfig):
        super().__init__()
        self.embedding = nn.Embedding(config.codebook_size, config.code_dim)

    def distances(self, z: mx.array) -> mx.array:
        """||z||^2 + ||e||^2 - 2 z.e for l2-normalised z (..., d) against every code (..., K),
        rows used as stored (reference section 3, "Quantizer")."""
        z = l2_normalize(z)
        codebook = self.embedding.weight
        return (
            mx.sum(z * z, axis=-1, keepdims=True)
            + mx.sum(codebook * codebook, axis=-1)
            - 2.0 * (z @ codebook.T)
        )

    def __call__(self, z: mx.array) -> mx.array:
        return mx.argmin(self.distances(z), axis=-1)


def gumbel_noise(shape, key: Optional[mx.array] = None) -> mx.array:
    """-log(-log(U)), U ~ uniform(0, 1): the noise of a Gumbel-softmax draw."""
    return mx.random.gumbel(shape, key=key)


def hard_gumbel_keep(logprobs: mx.array, noise: mx.array, tau: float = 1.0) -> mx.array:
    """Keep mask (B, N) of a hard Gumbel-softmax draw with a straight-through gradient:
    the forward value is one-hot (keep if column 0 wins), the gradient that of
    softmax((logprobs + noise) / tau) (`F.gumbel_softmax(hard=True)[..., 0]`)."""
    soft = mx.softmax((logprobs + noise) / tau, axis=-1)
    hard = (soft[..., 0] >= soft[..., 1]).astype(soft.dtype)
    return hard + (soft[..., 0] - mx.stop_gradient(soft[..., 0]))  # exactly 0/1 forward


@dataclass
class TokenizerForward:
    """Everything the tokenizer computes for a batch, as arrays over all N positions.

    Dropped positions are computed too (the release computes all 256 and uses the kept
    ones), so shapes never depend on the data: `keep` says which positions count.
    """

    logprobs: mx.array  # (B, N, 2) selector log-probabilities [keep, drop]
    keep: mx.array  # (B, N) 1 where the patch is kept (straight-through in training)
    merged: mx.array  # (B, N, width) merger output
    z: Optional[mx.array] = None  # (B, N, code_dim) l2-normalised encoder output
    codes: Optional[mx.array] = None  # (B, N) nearest code of every position
    quantized: Optional[mx.array] = None  # (B, N, code_dim) its codebook row (straight-through in training)
    distances: Optional[mx.array] = None  # (B, N, codebook_size)
    visual_embeds: Optional[mx.array] = None  # (B, N, llm_hidden) vit_proj of every position


@dataclass
class TokenizerOutput:
    """Host-side tokens of a batch (`DynamicVisualTokenizer.tokenize`).

    `codes[i]` are the visual codes of image i (0..codebook_size-1) in raster order of
    its kept patches; `visual_embeds[i]` the projected merger outputs of those patches.
    """

    logprobs: mx.array  # (B, N, 2)
    keep_mask: mx.array  # (B, N)
    merged: mx.array  # (B, N, width)
    codes: List[np.ndarray]
    quantized: Optional[mx.array] = None  # (sum T, code_dim) codebook rows of all kept codes
    visual_embeds: Optional[List[mx.array]] = None  # (T_i, llm_hidden) per image
    code_margin: Optional[float] = None  # smallest gap between best and second-best code


class DynamicVisualTokenizer(nn.Module):
    """Selector + merger + (quantizer | understanding projection) after the EVA features.

    With `quantizer=True` this is the discrete tokenizer of `tokenizer_encoder.bin`; with
    `llm_hidden` set it also has `vit_proj`, the understanding path of `visual_weight.bin`.

    `__call__` is the differentiable forward (training: straight-through hard Gumbel
    selection and a straight-through codebook lookup; evaluation: the deterministic rule,
    or a seeded Gumbel draw). `tokenize` is the host-side wrapper that returns ids.
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

    def select(self, logprobs: mx.array, sample: bool = False, key: Optional[mx.array] = None,
               noise: Optional[mx.array] = None, tau: float = 1.0) -> mx.array:
        """Keep mask (B, N) from selector log-probabilities.

        Deterministic: keep where logp[keep] > logp[drop] (the release's rule), or where
        p(keep) > `config.keep_threshold` when the model stores another threshold. Sampled
        (or given `noise`): a hard Gumbel-softmax draw with a straight-through gradient.
        """
        if noise is None and not sample:
            threshold = getattr(self.config, "keep_threshold", 0.5)
            if threshold == 0.5:
                return (logprobs[..., 0] > logprobs[..., 1]).astype(mx.float32)
            return (logprobs[..., 0] > math.log(threshold)).astype(mx.float32)
        if noise is None:
            noise = gumbel_noise(logprobs.shape, key)
        return hard_gumbel_keep(logprobs, noise, tau)

    def encode(self, merged: mx.array) -> mx.array:
        z = merged
        for layer in self.encode_task_layer:
            z = layer(z)
        return l2_normalize(z)

    def __call__(
        self,
        features: mx.array,
        keep: Optional[mx.array] = None,
        sample: bool = False,
        key: Optional[mx.array] = None,
        noise: Optional[mx.array] = None,
        tau: float = 1.0,
        policy: Optional[mx.array] = None,
    ) -> TokenizerForward:
        """Tokenize EVA patch features (B, N, width) (CLS removed); differentiable, no host sync.

        Args:
            features: patch features of the ViT's last block, before its final norm.
            keep: use this (B, N) mask instead of selecting.
            sample: draw the mask (hard Gumbel) instead of the deterministic rule; always
                on in training mode (`self.training`).
            key: PRNG key for the draw; noise: the Gumbel noise itself (B, N, 2).
            tau: Gumbel-softmax temperature.
            policy: (B, N, 1) weights of the selector's global mean (default all ones).
        """
        logprobs = self.token_predictor(features, policy)
        if keep is None:
            keep = self.select(logprobs, sample or self.training, key, noise, tau)
        merged = self.causal_encoder(features, keep)
        out = TokenizerForward(logprobs=logprobs, keep=keep, merged=merged)
        if self.has_quantizer:
            out.z = self.encode(merged)
            out.distances = self.quantize.distances(out.z)
            # integer indices: no gradient flows through an argmin, and a gather cannot differentiate
            # with respect to its indices (the codebook term reads `embedding(codes)` under value_and_grad)
            out.codes = mx.stop_gradient(mx.argmin(out.distances, axis=-1))
            rows = self.quantize.embedding(out.codes)
            # straight-through: the forward value is the code, the gradient reaches z
            out.quantized = out.z + mx.stop_gradient(rows - out.z) if self.training else rows
        if "vit_proj" in self:
            out.visual_embeds = self.vit_proj(merged)
        return out

    def tokenize(self, features: mx.array, keep: Optional[mx.array] = None, sample: bool = False,
                 key: Optional[mx.array] = None) -> TokenizerOutput:
        """Host-side tokens of the kept patches: per-image codes (numpy) and embeddings."""
        out = self(features, keep=keep, sample=sample, key=key)
        keep_np = np.array(out.keep) > 0.5
        B, N, W = out.merged.shape
        counts = keep_np.sum(axis=1)
        flat_index = mx.array(np.flatnonzero(keep_np.reshape(-1)).astype(np.int32))
        bounds = [0] + np.cumsum(counts).tolist()
        result = TokenizerOutput(logprobs=out.logprobs, keep_mask=out.keep, merged=out.merged, codes=[])
        if self.has_quantizer:
            codes = np.array(out.codes).reshape(-1)[np.flatnonzero(keep_np.reshape(-1))].astype(np.int64)
            result.codes = [codes[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
            result.quantized = self.quantize.embedding(mx.array(codes.astype(np.int32)))
            if codes.size:
                # best and second-best distance of the kept rows: two minima, no sort
                kept = mx.take(out.distances.reshape(B * N, -1), flat_index, axis=0)
                best = mx.min(kept, axis=-1, keepdims=True)
                first = mx.argmin(kept, axis=-1, keepdims=True)
                others = mx.put_along_axis(kept, first, mx.array(float("inf"), kept.dtype), axis=-1)
                result.code_margin = float(mx.min(mx.min(others, axis=-1, keepdims=True) - best))
        if out.visual_embeds is not None:
            embeds = mx.take(out.visual_embeds.reshape(B * N, -1), flat_index, axis=0)
            result.visual_embeds = [embeds[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        return result
