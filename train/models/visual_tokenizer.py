"""LaVIT's dynamic visual tokenizer after the ViT, in PyTorch: token selector, token
merger, quantizer.

Mirror of `lavit_mlx.models.visual_tokenizer` (same names, same semantics) for the
training path; both follow the official `LaVIT/models/modeling_visual_tokenzier.py`
(`TokenPredictor`, `TokenMerger`, `VectorQuantizer`, `DynamicVisualTokenizer`) and the
paper's section 3.1. Submodule names are the checkpoint's (`token_predictor.in_conv.1`,
`causal_encoder.blocks.3.token_cross_attn.query`, `encode_task_layer.2`, ...).

The merger's masked softmax keeps the official epsilon terms exactly:
`p = (exp(a - max a) * policy + eps / N) / (sum(exp(a - max a) * policy) + eps)`.
"""

from __future__ import annotations

import math

from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from lavit_mlx.config import TokenizerConfig

from .layers import GELU, CrossAttention, Mlp, SelfAttention

POLICY_EPS = 1e-6


def policy_attend(visible: torch.Tensor):
    """Attention whose softmax is weighted by `visible` (B, 1, N|1, M) as in the release.

    The max is taken over all columns (visible or not) and every column keeps a weight of
    eps/M, exactly as `softmax_with_policy` computes it in float32.
    """

    def attend(q, k, v, scale):
        scores = (q @ k.transpose(-2, -1)).float() * scale  # (B, heads, N, M)
        weights = torch.exp(scores - scores.amax(dim=-1, keepdim=True)) * visible
        length = k.shape[2]
        probs = (weights + POLICY_EPS / length) / (weights.sum(dim=-1, keepdim=True) + POLICY_EPS)
        return probs.to(v.dtype) @ v

    return attend


class TokenSelector(nn.Module):
    """`token_predictor`: scores each patch as keep (column 0) or drop (column 1)."""

    def __init__(self, config: TokenizerConfig):
        super().__init__()
        w = config.width
        self.in_conv = nn.Sequential(nn.LayerNorm(w, eps=config.eps), nn.Linear(w, w), GELU())
        self.out_conv = nn.Sequential(
            nn.Linear(w, w // 2),
            GELU(),
            nn.Linear(w // 2, w // 4),
            GELU(),
            nn.Linear(w // 4, 2),
        )

    def forward(self, features: torch.Tensor, policy: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Log-probabilities (B, N, 2) of [keep, drop] for patch features (B, N, width).

        The global half is a mean over patches weighted by `policy` (B, N, 1) (the paper's
        policy-weighted mean; all ones, a plain mean, when not given).
        """
        x = self.in_conv(features)
        half = x.shape[-1] // 2
        local_x, rest = x[..., :half], x[..., half:]
        if policy is None:
            global_x = rest.mean(dim=1, keepdim=True)
        else:
            global_x = (rest * policy).sum(dim=1, keepdim=True) / policy.sum(dim=1, keepdim=True)
        x = torch.cat([local_x, global_x.expand_as(local_x)], dim=-1)
        return F.log_softmax(self.out_conv(x), dim=-1)


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

    def forward(self, x, x_origin, causal_visible, cross_visible):
        x = x + self.token_causal_attn(self.norm0(x), policy_attend(causal_visible))
        x = x + self.token_cross_attn(self.norm1(x), x_origin, policy_attend(cross_visible))
        return x + self.mlp(self.norm2(x))


class TokenMerger(nn.Module):
    """`causal_encoder`: kept tokens absorb the information of the dropped ones."""

    def __init__(self, config: TokenizerConfig):
        super().__init__()
        self.ln_vision = nn.LayerNorm(config.width, eps=config.eps)
        self.blocks = nn.ModuleList(MergerBlock(config) for _ in range(config.merger_depth))
        self.norm = nn.LayerNorm(config.width, eps=config.eps)

    def forward(self, features: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Merged features (B, N, width) for patch features (B, N, width) and keep (B, N) in {0, 1}.

        `keep` may carry a straight-through gradient: it enters only as attention weights,
        which is how the selector learns (the dropped tokens are masked inside the softmax).
        """
        n = features.shape[1]
        keep = keep.to(torch.float32)
        rows = torch.arange(n, device=features.device)
        eye = (rows[:, None] == rows[None, :]).to(torch.float32)
        causal = (rows[None, :] <= rows[:, None]).to(torch.float32)
        column = keep[:, None, None, :]  # (B, 1, 1, N)
        causal_visible = (column + (1.0 - column) * eye) * causal  # (B, 1, N, N)
        cross_visible = 1.0 - column  # only dropped patches are attended
        x_origin = self.ln_vision(features)
        x = features
        for block in self.blocks:
            x = block(x, x_origin, causal_visible, cross_visible)
        return self.norm(x)


def l2_normalize(z: torch.Tensor) -> torch.Tensor:
    return z / torch.linalg.vector_norm(z, dim=-1, keepdim=True).clamp_min(1e-12)


class VectorQuantizer(nn.Module):
    """`quantize`: nearest of `codebook_size` l2-normalised code vectors."""

    def __init__(self, config: TokenizerConfig):
        super().__init__()
        self.embedding = nn.Embedding(config.codebook_size, config.code_dim)

    def distances(self, z: torch.Tensor) -> torch.Tensor:
        """||z||^2 + ||e||^2 - 2 z.e for l2-normalised z (..., d) against every code (..., K),
        rows used as stored (reference section 3, "Quantizer")."""
        z = l2_normalize(z)
        codebook = self.embedding.weight
        return (
            (z * z).sum(dim=-1, keepdim=True)
            + (codebook * codebook).sum(dim=-1)
            - 2.0 * (z @ codebook.t())
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.distances(z).argmin(dim=-1)


def gumbel_noise(shape, generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
    """-log(-log(U)), U ~ uniform(0, 1): the noise of a Gumbel-softmax draw."""
    uniform = torch.rand(shape, generator=generator, device=device)
    return -torch.log(-torch.log(uniform.clamp_min(torch.finfo(uniform.dtype).tiny)))


def hard_gumbel_keep(logprobs: torch.Tensor, noise: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Keep mask (B, N) of a hard Gumbel-softmax draw with a straight-through gradient:
    the forward value is one-hot (keep if column 0 wins), the gradient that of
    softmax((logprobs + noise) / tau) (`F.gumbel_softmax(hard=True)[..., 0]`)."""
    soft = F.softmax((logprobs + noise) / tau, dim=-1)
    hard = (soft[..., 0] >= soft[..., 1]).to(soft.dtype)
    return hard + (soft[..., 0] - soft[..., 0].detach())  # exactly 0/1 forward


@dataclass
class TokenizerForward:
    """Everything the tokenizer computes for a batch, as tensors over all N positions.

    Dropped positions are computed too (the release computes all 256 and uses the kept
    ones), so shapes never depend on the data: `keep` says which positions count.
    """

    logprobs: torch.Tensor  # (B, N, 2) selector log-probabilities [keep, drop]
    keep: torch.Tensor  # (B, N) 1 where the patch is kept (straight-through in training)
    merged: torch.Tensor  # (B, N, width) merger output
    z: Optional[torch.Tensor] = None  # (B, N, code_dim) l2-normalised encoder output
    codes: Optional[torch.Tensor] = None  # (B, N) nearest code of every position
    quantized: Optional[torch.Tensor] = None  # (B, N, code_dim) its codebook row (straight-through in training)
    distances: Optional[torch.Tensor] = None  # (B, N, codebook_size)
    visual_embeds: Optional[torch.Tensor] = None  # (B, N, llm_hidden) vit_proj of every position


@dataclass
class TokenizerOutput:
    """Host-side tokens of a batch (`DynamicVisualTokenizer.tokenize`).

    `codes[i]` are the visual codes of image i (0..codebook_size-1, int64) in raster order
    of its kept patches; `visual_embeds[i]` the projected merger outputs of those patches.
    """

    logprobs: torch.Tensor  # (B, N, 2)
    keep_mask: torch.Tensor  # (B, N)
    merged: torch.Tensor  # (B, N, width)
    codes: List[torch.Tensor]
    quantized: Optional[torch.Tensor] = None  # (sum T, code_dim) codebook rows of all kept codes
    visual_embeds: Optional[List[torch.Tensor]] = None  # (T_i, llm_hidden) per image
    code_margin: Optional[float] = None  # smallest gap between best and second-best code


class DynamicVisualTokenizer(nn.Module):
    """Selector + merger + (quantizer | understanding projection) after the EVA features.

    With `quantizer=True` this is the discrete tokenizer of `tokenizer_encoder.bin`; with
    `llm_hidden` set it also has `vit_proj`, the understanding path of `visual_weight.bin`.

    `forward` is the differentiable forward (training: straight-through hard Gumbel
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
            self.encode_task_layer = nn.Sequential(nn.Linear(w, w), nn.Tanh(), nn.Linear(w, config.code_dim))
            self.quantize = VectorQuantizer(config)
        if llm_hidden is not None:
            self.vit_proj = nn.Linear(config.width, llm_hidden)

    @property
    def has_quantizer(self) -> bool:
        return "quantize" in self._modules

    def select(self, logprobs: torch.Tensor, sample: bool = False, generator: Optional[torch.Generator] = None,
               noise: Optional[torch.Tensor] = None, tau: float = 1.0) -> torch.Tensor:
        """Keep mask (B, N) from selector log-probabilities.

        Deterministic: keep where logp[keep] > logp[drop] (the release's rule), or where
        p(keep) > `config.keep_threshold` when the model stores another threshold. Sampled
        (or given `noise`): a hard Gumbel-softmax draw with a straight-through gradient.
        """
        if noise is None and not sample:
            threshold = getattr(self.config, "keep_threshold", 0.5)
            if threshold == 0.5:
                return (logprobs[..., 0] > logprobs[..., 1]).to(torch.float32)
            return (logprobs[..., 0] > math.log(threshold)).to(torch.float32)
        if noise is None:
            noise = gumbel_noise(logprobs.shape, generator, logprobs.device)
        return hard_gumbel_keep(logprobs, noise, tau)

    def encode(self, merged: torch.Tensor) -> torch.Tensor:
        return l2_normalize(self.encode_task_layer(merged))

    def forward(
        self,
        features: torch.Tensor,
        keep: Optional[torch.Tensor] = None,
        sample: bool = False,
        generator: Optional[torch.Generator] = None,
        noise: Optional[torch.Tensor] = None,
        tau: float = 1.0,
        policy: Optional[torch.Tensor] = None,
    ) -> TokenizerForward:
        """Tokenize EVA patch features (B, N, width) (CLS removed); differentiable, no host sync.

        Args:
            features: patch features of the ViT's last block, before its final norm.
            keep: use this (B, N) mask instead of selecting.
            sample: draw the mask (hard Gumbel) instead of the deterministic rule; always
                on in training mode (`self.training`).
            generator: torch generator for the draw; noise: the Gumbel noise itself (B, N, 2).
            tau: Gumbel-softmax temperature.
            policy: (B, N, 1) weights of the selector's global mean (default all ones).
        """
        logprobs = self.token_predictor(features, policy)
        if keep is None:
            keep = self.select(logprobs, sample or self.training, generator, noise, tau)
        merged = self.causal_encoder(features, keep)
        out = TokenizerForward(logprobs=logprobs, keep=keep, merged=merged)
        if self.has_quantizer:
            out.z = self.encode(merged)
            out.distances = self.quantize.distances(out.z)
            out.codes = out.distances.argmin(dim=-1)
            rows = self.quantize.embedding(out.codes)
            # straight-through: the forward value is the code, the gradient reaches z
            out.quantized = out.z + (rows - out.z).detach() if self.training else rows
        if "vit_proj" in self._modules:
            out.visual_embeds = self.vit_proj(merged)
        return out

    @torch.no_grad()
    def tokenize(self, features: torch.Tensor, keep: Optional[torch.Tensor] = None, sample: bool = False,
                 generator: Optional[torch.Generator] = None) -> TokenizerOutput:
        """Host-side tokens of the kept patches: per-image codes and embeddings."""
        out = self(features, keep=keep, sample=sample, generator=generator)
        kept_index = out.keep > 0.5  # (B, N)
        counts = kept_index.sum(dim=1).tolist()
        result = TokenizerOutput(logprobs=out.logprobs, keep_mask=out.keep, merged=out.merged, codes=[])
        if self.has_quantizer:
            codes = out.codes[kept_index]  # (sum T,), raster order per image
            result.codes = list(codes.split(counts))
            result.quantized = self.quantize.embedding(codes)
            if codes.numel():
                # best and second-best distance of the kept rows
                best_two = out.distances[kept_index].topk(2, dim=-1, largest=False).values
                result.code_margin = float((best_two[:, 1] - best_two[:, 0]).min())
        if out.visual_embeds is not None:
            result.visual_embeds = list(out.visual_embeds[kept_index].split(counts))
        return result
