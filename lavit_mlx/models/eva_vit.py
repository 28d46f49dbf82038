"""EVA-CLIP ViT-g/14, the frozen vision encoder of LaVIT.

Follows the official `LaVIT/models/modeling_visual_encoder.py` (`EVAVisionTransformer`
as built by `build_eva_clip`): conv patch embedding, CLS token, learned position
embedding, pre-norm blocks with a bias-free `qkv` whose bias is `q_bias | 0 | v_bias`.
No layer scale, rope or relative position bias. Parameter names are the checkpoint's.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..config import EVAConfig
from .. import ops
from .layers import Mlp, merge_heads, split_heads


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = mx.zeros((dim,))
        self.v_bias = mx.zeros((dim,))
        self.proj = nn.Linear(dim, dim)

    def __call__(self, x: mx.array) -> mx.array:
        bias = mx.concatenate([self.q_bias, mx.zeros_like(self.v_bias), self.v_bias])
        q, k, v = mx.split(self.qkv(x) + bias, 3, axis=-1)
        h = self.num_heads
        out = ops.attention(split_heads(q, h), split_heads(k, h), split_heads(v, h), self.scale)
        return self.proj(merge_heads(out))


class Block(nn.Module):
    def __init__(self, config: EVAConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.width, eps=config.eps)
        self.attn = Attention(config.width, config.num_heads)
        self.norm2 = nn.LayerNorm(config.width, eps=config.eps)
        self.mlp = Mlp(config.width, config.mlp_dim)

    def __call__(self, x: mx.array) -> mx.array:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, config: EVAConfig):
        super().__init__()
        p = config.patch_size
        self.proj = nn.Conv2d(3, config.width, kernel_size=p, stride=p)

    def __call__(self, pixels_nhwc: mx.array) -> mx.array:
        x = self.proj(pixels_nhwc)  # (B, H/p, W/p, width)
        B, gh, gw, C = x.shape
        return x.reshape(B, gh * gw, C)  # raster order, as torch's flatten(2)


class EVAVisionTransformer(nn.Module):
    def __init__(self, config: EVAConfig):
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config)
        self.cls_token = mx.zeros((1, 1, config.width))
        self.pos_embed = mx.zeros((1, config.num_patches + 1, config.width))
        self.blocks = [Block(config) for _ in range(config.depth)]
        # The CLIP head (final norm + projection) is part of the checkpoint; the tokenizer
        # reads the features before it, so they are loaded but not applied.
        self.norm = nn.LayerNorm(config.width, eps=config.eps)
        self.head = nn.Linear(config.width, config.head_dim_out)

    def __call__(self, pixel_values: mx.array) -> mx.array:
        """Features of the last block before `norm`, CLS first: (B, 1 + patches, width).

        Args:
            pixel_values: (B, 3, H, W) processed images, NCHW as the processor returns.
        """
        x = self.patch_embed(pixel_values.transpose(0, 2, 3, 1))
        cls = mx.broadcast_to(self.cls_token, (x.shape[0], 1, x.shape[-1]))
        x = mx.concatenate([cls.astype(x.dtype), x], axis=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return x

    def sanitize(self, weights: dict, source_layout: str = "torch") -> dict:
        """torch conv layout (O, I, kh, kw) -> MLX (O, kh, kw, I); a no-op on MLX layout
        (decided by the shape: 3 input channels), so applying it twice changes nothing."""
        key = "patch_embed.proj.weight"
        w = weights.get(key)
        if w is not None and w.ndim == 4 and w.shape[1] == 3 and w.shape[3] != 3:
            weights = dict(weights)
            weights[key] = mx.contiguous(w.transpose(0, 2, 3, 1))
        return weights
