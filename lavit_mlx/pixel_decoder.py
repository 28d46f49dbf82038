"""LaVIT's pixel decoders: VQ-decoder conditioning -> guided UNet denoising -> VAE -> pixels.

Follows the official `lavit_for_generation.py` (`generate_image` for the high-res
SDXL-shaped decoder, `pixel_decoding_origin` for the low-res SD-1.5-shaped one) and
`image_detokenize.py`, with LAVIT_REFERENCE.md section 4:

- high-res: negative conditioning is zeros (prompt embeddings and pooled), `time_ids`
  = (height, width, 0, 0, height, width), guidance 7.0, DDIM 25 steps;
- low-res: negative conditioning is `uncond_embeddings` padded with zeros to the token
  length, with its own attention mask (the positive one attends everywhere),
  guidance 5.0, DDIM 50 steps, 512x512;
- both branches run in one batch (`uncond + g * (cond - uncond)`), latents start as
  N(0, 1) * init_noise_sigma, decode with `latents / scaling_factor`, image =
  clamp(x / 2 + 0.5).

`denoise` is a generator that yields after every step; the caller owns progress bars.

Not in the release: a UNet whose config holds `lavit_spatial_context: true` (the pixel
stage's `model.spatial_context`) also reads the context as a map: each patch's conditioning
vector laid over the latent pixels its patch covers and concatenated to the latents' channels
(as inpainting UNets take their mask), so that it need not find by cross-attention alone
which patch of the conditioning belongs where. Its negative branch's map is the negative
context's, zeros for the high-res decoder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Optional, Tuple

import mlx.core as mx
import numpy as np

from .errors import LaVITError
from .memory import MemoryEstimate, check_pixel_memory, estimate_pixel_decoding
from .models.unet import UNet2DConditionModel
from .models.vae import AutoencoderKL
from .schedulers import Scheduler, make_scheduler


@dataclass
class DecodingDefaults:
    """The release's settings of one pixel decoder (reference section 4)."""

    size: Tuple[int, int]  # (height, width)
    steps: int
    guidance: float


# The UNet config key (ignored by diffusers and `UNetConfig`) of the spatial context input.
SPATIAL_CONTEXT = "lavit_spatial_context"


def spatial_map(context: mx.array, height: int, width: int) -> mx.array:
    """(B, N, D) per-patch conditioning on a square grid -> (B, D, height, width): latent pixel
    (i, j) takes the vector of the patch under its centre."""
    batch, tokens, dim = context.shape
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise LaVITError(f"a spatial context needs a square grid of tokens, not {tokens}")
    rows = ((np.arange(height) + 0.5) * grid / height).astype(np.int32)
    cols = ((np.arange(width) + 0.5) * grid / width).astype(np.int32)
    index = mx.array((rows[:, None] * grid + cols[None, :]).reshape(-1))
    laid = mx.take(context, index, axis=1).reshape(batch, height, width, dim)
    return laid.transpose(0, 3, 1, 2)


HIGHRES_DEFAULTS = DecodingDefaults(size=(1024, 1024), steps=25, guidance=7.0)
LOWRES_DEFAULTS = DecodingDefaults(size=(512, 512), steps=50, guidance=5.0)

# The release's six aspect ratios of the high-res decoder, as (height, width).
ASPECT_RATIOS = {
    "1:1": (1024, 1024),
    "4:3": (896, 1152),
    "3:2": (832, 1216),
    "16:9": (768, 1344),
    "2:3": (1216, 832),
    "3:4": (1152, 896),
}


class PixelDecoder:
    """One of the two pixel decoders: UNet, VAE, scheduler config (and the low-res
    decoder's unconditional embedding); `spatial_context` as the module docstring says."""

    def __init__(self, unet: UNet2DConditionModel, vae: AutoencoderKL, scheduler_config: dict,
                 highres: bool, uncond_embeddings: Optional[mx.array] = None, spatial_context: bool = False):
        self.unet = unet
        self.spatial_context = spatial_context
        self.latent_channels = unet.config.out_channels
        if spatial_context and unet.config.in_channels != self.latent_channels + unet.config.context_dims[0]:
            raise LaVITError(f"a UNet with a spatial context takes {self.latent_channels} latent + "
                             f"{unet.config.context_dims[0]} context channels, not {unet.config.in_channels}")
        self.vae = vae
        self.scheduler_config = scheduler_config
        self.highres = highres
        self.uncond_embeddings = uncond_embeddings
        self.defaults = HIGHRES_DEFAULTS if highres else LOWRES_DEFAULTS
        if not highres and uncond_embeddings is None:
            raise LaVITError("the low-res pixel decoder needs its uncond_embeddings")

    @property
    def scaling_factor(self) -> float:
        return self.vae.scaling_factor

    @property
    def vae_scale_factor(self) -> int:
        return self.vae.scale_factor

    def scheduler(self, name: str = "ddim") -> Scheduler:
        """A fresh scheduler built from the folder's scheduler config ('ddim' as the release)."""
        return make_scheduler(name, self.scheduler_config)

    def check_size(self, height: int, width: int) -> None:
        step = self.vae_scale_factor
        for name, value in (("height", height), ("width", width)):
            if value <= 0 or value % step:
                raise LaVITError(f"{name} {value} is not a positive multiple of {step} (one latent pixel)")

    # ------------------------------------------------------------ memory
    def weight_bytes(self) -> int:
        """Bytes of the loaded UNet, VAE (and unconditional embedding) parameters."""
        from mlx.utils import tree_flatten

        arrays = [v for _, v in tree_flatten(self.unet.parameters()) + tree_flatten(self.vae.parameters())]
        if self.uncond_embeddings is not None:
            arrays.append(self.uncond_embeddings)
        return sum(a.nbytes for a in arrays)

    def memory_estimate(self, height: int, width: int, num_images: int = 1) -> MemoryEstimate:
        """Estimated peak memory of `denoise` + `to_images` at this size (`lavit_mlx.memory`).

        Args:
            height, width: output size in pixels.
            num_images: images per batch (the UNet runs twice as many rows: guidance).
        Returns:
            A MemoryEstimate, weights included.
        """
        self.check_size(height, width)
        dtype = self.unet.conv_in.weight.dtype
        cpu = dtype == mx.float32 and mx.default_device() == mx.cpu
        return estimate_pixel_decoding(self.unet.config, self.vae.config, height, width, num_images,
                                       dtype.size, self.weight_bytes(), cpu=cpu)

    def check_memory(self, height: int, width: int, num_images: int = 1, available: Optional[int] = None) -> None:
        """Raise a one-line LaVITError when decoding at this size cannot fit in memory.

        The loaded weights are already resident: only the rest of the estimate is
        compared with `available` (default `lavit_mlx.memory.available_memory()`).
        """
        estimate = self.memory_estimate(height, width, num_images)
        check_pixel_memory(estimate, available, resident=estimate.breakdown["weights"])

    # ------------------------------------------------------------ single passes (parity)
    def unet_forward(self, latents, timestep, context, pooled=None, time_ids=None, mask=None,
                     spatial=None) -> mx.array:
        """One UNet noise prediction (NCHW) for the given conditioning (`spatial`: the context's
        map, concatenated to the latents when the UNet takes one)."""
        if spatial is not None:
            latents = mx.concatenate([latents, spatial.astype(latents.dtype)], axis=1)
        if self.highres:
            return self.unet(latents, timestep, context, text_embeds=pooled, time_ids=time_ids)
        return self.unet(latents, timestep, context, encoder_attention_mask=mask)

    def vae_decode_raw(self, z) -> mx.array:
        """The VAE decoder on unscaled latents (latents / scaling_factor): NCHW in ~[-1, 1]."""
        return self.vae.decode(z)

    # ------------------------------------------------------------ guided denoising
    def guidance_batch(self, conditioning, height: int, width: int) -> dict:
        """UNet keyword inputs for [negative; positive] rows of a batch of B images.

        Args:
            conditioning: high-res (prompt_embeds (B, N, 2048), pooled (B, 1280));
                low-res context (B, N, 768), as `LaVIT.decode_codes` returns.
        """
        if self.highres:
            prompt, pooled = conditioning
            batch = prompt.shape[0]
            time_ids = mx.broadcast_to(mx.array([height, width, 0, 0, height, width], mx.float32), (2 * batch, 6))
            return {
                "context": mx.concatenate([mx.zeros_like(prompt), prompt]),
                "pooled": mx.concatenate([mx.zeros_like(pooled), pooled]),
                "time_ids": time_ids,
            }
        context = conditioning
        batch, tokens, dim = context.shape
        uncond = self.uncond_embeddings.reshape(-1, dim)[:tokens].astype(context.dtype)
        count = uncond.shape[0]
        negative = mx.concatenate([uncond, mx.zeros((tokens - count, dim), context.dtype)])
        negative_mask = mx.arange(tokens) < count
        return {
            "context": mx.concatenate([mx.broadcast_to(negative, (batch, tokens, dim)), context]),
            "mask": mx.concatenate([mx.broadcast_to(negative_mask, (batch, tokens)),
                                    mx.ones((batch, tokens), mx.bool_)]),
        }

    def denoise(
        self,
        conditioning,
        height: int,
        width: int,
        steps: Optional[int] = None,
        guidance: Optional[float] = None,
        scheduler: str = "ddim",
        seed: Optional[int] = None,
        latents: Optional[mx.array] = None,
    ) -> Iterator[Tuple[int, int, mx.array]]:
        """Classifier-free guided denoising; yields (step, total, latents) after each step.

        Args:
            conditioning: from `LaVIT.decode_codes` (B images).
            height, width: output size in pixels (multiples of the VAE scale factor).
            steps, guidance: default to the release's (25 / 7.0 high-res, 50 / 5.0 low-res).
            scheduler: 'ddim' (the release), 'euler' or 'dpm++2m'.
            seed: for the initial noise; None draws one.
            latents: start from these (B, C, h, w) instead of noise (tests).
        """
        self.check_size(height, width)
        steps = steps or self.defaults.steps
        guidance = self.defaults.guidance if guidance is None else guidance
        sampler = self.scheduler(scheduler)
        sampler.set_timesteps(steps)
        inputs = self.guidance_batch(conditioning, height, width)
        batch = inputs["context"].shape[0] // 2
        # The context's cross-attention keys and values are the same at every step.
        context = self.unet.prepare_context(inputs["context"], inputs.get("mask"))
        h, w = height // self.vae_scale_factor, width // self.vae_scale_factor
        spatial = spatial_map(inputs["context"], h, w) if self.spatial_context else None
        if latents is None:
            key = mx.random.key(seed if seed is not None else int.from_bytes(np.random.bytes(4), "little"))
            shape = (batch, self.latent_channels, h, w)
            latents = mx.random.normal(shape, key=key) * sampler.init_noise_sigma
        total = len(sampler.timesteps)
        for i, t in enumerate(sampler.timesteps):
            model_input = sampler.scale_model_input(mx.concatenate([latents, latents]), t)
            noise = self.unet_forward(model_input, t, context, pooled=inputs.get("pooled"),
                                      time_ids=inputs.get("time_ids"), spatial=spatial)
            uncond, cond = noise[:batch], noise[batch:]
            latents = sampler.step(uncond + guidance * (cond - uncond), t, latents)
            mx.eval(latents)
            yield i + 1, total, latents

    def to_images(self, latents: mx.array) -> np.ndarray:
        """Latents -> uint8 images (B, H, W, 3), decoded in float32 as the release does.

        One image at a time: the VAE's full-size activations dominate its memory, and
        each image decodes independently.
        """
        images = []
        for i in range(latents.shape[0]):
            decoded = self.vae_decode_raw(latents[i:i + 1].astype(mx.float32) / self.scaling_factor)
            decoded = mx.clip(decoded / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)
            images.append(np.round(np.array(decoded) * 255).astype(np.uint8))
        return np.concatenate(images)
