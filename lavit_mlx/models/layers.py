"""Transformer layers shared by the token merger and the VQ decoders.

Parameter names follow the official checkpoint keys (`qkv`, `proj`, `query`, `key`,
`value`, `mlp.fc1`, `mlp.fc2`). The attention *rule* differs between users (plain
softmax, policy-masked softmax, additive padding mask), so each attention module takes
the function that turns (q, k, v) into per-head outputs.
"""

from __future__ import annotations

from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn

from .. import ops

# attend(q, k, v, scale) -> (B, heads, N, head_dim)
AttendFn = Callable[[mx.array, mx.array, mx.array, float], mx.array]


def softmax_attend(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    return ops.attention(q, k, v, scale)


class GELU(nn.Module):
    """Exact (erf) GELU (`ops.gelu`)."""

    def __call__(self, x: mx.array) -> mx.array:
        return ops.gelu(x)


def split_heads(x: mx.array, num_heads: int) -> mx.array:
    B, N, C = x.shape
    return x.reshape(B, N, num_heads, C // num_heads).transpose(0, 2, 1, 3)  # (B, heads, N, hd)


def merge_heads(x: mx.array) -> mx.array:
    B, H, N, D = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, N, H * D)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(ops.gelu(self.fc1(x)))


class SelfAttention(nn.Module):
    """Fused `qkv` projection (with bias) and output `proj`."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def __call__(self, x: mx.array, attend: AttendFn = softmax_attend) -> mx.array:
        q, k, v = mx.split(self.qkv(x), 3, axis=-1)
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

    def __call__(
        self,
        x: mx.array,
        context: mx.array,
        attend: AttendFn = softmax_attend,
        context_kv: Optional[tuple] = None,
    ) -> mx.array:
        h = self.num_heads
        if context_kv is None:
            context_kv = self.project_context(context)
        k, v = context_kv
        out = attend(split_heads(self.query(x), h), k, v, self.scale)
        return self.proj(merge_heads(out))

    def project_context(self, context: mx.array) -> tuple:
        """Keys and values of the context, split into heads (reusable across queries)."""
        h = self.num_heads
        return split_heads(self.key(context), h), split_heads(self.value(context), h)
