"""The denoising UNet of LaVIT's pixel decoders, with diffusers `UNet2DConditionModel` semantics.

Follows diffusers 0.42 (`models/unets/unet_2d_condition.py`, `unet_2d_blocks.py`,
`resnet.py`, `transformers/transformer_2d.py`, `attention.py`) for the block types that
SD-1.x, SD-2.x and SDXL use: `CrossAttnDownBlock2D`, `DownBlock2D`,
`UNetMidBlock2DCrossAttn`, `CrossAttnUpBlock2D`, `UpBlock2D`, with SDXL's `text_time`
added embedding. LaVIT's two UNets are of these shapes (LAVIT_REFERENCE.md section 3,
"Pixel decoders"). Any other config value raises `CheckpointError` naming the key.

Activations are channels-last (NHWC) inside, as MLX's convolutions want; `__call__`
takes and returns NCHW like diffusers. Parameter names are the diffusers state-dict
keys, so loading is config -> model -> `sanitize` (conv OIHW -> OHWI) -> strict load.
The building blocks (`Conv2d`, `GroupNorm`, `ResnetBlock2D`, `Attention`, up/down
samplers) are shared with the VAE (`vae.py`).

On the CPU the heavy operations go through `cpu_math`: Winograd convolutions (with the
transformed kernels cached per conv), folded upsample+conv, GroupNorm+SiLU as one
scale/shift kernel, exps without libm. On a GPU MLX's own operations are used. For a
sampling loop, `prepare_context` projects the conditioning's cross-attention keys and
values once for all steps.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import List, Optional, Sequence, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import CheckpointError, LaVITError
from ..weights import Weights, load_strict, read_weights
from . import cpu_conv, cpu_math
from .layers import merge_heads, split_heads

# diffusers' padding bias for masked-out context tokens (unet_2d_condition.py).
MASK_BIAS = -10000.0
# Fixed by diffusers whatever the config: GroupNorm eps of the transformer input norm,
# LayerNorm eps of the transformer blocks, the GEGLU width multiplier, the sinusoid base.
TRANSFORMER_GROUP_NORM_EPS = 1e-6
TRANSFORMER_LAYER_NORM_EPS = 1e-5
FEED_FORWARD_MULT = 4
MAX_PERIOD = 10000

SUPPORTED_DOWN = ("CrossAttnDownBlock2D", "DownBlock2D")
SUPPORTED_UP = ("CrossAttnUpBlock2D", "UpBlock2D")
SUPPORTED_MID = ("UNetMidBlock2DCrossAttn",)
SILU_NAMES = ("silu", "swish")

# Config keys whose only supported value is the one given (diffusers' default, "off").
UNSUPPORTED_UNLESS = {
    "class_embed_type": None,
    "num_class_embeds": None,
    "class_embeddings_concat": False,
    "time_cond_proj_dim": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "dual_cross_attention": False,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "time_embedding_type": "positional",
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "cross_attention_norm": None,
    "attention_type": "default",
    "num_attention_heads": None,
}


def per_block(value, count: int, key: str) -> list:
    """An int (or None) repeated `count` times, or a list/tuple of length `count`."""
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise CheckpointError(f"unet config: {key} has {len(value)} entries for {count} blocks")
        return list(value)
    return [value] * count


def check_activation(act_fn: str, source: str) -> None:
    if act_fn not in SILU_NAMES:
        raise CheckpointError(f"{source}: act_fn={act_fn!r} is not supported (only 'silu')")


@dataclass
class UNetConfig:
    """The diffusers `config.json` of a `UNet2DConditionModel` (defaults are diffusers')."""

    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: Sequence[str] = (
        "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    mid_block_type: Optional[str] = "UNetMidBlock2DCrossAttn"
    up_block_types: Sequence[str] = (
        "UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    only_cross_attention: Union[bool, Sequence[bool]] = False
    block_out_channels: Sequence[int] = (320, 640, 1280, 1280)
    layers_per_block: Union[int, Sequence[int]] = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: Optional[int] = 32
    norm_eps: float = 1e-5
    cross_attention_dim: Union[int, Sequence[int]] = 1280
    transformer_layers_per_block: Union[int, Sequence] = 1
    reverse_transformer_layers_per_block: Optional[Sequence] = None
    # With `num_attention_heads` null (every released config), diffusers reads this as
    # the number of heads, not their width (a historical naming quirk).
    attention_head_dim: Union[int, Sequence[int]] = 8
    use_linear_projection: bool = False
    upcast_attention: bool = False  # float32 everywhere here: no effect
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    time_embedding_dim: Optional[int] = None
    addition_embed_type: Optional[str] = None
    addition_time_embed_dim: Optional[int] = None
    projection_class_embeddings_input_dim: Optional[int] = None

    # Derived, one entry per down block (per layer for the transformer depths).
    heads: List[int] = field(init=False)
    layers: List[int] = field(init=False)
    context_dims: List[int] = field(init=False)
    down_transformer_depths: List[List[int]] = field(init=False)
    up_transformer_depths: List[List[int]] = field(init=False)
    mid_transformer_depth: int = field(init=False)
    time_embed_dim: int = field(init=False)

    @classmethod
    def from_dict(cls, config: dict) -> "UNetConfig":
        """Build from a diffusers config dict; unknown keys are ignored, unsupported values raise."""
        for key, allowed in UNSUPPORTED_UNLESS.items():
            if config.get(key, allowed) != allowed:
                raise CheckpointError(
                    f"unet config: {key}={config[key]!r} is not supported (only {allowed!r})")
        names = {f.name for f in fields(cls) if f.init}
        return cls(**{k: v for k, v in config.items() if k in names})

    def __post_init__(self):
        n = len(self.block_out_channels)
        for key, types, known in (("down_block_types", self.down_block_types, SUPPORTED_DOWN),
                                  ("up_block_types", self.up_block_types, SUPPORTED_UP)):
            if len(types) != n:
                raise CheckpointError(f"unet config: {key} has {len(types)} entries for {n} block_out_channels")
            for name in types:
                if name not in known:
                    raise CheckpointError(f"unet config: {key} entry {name!r} is not supported (one of {known})")
        if self.mid_block_type not in SUPPORTED_MID:
            raise CheckpointError(f"unet config: mid_block_type={self.mid_block_type!r} is not supported "
                                  f"(only {SUPPORTED_MID[0]!r})")
        if any(per_block(self.only_cross_attention, n, "only_cross_attention")):
            raise CheckpointError("unet config: only_cross_attention=true is not supported")
        if self.addition_embed_type not in (None, "text_time"):
            raise CheckpointError(
                f"unet config: addition_embed_type={self.addition_embed_type!r} is not supported "
                "(only null or 'text_time')")
        if self.addition_embed_type == "text_time" and (
                self.addition_time_embed_dim is None or self.projection_class_embeddings_input_dim is None):
            raise CheckpointError("unet config: addition_embed_type 'text_time' needs addition_time_embed_dim "
                                  "and projection_class_embeddings_input_dim")
        if self.norm_num_groups is None:
            raise CheckpointError("unet config: norm_num_groups=null is not supported")
        check_activation(self.act_fn, "unet config")
        for kernel_key in ("conv_in_kernel", "conv_out_kernel"):
            if getattr(self, kernel_key) % 2 != 1:
                raise CheckpointError(f"unet config: {kernel_key}={getattr(self, kernel_key)} must be odd")

        self.heads = per_block(self.attention_head_dim, n, "attention_head_dim")
        self.layers = per_block(self.layers_per_block, n, "layers_per_block")
        self.context_dims = per_block(self.cross_attention_dim, n, "cross_attention_dim")
        depths = per_block(self.transformer_layers_per_block, n, "transformer_layers_per_block")
        self.down_transformer_depths = [
            per_block(d, layers, "transformer_layers_per_block") for d, layers in zip(depths, self.layers)]
        self.mid_transformer_depth = depths[-1] if isinstance(depths[-1], int) else None
        if self.mid_transformer_depth is None:
            raise CheckpointError("unet config: a per-layer transformer_layers_per_block for the last block "
                                  "is not supported")
        if self.reverse_transformer_layers_per_block is None:
            if any(isinstance(d, (list, tuple)) for d in depths):
                # diffusers raises the same: an asymmetric UNet must say its up-path depths.
                raise CheckpointError("unet config: per-layer transformer_layers_per_block needs "
                                      "reverse_transformer_layers_per_block")
            reverse = depths[::-1]
        else:
            reverse = per_block(self.reverse_transformer_layers_per_block, n, "reverse_transformer_layers_per_block")
        self.up_transformer_depths = [
            per_block(d, layers + 1, "reverse_transformer_layers_per_block")
            for d, layers in zip(reverse, self.layers[::-1])]
        self.time_embed_dim = self.time_embedding_dim or self.block_out_channels[0] * 4


# --------------------------------------------------------------------------- building blocks
class DerivedWeights:
    """CPU re-arrangements of a conv kernel (`cpu_conv.derived_weights`), kept per key until
    the weight array is replaced.

    A plain object, not an array container, so MLX does not count it as a parameter.
    Winograd forms take (n/r)^2 times the kernel's memory: 16/9 for F(2x2, 3x3), 4x for
    F(4x4, 3x3).
    """

    def __init__(self):
        self.weight = None
        self.values: dict = {}

    def get(self, weight: mx.array, key: tuple) -> list:
        if self.weight is not weight:
            self.weight, self.values = weight, {}
        if key not in self.values:
            self.values[key] = cpu_conv.derived_weights(weight, key)
        return self.values[key]


class Conv2d(nn.Module):
    """A torch-style 2-D convolution on NHWC input; `weight` is (out, kh, kw, in) as MLX stores it.

    On the CPU, large 3x3 convolutions run as Winograd convolutions (see cpu_math).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, bias: bool = True):
        super().__init__()
        self.stride = stride
        self.padding = padding
        self.weight = mx.zeros((out_channels, kernel_size, kernel_size, in_channels))
        if bias:
            self.bias = mx.zeros((out_channels,))
        self.derived = DerivedWeights()

    def cached(self, key: tuple) -> list:
        return self.derived.get(self.weight, key)

    def __call__(self, x: mx.array) -> mx.array:
        return cpu_conv.conv2d(x, self.weight, self.get("bias"), self.stride, self.padding, self.cached)


class GroupNorm(nn.Module):
    """torch.nn.GroupNorm (affine) over channels-last input; `silu=True` fuses the activation."""

    def __init__(self, num_groups: int, num_channels: int, eps: float):
        super().__init__()
        self.num_groups = num_groups
        self.eps = eps
        self.weight = mx.ones((num_channels,))
        self.bias = mx.zeros((num_channels,))

    def __call__(self, x: mx.array, silu: bool = False) -> mx.array:
        return cpu_math.group_norm(x, self.weight, self.bias, self.num_groups, self.eps, silu)


class ResnetBlock2D(nn.Module):
    """diffusers `ResnetBlock2D` with time_scale_shift 'default' (temb added after conv1)."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: Optional[int], groups: int,
                 eps: float, output_scale_factor: float = 1.0):
        super().__init__()
        self.output_scale_factor = output_scale_factor
        self.norm1 = GroupNorm(groups, in_channels, eps)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        if temb_channels is not None:
            self.time_emb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = GroupNorm(groups, out_channels, eps)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.conv_shortcut = Conv2d(in_channels, out_channels, 1)

    def __call__(self, x: mx.array, temb_act: Optional[mx.array] = None) -> mx.array:
        """x: (B, H, W, C); temb_act: silu(time embedding), (B, temb_channels)."""
        h = self.conv1(self.norm1(x, silu=True))
        if temb_act is not None:
            h = h + self.time_emb_proj(temb_act)[:, None, None, :]
        h = self.conv2(self.norm2(h, silu=True))  # dropout: identity at inference
        if "conv_shortcut" in self:
            x = self.conv_shortcut(x)
        out = x + h
        return out if self.output_scale_factor == 1.0 else out / self.output_scale_factor


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv; with padding 0, diffusers pads one row/column at the bottom/right."""

    def __init__(self, channels: int, padding: int):
        super().__init__()
        self.pad_bottom_right = padding == 0
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=padding)

    def __call__(self, x: mx.array) -> mx.array:
        if self.pad_bottom_right:
            x = mx.pad(x, [(0, 0), (0, 1), (0, 1), (0, 0)])
        return self.conv(x)


def upsample_nearest(x: mx.array, size: Optional[tuple] = None) -> mx.array:
    """torch's `interpolate(mode='nearest')` on NHWC: 2x, or to `size` = (H, W)."""
    B, H, W, C = x.shape
    if size is None or tuple(size) == (2 * H, 2 * W):
        x = mx.broadcast_to(x[:, :, None, :, None, :], (B, H, 2, W, 2, C))
        return x.reshape(B, 2 * H, 2 * W, C)
    out_h, out_w = size
    # torch's nearest: source index floor(dst * in / out).
    rows = mx.array((np.arange(out_h) * H) // out_h)
    cols = mx.array((np.arange(out_w) * W) // out_w)
    return mx.take(mx.take(x, rows, axis=1), cols, axis=2)


class Upsample2D(nn.Module):
    """Nearest 2x upsampling, then a 3x3 conv (as four folded 2x2 convs on the CPU, see cpu_math)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def __call__(self, x: mx.array, size: Optional[tuple] = None) -> mx.array:
        B, H, W, _ = x.shape
        if size is not None and tuple(size) != (2 * H, 2 * W):
            return self.conv(upsample_nearest(x, size))
        return cpu_conv.upsample2x_conv3x3(x, self.conv.weight, self.conv.get("bias"), self.conv.cached)


@dataclass
class UNetContext:
    """A conditioning projected once: each cross-attention's keys and values, and the mask bias.

    Made by `UNet2DConditionModel.prepare_context`; pass it as `encoder_hidden_states` to
    reuse the projections across denoising steps (they do not depend on the latents).
    """

    keys_values: dict  # id(cross-attention module) -> (k, v), each (B, heads, L, head_dim)
    bias: Optional[mx.array]  # (B, 1, 1, L) additive mask bias, or None
    batch: int


class Attention(nn.Module):
    """diffusers `Attention` (processor AttnProcessor2_0) without norms: q/k/v, softmax, `to_out.0`."""

    def __init__(self, query_dim: int, heads: int, dim_head: int, context_dim: Optional[int] = None,
                 bias: bool = False):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.scale = dim_head ** -0.5
        self.to_q = nn.Linear(query_dim, inner, bias=bias)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=bias)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=bias)
        self.to_out = [nn.Linear(inner, query_dim)]  # to_out.1 is dropout

    def project_context(self, context: mx.array) -> tuple:
        """(k, v) of a (B, L, context_dim) context, each (B, heads, L, head_dim)."""
        return split_heads(self.to_k(context), self.heads), split_heads(self.to_v(context), self.heads)

    def __call__(self, x: mx.array, context=None, bias: Optional[mx.array] = None) -> mx.array:
        """x: (B, N, query_dim); context: (B, L, context_dim), a UNetContext, or None (self-attention);
        bias: additive, (B, 1, 1, L)."""
        if isinstance(context, UNetContext):
            k, v = context.keys_values[id(self)]
        else:
            k, v = self.project_context(x if context is None else context)
        q = split_heads(self.to_q(x), self.heads)  # (B, heads, N, head_dim)
        return self.to_out[0](merge_heads(cpu_math.attention_with_bias(q, k, v, self.scale, bias)))


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def __call__(self, x: mx.array) -> mx.array:
        hidden, gate = mx.split(self.proj(x), 2, axis=-1)
        return cpu_math.geglu(hidden, gate)


class Dropout(nn.Module):
    """Placeholder that keeps diffusers' list indices (`ff.net.2`); identity at inference."""

    def __call__(self, x: mx.array) -> mx.array:
        return x


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.net = [GEGLU(dim, dim * FEED_FORWARD_MULT), Dropout(), nn.Linear(dim * FEED_FORWARD_MULT, dim)]

    def __call__(self, x: mx.array) -> mx.array:
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        dim_head = dim // heads
        self.norm1 = nn.LayerNorm(dim, eps=TRANSFORMER_LAYER_NORM_EPS)
        self.attn1 = Attention(dim, heads, dim_head)
        self.norm2 = nn.LayerNorm(dim, eps=TRANSFORMER_LAYER_NORM_EPS)
        self.attn2 = Attention(dim, heads, dim_head, context_dim)
        self.norm3 = nn.LayerNorm(dim, eps=TRANSFORMER_LAYER_NORM_EPS)
        self.ff = FeedForward(dim)

    def __call__(self, x: mx.array, context: mx.array, context_bias: Optional[mx.array]) -> mx.array:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context, context_bias)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    """GroupNorm, `proj_in` (Linear or 1x1 conv), transformer blocks, `proj_out`, residual."""

    def __init__(self, channels: int, heads: int, depth: int, context_dim: int, groups: int,
                 use_linear_projection: bool):
        super().__init__()
        self.norm = GroupNorm(groups, channels, TRANSFORMER_GROUP_NORM_EPS)
        # A 1x1 conv is the same map as a Linear; only the stored weight shape differs.
        proj = (lambda: nn.Linear(channels, channels)) if use_linear_projection else (
            lambda: Conv2d(channels, channels, 1))
        self.proj_in = proj()
        self.transformer_blocks = [BasicTransformerBlock(channels, heads, context_dim) for _ in range(depth)]
        self.proj_out = proj()

    def __call__(self, x: mx.array, context: mx.array, context_bias: Optional[mx.array]) -> mx.array:
        B, H, W, C = x.shape
        h = self.proj_in(self.norm(x)).reshape(B, H * W, C)  # (B, tokens, C), raster order
        for block in self.transformer_blocks:
            h = block(h, context, context_bias)
        return self.proj_out(h.reshape(B, H, W, C)) + x


# --------------------------------------------------------------------------- UNet blocks
# diffusers passes `resnet_out_scale_factor` only to block types not supported here, so
# these blocks' resnets keep output scale 1 whatever the config says.
class DownBlock(nn.Module):
    """`CrossAttnDownBlock2D` (with_attention) or `DownBlock2D`."""

    def __init__(self, cfg: UNetConfig, index: int, in_channels: int, with_attention: bool, is_final: bool):
        super().__init__()
        out_channels = cfg.block_out_channels[index]
        self.resnets = [
            ResnetBlock2D(in_channels if j == 0 else out_channels, out_channels, cfg.time_embed_dim,
                          cfg.norm_num_groups, cfg.norm_eps)
            for j in range(cfg.layers[index])]
        if with_attention:
            self.attentions = [
                Transformer2DModel(out_channels, cfg.heads[index], depth, cfg.context_dims[index],
                                   cfg.norm_num_groups, cfg.use_linear_projection)
                for depth in cfg.down_transformer_depths[index]]
        if not is_final:
            self.downsamplers = [Downsample2D(out_channels, cfg.downsample_padding)]

    def __call__(self, x, temb_act, context, context_bias):
        skips = []
        for j, resnet in enumerate(self.resnets):
            x = resnet(x, temb_act)
            if "attentions" in self:
                x = self.attentions[j](x, context, context_bias)
            skips.append(x)
        if "downsamplers" in self:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UpBlock(nn.Module):
    """`CrossAttnUpBlock2D` (with_attention) or `UpBlock2D`; i counts from the bottom block."""

    def __init__(self, cfg: UNetConfig, i: int, prev_channels: int, with_attention: bool, is_final: bool):
        super().__init__()
        reversed_channels = cfg.block_out_channels[::-1]
        out_channels = reversed_channels[i]
        # Channels of the skip connection taken by the last resnet: the next-shallower block's.
        in_channels = reversed_channels[min(i + 1, len(reversed_channels) - 1)]
        num_layers = cfg.layers[::-1][i] + 1
        self.resnets = []
        for j in range(num_layers):
            skip_channels = in_channels if j == num_layers - 1 else out_channels
            resnet_in = prev_channels if j == 0 else out_channels
            self.resnets.append(ResnetBlock2D(resnet_in + skip_channels, out_channels, cfg.time_embed_dim,
                                              cfg.norm_num_groups, cfg.norm_eps))
        if with_attention:
            self.attentions = [
                Transformer2DModel(out_channels, cfg.heads[::-1][i], depth, cfg.context_dims[::-1][i],
                                   cfg.norm_num_groups, cfg.use_linear_projection)
                for depth in cfg.up_transformer_depths[i]]
        if not is_final:
            self.upsamplers = [Upsample2D(out_channels)]

    def __call__(self, x, skips, temb_act, context, context_bias, upsample_size=None):
        for j, resnet in enumerate(self.resnets):
            x = resnet(mx.concatenate([x, skips.pop()], axis=-1), temb_act)
            if "attentions" in self:
                x = self.attentions[j](x, context, context_bias)
        if "upsamplers" in self:
            x = self.upsamplers[0](x, upsample_size)
        return x


class UNetMidBlock2DCrossAttn(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        channels = cfg.block_out_channels[-1]

        def resnet():
            return ResnetBlock2D(channels, channels, cfg.time_embed_dim, cfg.norm_num_groups, cfg.norm_eps,
                                 cfg.mid_block_scale_factor)

        self.resnets = [resnet(), resnet()]
        self.attentions = [Transformer2DModel(channels, cfg.heads[-1], cfg.mid_transformer_depth,
                                              cfg.context_dims[-1], cfg.norm_num_groups,
                                              cfg.use_linear_projection)]

    def __call__(self, x, temb_act, context, context_bias):
        x = self.resnets[0](x, temb_act)
        return self.resnets[1](self.attentions[0](x, context, context_bias), temb_act)


class TimestepEmbedding(nn.Module):
    def __init__(self, in_channels: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear_2(cpu_math.silu(self.linear_1(x)))


def timestep_embedding(timesteps: mx.array, dim: int, flip_sin_to_cos: bool, freq_shift: float) -> mx.array:
    """diffusers `get_timestep_embedding`: sinusoids of (B,) timesteps -> (B, dim), float32."""
    half = dim // 2
    # Frequencies in float32 as diffusers computes them, so that t * freq rounds the same.
    exponent = (-math.log(MAX_PERIOD) * np.arange(half, dtype=np.float32)).astype(np.float32)
    freqs = mx.array(np.exp(exponent / np.float32(half - freq_shift)).astype(np.float32))
    args = timesteps.astype(mx.float32)[:, None] * freqs[None, :]
    sin, cos = mx.sin(args), mx.cos(args)
    emb = mx.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = mx.pad(emb, [(0, 0), (0, 1)])
    return emb


def as_mx(x, dtype=None) -> mx.array:
    x = x if isinstance(x, mx.array) else mx.array(np.asarray(x))
    return x if dtype is None else x.astype(dtype)


# --------------------------------------------------------------------------- the UNet
class UNet2DConditionModel(nn.Module):
    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = cfg = config
        channels = cfg.block_out_channels
        self.conv_in = Conv2d(cfg.in_channels, channels[0], cfg.conv_in_kernel, padding=cfg.conv_in_kernel // 2)
        self.time_embedding = TimestepEmbedding(channels[0], cfg.time_embed_dim)
        if cfg.addition_embed_type == "text_time":
            self.add_embedding = TimestepEmbedding(cfg.projection_class_embeddings_input_dim, cfg.time_embed_dim)

        n = len(channels)
        self.down_blocks = [
            DownBlock(cfg, i, channels[i - 1] if i else channels[0],
                      cfg.down_block_types[i] == "CrossAttnDownBlock2D", i == n - 1)
            for i in range(n)]
        self.mid_block = UNetMidBlock2DCrossAttn(cfg)
        reversed_channels = channels[::-1]
        self.up_blocks = [
            UpBlock(cfg, i, reversed_channels[i - 1] if i else reversed_channels[0],
                    cfg.up_block_types[i] == "CrossAttnUpBlock2D", i == n - 1)
            for i in range(n)]
        self.conv_norm_out = GroupNorm(cfg.norm_num_groups, channels[0], cfg.norm_eps)
        self.conv_out = Conv2d(channels[0], cfg.out_channels, cfg.conv_out_kernel, padding=cfg.conv_out_kernel // 2)

    def time_embed(self, timestep, batch: int, text_embeds=None, time_ids=None) -> mx.array:
        """The (B, time_embed_dim) embedding of the timestep (plus SDXL's text_time term)."""
        cfg = self.config
        t = mx.broadcast_to(as_mx(timestep, mx.float32).reshape(-1), (batch,))
        dtype = self.conv_in.weight.dtype
        emb = self.time_embedding(timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos,
                                                     cfg.freq_shift).astype(dtype))
        if cfg.addition_embed_type == "text_time":
            if text_embeds is None or time_ids is None:
                raise LaVITError("this UNet (addition_embed_type 'text_time') needs text_embeds and time_ids")
            time_ids = as_mx(time_ids, mx.float32)
            time_embeds = timestep_embedding(time_ids.reshape(-1), cfg.addition_time_embed_dim,
                                             cfg.flip_sin_to_cos, cfg.freq_shift)
            time_embeds = time_embeds.reshape(time_ids.shape[0], -1)  # (B, 6 * addition_time_embed_dim)
            added = mx.concatenate([as_mx(text_embeds).astype(dtype), time_embeds.astype(dtype)], axis=-1)
            emb = emb + self.add_embedding(added)
        return emb

    def __call__(
        self,
        sample: mx.array,
        timestep,
        encoder_hidden_states: Union[mx.array, UNetContext],
        encoder_attention_mask: Optional[mx.array] = None,
        text_embeds: Optional[mx.array] = None,
        time_ids: Optional[mx.array] = None,
    ) -> mx.array:
        """The noise (or v) prediction, as `UNet2DConditionModel.forward(...).sample`.

        Args:
            sample: (B, in_channels, H, W) latents, NCHW (mx.array or numpy).
            timestep: a number, or (B,) / () array; may be fractional.
            encoder_hidden_states: (B, L, cross_attention_dim) context, or a UNetContext
                from `prepare_context` (then the mask goes there).
            encoder_attention_mask: optional (B, L) mask, True/1 = attend.
            text_embeds, time_ids: SDXL's pooled text embedding (B, D) and (B, 6) size/crop
                ids; required when addition_embed_type is 'text_time'.
        Returns:
            (B, out_channels, H, W), NCHW.
        """
        cfg = self.config
        dtype = self.conv_in.weight.dtype
        x = as_mx(sample, dtype).transpose(0, 2, 3, 1)  # (B, H, W, C)
        if cfg.center_input_sample:
            x = 2 * x - 1.0
        batch = x.shape[0]
        if isinstance(encoder_hidden_states, UNetContext):
            if encoder_attention_mask is not None:
                raise LaVITError("pass encoder_attention_mask to prepare_context, not with a prepared context")
            if encoder_hidden_states.batch != batch:
                raise LaVITError(f"the prepared context has batch {encoder_hidden_states.batch}, "
                                 f"the latents {batch}")
            context, context_bias = encoder_hidden_states, encoder_hidden_states.bias
        else:
            context = as_mx(encoder_hidden_states, dtype)
            context_bias = self.mask_bias(encoder_attention_mask)
        temb_act = cpu_math.silu(self.time_embed(timestep, batch, text_embeds, time_ids))

        # Latent sizes that the down path cannot halve exactly: upsample back to the skip's size.
        levels = len(self.up_blocks) - 1
        uneven = any(d % (2 ** levels) for d in x.shape[1:3])

        x = self.conv_in(x)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, temb_act, context, context_bias)
            skips.extend(block_skips)
        x = self.mid_block(x, temb_act, context, context_bias)
        for i, block in enumerate(self.up_blocks):
            taken = skips[-len(block.resnets):]
            skips = skips[:-len(block.resnets)]
            size = tuple(skips[-1].shape[1:3]) if uneven and i < len(self.up_blocks) - 1 else None
            x = block(x, taken, temb_act, context, context_bias, size)
        x = self.conv_out(self.conv_norm_out(x, silu=True))
        return x.transpose(0, 3, 1, 2)

    def mask_bias(self, encoder_attention_mask) -> Optional[mx.array]:
        """(B, L) keep-mask (True/1 = attend) -> additive (B, 1, 1, L) bias, as diffusers."""
        if encoder_attention_mask is None:
            return None
        keep = as_mx(encoder_attention_mask).astype(self.conv_in.weight.dtype)
        return ((1 - keep) * MASK_BIAS)[:, None, None, :]

    def prepare_context(self, encoder_hidden_states, encoder_attention_mask=None) -> UNetContext:
        """Project the conditioning for every cross-attention once (reusable for all steps).

        Args:
            encoder_hidden_states: (B, L, cross_attention_dim).
            encoder_attention_mask: optional (B, L) mask, True/1 = attend.
        Returns:
            A UNetContext to pass as `encoder_hidden_states`; results equal passing the arrays.
        """
        context = as_mx(encoder_hidden_states, self.conv_in.weight.dtype)
        keys_values = {
            id(module.attn2): module.attn2.project_context(context)
            for _, module in self.named_modules() if isinstance(module, BasicTransformerBlock)
        }
        return UNetContext(keys_values, self.mask_bias(encoder_attention_mask), context.shape[0])

    def sanitize(self, weights: Weights, source_layout: str = "torch") -> Weights:
        """diffusers state dict -> this module's layout: conv weights (O, I, kh, kw) -> (O, kh, kw, I).

        Each 4-D weight is converted when only the converted shape fits the model, kept
        when only its own shape fits, and follows `source_layout` ('torch' or 'mlx') when
        both fit (e.g. a 1x1 conv with one input channel). Pure; shape-decided keys are
        left unchanged by a second pass.
        """
        return sanitize_conv_weights(self, weights, source_layout)


def sanitize_conv_weights(model: nn.Module, weights: Weights, source_layout: str) -> Weights:
    if source_layout not in ("torch", "mlx"):
        raise LaVITError(f"source_layout={source_layout!r}: expected 'torch' or 'mlx'")
    expected = {k: tuple(v.shape) for k, v in _flat_parameters(model).items() if v.ndim == 4}
    out = {}
    for key, value in weights.items():
        want = expected.get(key)
        if want is not None and value.ndim == 4:
            # (O, I, kh, kw) -> (O, kh, kw, I), copied: a strided view would be re-copied by every conv.
            converted = mx.contiguous(value.transpose(0, 2, 3, 1))
            fits_as_is, fits_converted = tuple(value.shape) == want, tuple(converted.shape) == want
            if fits_converted and (not fits_as_is or source_layout == "torch"):
                value = converted
        out[key] = value
    return out


def _flat_parameters(model: nn.Module) -> dict:
    from mlx.utils import tree_flatten

    return dict(tree_flatten(model.parameters()))


def read_diffusers_folder(folder: Path, what: str):
    """(config dict, weights) of a diffusers model folder: config.json and
    diffusion_pytorch_model.{safetensors,bin}, or a sharded `.safetensors.index.json`."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{folder}: no config.json for the {what}")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_path}: not valid JSON ({exc})") from None
    stem = "diffusion_pytorch_model"
    index = folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        weights = {}
        for shard in shards:
            weights.update(read_weights(folder / shard))
        return config, weights
    for suffix in (".safetensors", ".bin"):
        if (folder / f"{stem}{suffix}").is_file():
            return config, read_weights(folder / f"{stem}{suffix}")
    raise CheckpointError(f"{folder}: no {stem}.safetensors or {stem}.bin for the {what}")


def load_unet(folder: Union[str, Path], dtype: mx.Dtype = mx.float32,
              source_layout: str = "torch") -> UNet2DConditionModel:
    """Load a diffusers `unet/` folder (config.json + weights) into `UNet2DConditionModel`.

    Args:
        folder: the folder holding `config.json` and `diffusion_pytorch_model.*`.
        dtype: the parameter dtype (float32 by default).
        source_layout: 'torch' for diffusers files; 'mlx' for weights saved from this model.
    Returns:
        The model, weights loaded strictly.
    """
    config, weights = read_diffusers_folder(folder, "UNet")
    model = UNet2DConditionModel(UNetConfig.from_dict(config))
    return load_strict(model, model.sanitize(weights, source_layout), str(folder), dtype=dtype)
