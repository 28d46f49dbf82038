"""Transformer layers shared by the token merger and the VQ decoders, in PyTorch.

Mirror of `lavit_mlx.models.layers` (same names, same semantics) for the training path.
Parameter names follow the official checkpoint keys (`qkv`, `proj`, `query`, `key`,
`value`, `mlp.fc1`, `mlp.fc2`). The attention *rule* differs between users (plain
softmax, policy-masked softmax, additive padding mask), so each attention module takes
the function that turns (q, k, v) into per-head outputs.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

# attend(q, k, v, scale) -> (B, heads, N, head_dim)
AttendFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


def softmax_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


class GELU(nn.Module):
    """Exact (erf) GELU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate="none")


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    B, N, C = x.shape
    return x.reshape(B, N, num_heads, C // num_heads).transpose(1, 2)  # (B, heads, N, hd)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    B, H, N, D = x.shape
    return x.transpose(1, 2).reshape(B, N, H * D)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="none"))


class SelfAttention(nn.Module):
    """Fused `qkv` projection (with bias) and output `proj`."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attend: AttendFn = softmax_attend) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        h = self.num_heads
        out = attend(split_heads(q, h), split_heads(k, h), split_heads(v, h), self.scale)
        return self.proj(merge_heads(out))


class CrossAttention(nn.Module):
    """Separate `query`, `key`, `value` projections (with bias) and output `proj`."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        attend: AttendFn = softmax_attend,
        context_kv: Optional[tuple] = None,
    ) -> torch.Tensor:
        h = self.num_heads
        if context_kv is None:
            context_kv = self.project_context(context)
        k, v = context_kv
        out = attend(split_heads(self.query(x), h), k, v, self.scale)
        return self.proj(merge_heads(out))

    def project_context(self, context: torch.Tensor) -> tuple:
        """Keys and values of the context, split into heads (reusable across queries)."""
        h = self.num_heads
        return split_heads(self.key(context), h), split_heads(self.value(context), h)
