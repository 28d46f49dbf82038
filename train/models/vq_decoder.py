"""The LaVIT VQ decoders in PyTorch with the official state-dict keys.

Mirror of `lavit_mlx.models.vq_decoder` for the training path (reconstructing the frozen
ViT's features from the kept, quantised tokens); both follow the official
`LaVIT/models/modeling_decoder.py`.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lavit_mlx.config import VQDecoderConfig

from .eva_vit import Mlp
from .visual_tokenizer import merge_heads, split_heads

PAD_BIAS = -10000.0


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (split_heads(t, self.num_heads) for t in self.qkv(x).chunk(3, dim=-1))
        return self.proj(merge_heads(F.scaled_dot_product_attention(q, k, v)))


class CrossAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, codes, code_bias):
        h = self.num_heads
        q, k, v = split_heads(self.query(x), h), split_heads(self.key(codes), h), split_heads(self.value(codes), h)
        return self.proj(merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=code_bias)))


class DecoderBlock(nn.Module):
    def __init__(self, config: VQDecoderConfig):
        super().__init__()
        w = config.width
        self.norm0 = nn.LayerNorm(w, eps=config.eps)
        self.self_attn = SelfAttention(w, config.num_heads)
        self.norm1 = nn.LayerNorm(w, eps=config.eps)
        self.cross_attn = CrossAttention(w, config.num_heads)
        self.norm2 = nn.LayerNorm(w, eps=config.eps)
        self.mlp = Mlp(w, config.mlp_dim)

    def forward(self, x, codes, code_bias):
        x = x + self.self_attn(self.norm0(x))
        x = x + self.cross_attn(self.norm1(x), codes, code_bias)
        return x + self.mlp(self.norm2(x))


class AttentionPool(nn.Module):
    def __init__(self, num_tokens: int, dim: int, num_heads: int, out_dim: int):
        super().__init__()
        self.num_heads = num_heads
        self.positional_embedding = nn.Parameter(torch.zeros(num_tokens + 1, dim))
        self.k_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.c_proj = nn.Linear(dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + self.positional_embedding
        h = self.num_heads
        q = split_heads(self.q_proj(x[:, :1]), h)
        out = F.scaled_dot_product_attention(q, split_heads(self.k_proj(x), h), split_heads(self.v_proj(x), h))
        return self.c_proj(merge_heads(out))[:, 0]


class VQDecoder(nn.Module):
    def __init__(self, config: VQDecoderConfig):
        super().__init__()
        self.config = config
        w, n = config.width, config.num_patches
        self.in_proj = nn.Linear(config.code_dim, w)
        self.pos_embed = nn.Parameter(torch.zeros(1, n, w))
        self.query_embed = nn.Parameter(torch.zeros(1, n, w))
        self.blocks = nn.ModuleList(DecoderBlock(config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(w, eps=config.eps)
        self.decode_task_layer = nn.Sequential(nn.Linear(w, w), nn.Tanh(), nn.Linear(w, config.feature_dim))
        if config.highres:
            self.unet_proj_1 = nn.Linear(config.feature_dim, config.context_dims[0])
            self.unet_proj_2 = nn.Linear(config.feature_dim, config.context_dims[1])
            self.unet_attnpool = AttentionPool(n, config.feature_dim, config.num_heads, config.pooled_dim)
        else:
            self.unet_proj = nn.Linear(config.feature_dim, config.context_dims[0])

    def features(self, code_rows: Sequence[torch.Tensor]) -> torch.Tensor:
        """Reconstructed ViT-like features (B, num_patches, feature_dim): the tokenizer's training target."""
        lengths = [len(rows) for rows in code_rows]
        longest = max(lengths)
        codes = torch.stack([F.pad(self.in_proj(rows), (0, 0, 0, longest - n)) for rows, n in zip(code_rows, lengths)])
        codes = codes + self.pos_embed[:, :longest]
        valid = torch.arange(longest, device=codes.device)[None] < torch.tensor(lengths, device=codes.device)[:, None]
        code_bias = torch.where(valid, 0.0, PAD_BIAS)[:, None, None, :].to(codes.dtype)
        x = self.query_embed.expand(len(code_rows), -1, -1)
        for block in self.blocks:
            x = block(x, codes, code_bias)
        return self.decode_task_layer(self.norm(x))

    def forward(self, code_rows: Sequence[torch.Tensor]):
        x = self.features(code_rows)
        if not self.config.highres:
            return self.unet_proj(x)
        return torch.cat([self.unet_proj_1(x), self.unet_proj_2(x)], dim=-1), self.unet_attnpool(x)
