"""EVA-CLIP ViT-g/14, the frozen vision encoder of LaVIT, in PyTorch.

Mirror of `lavit_mlx.models.eva_vit` (same names, same semantics) for the training
path; both follow the official `LaVIT/models/modeling_visual_encoder.py`
(`EVAVisionTransformer` as built by `build_eva_clip`): conv patch embedding, CLS token,
learned position embedding, pre-norm blocks with a bias-free `qkv` whose bias is
`q_bias | 0 | v_bias`. No layer scale, rope or relative position bias. Parameter names
are the checkpoint's. Frozen during LaVIT training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lavit_mlx.config import EVAConfig

from .layers import Mlp, merge_heads, split_heads


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        q, k, v = (self.qkv(x) + bias).chunk(3, dim=-1)
        h = self.num_heads
        out = F.scaled_dot_product_attention(split_heads(q, h), split_heads(k, h), split_heads(v, h), scale=self.scale)
        return self.proj(merge_heads(out))


class Block(nn.Module):
    def __init__(self, config: EVAConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.width, eps=config.eps)
        self.attn = Attention(config.width, config.num_heads)
        self.norm2 = nn.LayerNorm(config.width, eps=config.eps)
        self.mlp = Mlp(config.width, config.mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, config: EVAConfig):
        super().__init__()
        p = config.patch_size
        self.proj = nn.Conv2d(3, config.width, kernel_size=p, stride=p)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # torch convolves NCHW (MLX NHWC): (B, width, H/p, W/p) -> (B, patches, width), raster order
        return self.proj(pixel_values).flatten(2).transpose(1, 2)


class EVAVisionTransformer(nn.Module):
    def __init__(self, config: EVAConfig):
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_patches + 1, config.width))
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        # The CLIP head (final norm + projection) is part of the checkpoint; the tokenizer
        # reads the features before it, so they are loaded but not applied.
        self.norm = nn.LayerNorm(config.width, eps=config.eps)
        self.head = nn.Linear(config.width, config.head_dim_out)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Features of the last block before `norm`, CLS first: (B, 1 + patches, width).

        Args:
            pixel_values: (B, 3, H, W) processed images, NCHW as the processor returns.
        """
        x = self.patch_embed(pixel_values)
        cls = self.cls_token.expand(x.shape[0], 1, x.shape[-1])
        x = torch.cat([cls.to(x.dtype), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return x
