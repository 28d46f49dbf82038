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
samplers, the transformer block) are in `diffusion_blocks.py`, shared with the VAE.

On the CPU the heavy operations go through `lavit_mlx.ops`: Winograd convolutions (with the
transformed kernels cached per conv), folded upsample+conv, GroupNorm+SiLU as one
scale/shift kernel, exps without libm. On a GPU MLX's own operations are used. For a
sampling loop, `prepare_context` projects the conditioning's cross-attention keys and
values once for all steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import List, Optional, Sequence, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import CheckpointError, LaVITError
from ..weights import Weights
from .. import ops
from .diffusion_blocks import (
    MASK_BIAS,
    BasicTransformerBlock,
    Conv2d,
    Downsample2D,
    GroupNorm,
    ResnetBlock2D,
    Transformer2DModel,
    UNetContext,
    Upsample2D,
    as_mx,
    load_diffusers_model,
    sanitize_conv_weights,
)

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
        return self.linear_2(ops.silu(self.linear_1(x)))


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
        temb_act = ops.silu(self.time_embed(timestep, batch, text_embeds, time_ids))

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
    return load_diffusers_model(folder, UNet2DConditionModel, UNetConfig, "UNet", dtype, source_layout)
