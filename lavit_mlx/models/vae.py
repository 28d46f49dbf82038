"""The image autoencoder of LaVIT's pixel decoders, with diffusers `AutoencoderKL` semantics.

Follows diffusers 0.42 (`models/autoencoders/autoencoder_kl.py` and `vae.py`: `Encoder`,
`Decoder`, `DiagonalGaussianDistribution`, `UNetMidBlock2D`). The pipelines decode
`latents / scaling_factor` and map the result to pixels with clamp(x / 2 + 0.5)
(LAVIT_REFERENCE.md section 3, "Pixel decoders"). Images and latents are NCHW at the
interface, NHWC inside. Parameter names are the diffusers state-dict keys.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional, Sequence, Union

import mlx.core as mx
import mlx.nn as nn

from ..errors import CheckpointError
from ..weights import Weights
from .. import ops
from .diffusion_blocks import (
    Attention,
    Conv2d,
    Downsample2D,
    GroupNorm,
    ResnetBlock2D,
    Upsample2D,
    as_mx,
    load_diffusers_model,
    sanitize_conv_weights,
)
from .unet import check_activation

# Fixed by diffusers' Encoder/Decoder whatever the config.
VAE_NORM_EPS = 1e-6
LOGVAR_RANGE = (-30.0, 20.0)
# Mid-block attention keys of checkpoints written before diffusers 0.14, renamed on load.
LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


@dataclass
class VAEConfig:
    """The diffusers `config.json` of an `AutoencoderKL` (defaults are diffusers')."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: Sequence[str] = ("DownEncoderBlock2D",)
    up_block_types: Sequence[str] = ("UpDecoderBlock2D",)
    block_out_channels: Sequence[int] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: Optional[float] = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @classmethod
    def from_dict(cls, config: dict) -> "VAEConfig":
        """Build from a diffusers config dict; unknown keys are ignored, unsupported values raise."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names})

    def __post_init__(self):
        n = len(self.block_out_channels)
        for key, types, known in (("down_block_types", self.down_block_types, "DownEncoderBlock2D"),
                                  ("up_block_types", self.up_block_types, "UpDecoderBlock2D")):
            if len(types) != n:
                raise CheckpointError(f"vae config: {key} has {len(types)} entries for {n} block_out_channels")
            for name in types:
                if name != known:
                    raise CheckpointError(f"vae config: {key} entry {name!r} is not supported (only {known!r})")
        if not isinstance(self.layers_per_block, int):
            raise CheckpointError(f"vae config: layers_per_block={self.layers_per_block!r} must be an int")
        check_activation(self.act_fn, "vae config")


class MidBlockAttention(Attention):
    """The VAE mid-block attention: GroupNorm, one-head self-attention over pixels, residual."""

    def __init__(self, channels: int, groups: int):
        super().__init__(channels, heads=1, dim_head=channels, bias=True)
        self.group_norm = GroupNorm(groups, channels, VAE_NORM_EPS)

    def __call__(self, x: mx.array) -> mx.array:
        B, H, W, C = x.shape
        tokens = self.group_norm(x).reshape(B, H * W, C)  # (B, pixels, C), raster order
        return super().__call__(tokens).reshape(B, H, W, C) + x


class UNetMidBlock2D(nn.Module):
    def __init__(self, channels: int, groups: int, add_attention: bool):
        super().__init__()
        self.resnets = [ResnetBlock2D(channels, channels, None, groups, VAE_NORM_EPS) for _ in range(2)]
        if add_attention:
            self.attentions = [MidBlockAttention(channels, groups)]

    def __call__(self, x: mx.array) -> mx.array:
        x = self.resnets[0](x)
        if "attentions" in self:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class DownEncoderBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = [ResnetBlock2D(in_channels if j == 0 else out_channels, out_channels, None, groups,
                                      VAE_NORM_EPS) for j in range(num_layers)]
        if downsample:
            self.downsamplers = [Downsample2D(out_channels, padding=0)]  # the encoder pads bottom/right

    def __call__(self, x: mx.array) -> mx.array:
        for resnet in self.resnets:
            x = resnet(x)
        return self.downsamplers[0](x) if "downsamplers" in self else x


class UpDecoderBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = [ResnetBlock2D(in_channels if j == 0 else out_channels, out_channels, None, groups,
                                      VAE_NORM_EPS) for j in range(num_layers)]
        if upsample:
            self.upsamplers = [Upsample2D(out_channels)]

    def __call__(self, x: mx.array) -> mx.array:
        for resnet in self.resnets:
            x = resnet(x)
        return self.upsamplers[0](x) if "upsamplers" in self else x


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        channels = cfg.block_out_channels
        groups = cfg.norm_num_groups
        self.conv_in = Conv2d(cfg.in_channels, channels[0], 3, padding=1)
        self.down_blocks = [
            DownEncoderBlock2D(channels[i - 1] if i else channels[0], channels[i], cfg.layers_per_block, groups,
                               downsample=i < len(channels) - 1)
            for i in range(len(channels))]
        self.mid_block = UNetMidBlock2D(channels[-1], groups, cfg.mid_block_add_attention)
        self.conv_norm_out = GroupNorm(groups, channels[-1], VAE_NORM_EPS)
        self.conv_out = Conv2d(channels[-1], 2 * cfg.latent_channels, 3, padding=1)  # mean and logvar

    def __call__(self, x: mx.array) -> mx.array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(self.conv_norm_out(self.mid_block(x), silu=True))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        reversed_channels = cfg.block_out_channels[::-1]
        groups = cfg.norm_num_groups
        self.conv_in = Conv2d(cfg.latent_channels, reversed_channels[0], 3, padding=1)
        self.mid_block = UNetMidBlock2D(reversed_channels[0], groups, cfg.mid_block_add_attention)
        self.up_blocks = [
            UpDecoderBlock2D(reversed_channels[i - 1] if i else reversed_channels[0], reversed_channels[i],
                             cfg.layers_per_block + 1, groups, upsample=i < len(reversed_channels) - 1)
            for i in range(len(reversed_channels))]
        self.conv_norm_out = GroupNorm(groups, reversed_channels[-1], VAE_NORM_EPS)
        self.conv_out = Conv2d(reversed_channels[-1], cfg.out_channels, 3, padding=1)

    def __call__(self, z: mx.array) -> mx.array:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(self.conv_norm_out(x, silu=True))


@dataclass
class LatentDistribution:
    """diffusers `DiagonalGaussianDistribution`; arrays are NCHW (B, latent_channels, h, w)."""

    mean: mx.array
    logvar: mx.array

    @property
    def std(self) -> mx.array:
        return ops.exp(0.5 * self.logvar)

    def sample(self, key: Optional[mx.array] = None) -> mx.array:
        return self.mean + self.std * mx.random.normal(self.mean.shape, dtype=self.mean.dtype, key=key)


class AutoencoderKL(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        latent = config.latent_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        if config.use_quant_conv:
            self.quant_conv = Conv2d(2 * latent, 2 * latent, 1)
        if config.use_post_quant_conv:
            self.post_quant_conv = Conv2d(latent, latent, 1)

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    @property
    def scale_factor(self) -> int:
        """Pixels per latent along each side: 2^(levels - 1) (8 for the released VAEs)."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    def encode(self, images: mx.array) -> LatentDistribution:
        """Posterior of (B, in_channels, H, W) images in [-1, 1], NCHW.

        Returns:
            LatentDistribution with `mean`, `logvar` (clamped to [-30, 20]), `std` and
            `sample(key)`, each (B, latent_channels, H / scale_factor, W / scale_factor).
            Multiply by `scaling_factor` to get UNet latents.
        """
        dtype = self.encoder.conv_in.weight.dtype
        moments = self.encoder(as_mx(images, dtype).transpose(0, 2, 3, 1))
        if "quant_conv" in self:
            moments = self.quant_conv(moments)
        mean, logvar = mx.split(moments.transpose(0, 3, 1, 2), 2, axis=1)
        return LatentDistribution(mean, mx.clip(logvar, *LOGVAR_RANGE))

    def decode(self, z: mx.array) -> mx.array:
        """Images (B, out_channels, H, W) in about [-1, 1] from unscaled latents z, NCHW.

        Args:
            z: (B, latent_channels, h, w) = UNet latents / scaling_factor (as diffusers'
               `vae.decode`; the caller divides).
        """
        x = as_mx(z, self.decoder.conv_in.weight.dtype).transpose(0, 2, 3, 1)
        if "post_quant_conv" in self:
            x = self.post_quant_conv(x)
        return self.decoder(x).transpose(0, 3, 1, 2)

    def sanitize(self, weights: Weights, source_layout: str = "torch") -> Weights:
        """diffusers state dict -> this module: legacy mid-block attention names
        (`query`/`key`/`value`/`proj_attn`, Linear or 1x1-conv shaped) -> `to_q`/`to_k`/`to_v`/
        `to_out.0`; conv weights (O, I, kh, kw) -> (O, kh, kw, I) as `unet.sanitize_conv_weights`
        decides (the encoder's 3x3 conv_in on 3 channels fits both layouts: `source_layout`
        says which one the file has)."""
        renamed = {}
        for key, value in weights.items():
            parts = key.split(".")
            if "attentions" in parts and parts[-2] in LEGACY_ATTENTION_NAMES:
                parts[-2] = LEGACY_ATTENTION_NAMES[parts[-2]]
                if value.ndim == 4:
                    value = value.reshape(value.shape[:2])  # (O, I, 1, 1) 1x1 conv -> Linear (O, I)
            renamed[".".join(parts)] = value
        return sanitize_conv_weights(self, renamed, source_layout)


def load_vae(folder: Union[str, Path], dtype: mx.Dtype = mx.float32, source_layout: str = "torch") -> AutoencoderKL:
    """Load a diffusers `vae/` folder (config.json + weights) into `AutoencoderKL`.

    Args:
        folder: the folder holding `config.json` and `diffusion_pytorch_model.*`.
        dtype: the parameter dtype (float32 by default).
        source_layout: 'torch' for diffusers files; 'mlx' for weights saved from this model.
    Returns:
        The model, weights loaded strictly.
    """
    return load_diffusers_model(folder, AutoencoderKL, VAEConfig, "VAE", dtype, source_layout)
