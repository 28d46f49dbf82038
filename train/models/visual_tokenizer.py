"""Token selector, token merger and quantizer in PyTorch with the official state-dict keys.

Mirror of `lavit_mlx.models.visual_tokenizer` for the CUDA training path; both follow
the official `LaVIT/models/modeling_visual_tokenzier.py`. The keep mask may be soft
(a straight-through Gumbel sample during training): it enters the merger only as a
multiplicative policy, exactly as in the release.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from lavit_mlx.config import TokenizerConfig

from .eva_vit import Mlp

POLICY_EPS = 1e-6


def policy_softmax(scores: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """`softmax_with_policy` of the release, in float32: every column keeps eps/N."""
    dtype = scores.dtype
    scores = scores.float()
    scores = scores - scores.amax(dim=-1, keepdim=True)
    weights = scores.exp() * visible.float()
    n = scores.shape[-1]
    return ((weights + POLICY_EPS / n) / (weights.sum(dim=-1, keepdim=True) + POLICY_EPS)).to(dtype)


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    B, N, C = x.shape
    return x.reshape(B, N, num_heads, C // num_heads).transpose(1, 2)  # (B, heads, N, hd)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    B, H, N, D = x.shape
    return x.transpose(1, 2).reshape(B, N, H * D)


class TokenCausalAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        q, k, v = (split_heads(t, self.num_heads) for t in self.qkv(x).chunk(3, dim=-1))
        probs = policy_softmax((q @ k.transpose(-2, -1)) * self.scale, visible)
        return self.proj(merge_heads(probs @ v))


class TokenCrossAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        h = self.num_heads
        q, k, v = split_heads(self.query(x), h), split_heads(self.key(context), h), split_heads(self.value(context), h)
        probs = policy_softmax((q @ k.transpose(-2, -1)) * self.scale, visible)
        return self.proj(merge_heads(probs @ v))


class MergerBlock(nn.Module):
    def __init__(self, config: TokenizerConfig):
        super().__init__()
        w = config.width
        self.norm0 = nn.LayerNorm(w, eps=config.eps)
        self.token_causal_attn = TokenCausalAttention(w, config.num_heads)
        self.norm1 = nn.LayerNorm(w, eps=config.eps)
        self.token_cross_attn = TokenCrossAttention(w, config.num_heads)
        self.norm2 = nn.LayerNorm(w, eps=config.eps)
        self.mlp = Mlp(w, config.mlp_dim)

    def forward(self, x, x_origin, causal_visible, cross_visible):
        x = x + self.token_causal_attn(self.norm0(x), causal_visible)
        x = x + self.token_cross_attn(self.norm1(x), x_origin, cross_visible)
        return x + self.mlp(self.norm2(x))


class TokenMerger(nn.Module):
    def __init__(self, config: TokenizerConfig):
        super().__init__()
        self.ln_vision = nn.LayerNorm(config.width, eps=config.eps)
        self.blocks = nn.ModuleList(MergerBlock(config) for _ in range(config.merger_depth))
        self.norm = nn.LayerNorm(config.width, eps=config.eps)

    def forward(self, features: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        n = features.shape[1]
        keep = keep.float()
        eye = torch.eye(n, device=features.device)
        causal = torch.ones(n, n, device=features.device).tril()
        column = keep[:, None, None, :]  # (B, 1, 1, N)
        causal_visible = (column + (1.0 - column) * eye) * causal
        cross_visible = 1.0 - column
        x_origin = self.ln_vision(features)
        x = features
        for block in self.blocks:
            x = block(x, x_origin, causal_visible, cross_visible)
        return self.norm(x)


class TokenSelector(nn.Module):
    def __init__(self, config: TokenizerConfig):
        super().__init__()
        w = config.width
        self.in_conv = nn.Sequential(nn.LayerNorm(w, eps=config.eps), nn.Linear(w, w), nn.GELU())
        self.out_conv = nn.Sequential(
            nn.Linear(w, w // 2), nn.GELU(), nn.Linear(w // 2, w // 4), nn.GELU(), nn.Linear(w // 4, 2)
        )

    def forward(self, features: torch.Tensor, policy: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Log-probabilities (B, N, 2) of [keep, drop]; `policy` (B, N, 1) weights the global mean."""
        x = self.in_conv(features)
        half = x.shape[-1] // 2
        local_x, rest = x[..., :half], x[..., half:]
        if policy is None:
            global_x = rest.mean(dim=1, keepdim=True)
        else:
            global_x = (rest * policy).sum(dim=1, keepdim=True) / policy.sum(dim=1, keepdim=True)
        x = torch.cat([local_x, global_x.expand_as(local_x)], dim=-1)
        return F.log_softmax(self.out_conv(x), dim=-1)


class VectorQuantizer(nn.Module):
    def __init__(self, config: TokenizerConfig):
        super().__init__()
        self.embedding = nn.Embedding(config.codebook_size, config.code_dim)

    def distances(self, z: torch.Tensor) -> torch.Tensor:
        z = F.normalize(z, p=2, dim=-1)
        codebook = self.embedding.weight
        return z.pow(2).sum(-1, keepdim=True) + codebook.pow(2).sum(-1) - 2 * z @ codebook.t()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.distances(z).argmin(dim=-1)


@dataclass
class TokenizerOutput:
    logprobs: torch.Tensor
    keep_mask: torch.Tensor
    merged: torch.Tensor
    codes: List[torch.Tensor]
    quantized: Optional[torch.Tensor] = None
    visual_embeds: Optional[List[torch.Tensor]] = None


class DynamicVisualTokenizer(nn.Module):
    """`token_predictor`, `causal_encoder`, and `encode_task_layer` + `quantize` and/or `vit_proj`."""

    def __init__(self, config: TokenizerConfig, quantizer: bool = True, llm_hidden: Optional[int] = None):
        super().__init__()
        self.config = config
        self.token_predictor = TokenSelector(config)
        self.causal_encoder = TokenMerger(config)
        if quantizer:
            w = config.width
            self.encode_task_layer = nn.Sequential(nn.Linear(w, w), nn.Tanh(), nn.Linear(w, config.code_dim))
            self.quantize = VectorQuantizer(config)
        self.vit_proj = nn.Linear(config.width, llm_hidden) if llm_hidden else None

    @staticmethod
    def select(logprobs: torch.Tensor, sample: bool = False, hard: bool = True,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Keep mask (B, N): deterministic rule, or a (straight-through) Gumbel-softmax draw."""
        if not sample:
            return (logprobs[..., 0] > logprobs[..., 1]).to(logprobs.dtype)
        uniform = torch.rand(logprobs.shape, generator=generator, device=logprobs.device, dtype=logprobs.dtype)
        gumbel = -torch.log(-torch.log(uniform.clamp_min(1e-20)).clamp_min(1e-20))
        soft = F.softmax(logprobs + gumbel, dim=-1)
        if not hard:
            return soft[..., 0]
        one_hot = F.one_hot(soft.argmax(dim=-1), 2).to(soft.dtype)
        return (one_hot - soft.detach() + soft)[..., 0]

    def forward(self, features: torch.Tensor, keep_mask: Optional[torch.Tensor] = None,
                sample: bool = False, generator: Optional[torch.Generator] = None) -> TokenizerOutput:
        logprobs = self.token_predictor(features)
        keep = keep_mask if keep_mask is not None else self.select(logprobs, sample, generator=generator)
        merged = self.causal_encoder(features, keep)
        kept_index = keep.detach() > 0.5
        counts = kept_index.sum(dim=1).tolist()
        kept = merged[kept_index]  # (sum T, width), raster order per image
        out = TokenizerOutput(logprobs=logprobs, keep_mask=keep, merged=merged, codes=[])
        if hasattr(self, "quantize"):
            codes = self.quantize(self.encode_task_layer(kept))
            out.quantized = self.quantize.embedding(codes)
            out.codes = list(torch.split(codes, counts))
        if self.vit_proj is not None:
            out.visual_embeds = list(torch.split(self.vit_proj(kept), counts))
        return out
