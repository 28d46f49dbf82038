"""Stage 3 in PyTorch: the pixel decoder (reference section 5 item 3), on diffusers.

The loss is the MLX pixel stage's (`lavit_mlx/training/stages/pixel.py`): a latent-diffusion
UNet (diffusers `UNet2DConditionModel`) learns to denoise the frozen VAE's latents of each
picture (resized to `data.image_size`), conditioned on the VQ decoder's output for the
picture's own discrete tokens (frozen EVA + tokenizer, inference's deterministic selection):

    x0 = (posterior mean + std * n) * scaling_factor,  t ~ U{0..T-1},  eps ~ N(0, I)
    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
    target = eps (epsilon) or sqrt(abar_t) eps - sqrt(1 - abar_t) x0 (v_prediction)
    loss = mean_b w(t_b) * mean((unet(x_t, t, cond_b) - target)^2)
    w = min(SNR, gamma) / SNR (epsilon) or / (SNR + 1) (v); 1 with `snr_gamma: 0`

A `cond_dropout` share of the samples gets zero conditioning (the release's negative, so
classifier-free guidance works). High-res (SDXL-shaped): prompt embeddings as
`encoder_hidden_states`, the pooled embedding as `text_embeds`, `time_ids` = (original
height, width, 0, 0, image_size, image_size). What trains: the UNet and the VQ decoder's
UNet heads (`train_decoder`: heads | all | none). An EMA of every trained weight (diffusers
`EMAModel`'s decay rule, `model.ema`) is kept and exported. Noise, timesteps, dropout and
posterior samples are drawn for the global batch and sliced per rank.

Where the MLX stage caches each picture's codes and posterior once, this one encodes the
batch every step (LAION-scale data is not cached). The UNet starts from `unet/` beside the
VAE folder (`model.vae` naming a diffusers pipeline folder such as SDXL's, or a pixel
decoding folder), else from the init folder's pixel decoder, else new from
`UNET_DEFAULTS < model.unet < what the VAE and decoder fix`; `model.unet` given always
builds a new one. The development tokenizer (`model.init: ""`) is MLX's only.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from lavit_mlx.errors import LaVITError
from lavit_mlx.layout import MLX_FORMAT, RELEASE_FILES, RELEASE_FOLDERS

from .. import checkpoint as release
from ..data import StreamLoader, eval_loader, even_batches, stack
from ..distributed import World, unsharded
from ..loop import Launch, Stage
from ..models.vq_decoder import AttentionPool
from ..sections import PIXEL_DECODERS, PixelLoss, PixelModel
from . import save_release, stage_builder
from .tokenizer import kept_positions

PIXEL_COMPONENTS = {"highres": "highres_pixel", "lowres": "lowres_pixel"}
HEADS = ("unet_proj", "unet_proj_1", "unet_proj_2", "unet_attnpool")
# The release's scheduler config (highres_pixel_decoding/scheduler), as the MLX stage's.
DDIM_CONFIG = {
    "_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "trained_betas": None, "clip_sample": False, "set_alpha_to_one": False,
    "steps_offset": 1, "prediction_type": "epsilon", "thresholding": False, "timestep_spacing": "leading",
    "rescale_betas_zero_snr": False,
}
# The MLX stage's small SDXL-shaped UNet (diffusers keys); the keys the VAE and decoder fix are set after.
UNET_DEFAULTS = {
    "_class_name": "UNet2DConditionModel", "block_out_channels": [32, 64, 128],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn", "layers_per_block": 1, "attention_head_dim": [1, 2, 4],
    "transformer_layers_per_block": 1, "use_linear_projection": True, "norm_num_groups": 16,
    "addition_time_embed_dim": 16, "act_fn": "silu", "flip_sin_to_cos": True, "freq_shift": 0,
}


def picture(image: Image.Image, size: int) -> np.ndarray:
    """An RGB picture as (size, size, 3) uint8, bicubic (the MLX stages' `picture_array`)."""
    if image.size != (size, size):
        image = image.resize((size, size), Image.BICUBIC)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def min_snr_weights(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Per-sample loss weights of min-SNR-gamma (1 everywhere when gamma is 0)."""
    if gamma <= 0:
        return torch.ones_like(snr)
    clipped = snr.clamp(max=gamma)
    return clipped / snr if prediction_type == "epsilon" else clipped / (snr + 1.0)


def unet_config(section: PixelModel, vae_config: dict, decoder_config, latent_size: int) -> dict:
    """The UNet's diffusers config: UNET_DEFAULTS < model.unet < what the VAE and decoder fix."""
    config = {**UNET_DEFAULTS, **section.unet}
    latent = vae_config["latent_channels"]
    config.update(in_channels=latent, out_channels=latent, sample_size=latent_size,
                  cross_attention_dim=int(sum(decoder_config.context_dims)))
    if decoder_config.highres:
        config.update(addition_embed_type="text_time",
                      projection_class_embeddings_input_dim=decoder_config.pooled_dim
                      + 6 * config["addition_time_embed_dim"])
    else:
        config.update(addition_embed_type=None, addition_time_embed_dim=None, projection_class_embeddings_input_dim=None)
    return {k: v for k, v in config.items() if not k.startswith("_")}


def load_diffusers(folder: Path, cls):
    """A diffusers model from its folder, in the torch layout or the MLX one (convs OHWI)."""
    mlx_weights = folder / f"{MLX_FORMAT['pixel_weights']}.safetensors"
    if not mlx_weights.is_file():
        return cls.from_pretrained(folder)
    from safetensors.torch import load_file

    model = cls.from_config(json.loads((folder / "config.json").read_text()))
    state = {k: v.permute(0, 3, 1, 2).contiguous() if v.ndim == 4 else v for k, v in load_file(mlx_weights).items()}
    if any(k.endswith(".scales") for k in state):
        raise LaVITError(f"{folder}: stored quantized; convert it back with `lavit convert --to torch` first")
    model.load_state_dict(state, strict=True)
    return model


def vae_folder(folder: Path, component: str) -> Path:
    """The `vae/` of `model.vae`: an MLX or released-layout model folder holding `component`, a
    pixel-decoding or diffusers pipeline folder, or the VAE folder itself."""
    for candidate in (folder / RELEASE_FOLDERS[component] / "vae", folder / "vae", folder):
        if (candidate / "config.json").is_file() and json.loads((candidate / "config.json").read_text()).get(
                "latent_channels") is not None:
            return candidate
    raise LaVITError(f"model.vae: {folder} holds no VAE for {component} (train one with `lavit train vae`)")


def new_heads(decoder, context_dims: List[int], pooled_dim: int):
    """The same trunk with fresh UNet heads of other widths (the MLX stage's `new_heads`)."""
    config = decoder.config
    dims = tuple(context_dims)
    if len(dims) != (2 if config.highres else 1) or (config.highres and pooled_dim <= 0):
        raise LaVITError(f"model.context_dims {list(dims)}: the {'high' if config.highres else 'low'}-res decoder "
                         f"needs {'two widths and model.pooled_dim' if config.highres else 'one width'}")
    decoder.config = config.replace(context_dims=dims, pooled_dim=pooled_dim if config.highres else 0)
    if config.highres:
        decoder.unet_proj_1 = nn.Linear(config.feature_dim, dims[0])
        decoder.unet_proj_2 = nn.Linear(config.feature_dim, dims[1])
        decoder.unet_attnpool = AttentionPool(config.num_patches, config.feature_dim, config.num_heads, pooled_dim)
        with torch.no_grad():
            decoder.unet_attnpool.positional_embedding.normal_(0.0, config.width ** -0.5)
    else:
        decoder.unet_proj = nn.Linear(config.feature_dim, dims[0])
    return decoder


class PixelTraining(nn.Module):
    """Frozen EVA, tokenizer and VAE; the VQ decoder and the UNet (and their EMA); forward = the loss."""

    def __init__(self, eva, tokenizer, decoder, vae, unet, scheduler, section: PixelModel, loss: PixelLoss,
                 world: World):
        super().__init__()
        self.eva, self.tokenizer, self.decoder, self.vae, self.unet = eva, tokenizer, decoder, vae, unet
        self.section, self.loss_config, self.world, self.scheduler = section, loss, world, scheduler
        self.highres = decoder.config.highres
        self.register_buffer("alphas_cumprod", scheduler.alphas_cumprod.clone().float(), persistent=False)
        # EMA copies of what trains (filled in `start_ema`, once requires_grad is settled)
        self.ema_unet: Optional[nn.Module] = None
        self.ema_decoder: Optional[nn.Module] = None

    def start_ema(self) -> None:
        self.ema_unet = copy.deepcopy(self.unet).requires_grad_(False)
        if self.section.train_decoder != "none":
            self.ema_decoder = copy.deepcopy(self.decoder).requires_grad_(False)

    def train(self, mode: bool = True):
        """Training mode for what trains; the frozen encoders stay in inference mode."""
        super().train(mode)
        for frozen in (self.eva, self.tokenizer, self.vae):
            frozen.eval()
        return self

    @torch.no_grad()
    def encode(self, batch):
        """Posterior (mean, std) of the pictures and the kept codebook rows of their tokens."""
        dtype = self.eva.patch_embed.proj.weight.dtype
        patches = self.eva(batch["pixels"].to(dtype))[:, 1:]
        out = self.tokenizer(patches.to(self.tokenizer.encode_task_layer[0].weight.dtype))  # eval: inference's rule
        posterior = self.vae.encode(batch["image"].to(self.vae.dtype)).latent_dist
        return posterior.mean.float(), posterior.std.float(), out.quantized.float(), out.keep.float()

    def condition(self, rows, keep):
        """(context, pooled or None) from the kept codebook rows."""
        trunk = self.section.train_decoder == "all"
        with torch.set_grad_enabled(trunk and torch.is_grad_enabled()):
            features = self.decoder.decode_features(rows, keep, kept_positions(keep))
        with torch.set_grad_enabled(self.section.train_decoder != "none" and torch.is_grad_enabled()):
            condition = self.decoder.unet_condition(features)
        return condition if self.highres else (condition, None)

    def forward(self, batch: Dict[str, torch.Tensor]):
        world, cfg = self.world, self.loss_config
        mean, std, rows, keep = self.encode(batch)
        B = mean.shape[0]
        device = mean.device
        total, mine = world.size * B, world.rank_slice(B)
        # draws for the global batch, this rank's rows (any world size draws the same per sample)
        latents = (mean + std * torch.randn((total, *mean.shape[1:]), device=device)[mine]) \
            * self.vae.config.scaling_factor
        timesteps = torch.randint(0, len(self.alphas_cumprod), (total,), device=device)[mine]
        noise = torch.randn((total, *latents.shape[1:]), device=device)[mine]
        keep_condition = (torch.rand(total, device=device) >= cfg.cond_dropout)[mine]
        abar = self.alphas_cumprod[timesteps].reshape(-1, 1, 1, 1)
        signal, sigma = abar.sqrt(), (1.0 - abar).sqrt()
        noisy = signal * latents + sigma * noise
        target = noise if cfg.prediction_type == "epsilon" else signal * noise - sigma * latents
        context, pooled = self.condition(rows, keep)
        weight = keep_condition.to(context.dtype)
        context = context * weight[:, None, None]
        dtype = self.unet.dtype
        extra = {}
        if self.highres:
            size = float(batch["image"].shape[-1])
            ids = torch.cat([batch["original"].float(), torch.zeros(B, 2, device=device),
                             torch.full((B, 2), size, device=device)], dim=1)
            extra["added_cond_kwargs"] = {"text_embeds": (pooled * weight[:, None]).to(dtype), "time_ids": ids.to(dtype)}
        prediction = self.unet(noisy.to(dtype), timesteps, encoder_hidden_states=context.to(dtype), **extra).sample
        per_sample = F.mse_loss(prediction.float(), target, reduction="none").mean(dim=(1, 2, 3))
        snr = abar.flatten() / (1.0 - abar.flatten())
        weights = min_snr_weights(snr, cfg.snr_gamma, cfg.prediction_type)
        return (per_sample * weights).mean(), {"mse": per_sample.mean(),
                                               "tokens_per_image": world.global_sum(keep.sum()) / total}

    def ema_pairs(self):
        pairs = list(zip(self.ema_unet.parameters(), self.unet.parameters()))
        if self.ema_decoder is not None:
            pairs += [(e, p) for e, p in zip(self.ema_decoder.parameters(), self.decoder.parameters()) if p.requires_grad]
        return pairs

    @torch.no_grad()
    def update_ema(self, decay: float) -> None:
        """diffusers `EMAModel.step`: shadow -= (1 - decay) * (shadow - weight), shard by shard."""
        for shadow, param in self.ema_pairs():
            shadow.sub_((1.0 - decay) * (shadow - param.detach()))


@stage_builder("pixel")
class PixelStage(Stage):
    """`python -m lavit_train pixel`: stage 3, the pixel decoder (see the module docstring)."""

    name = "pixel"

    def __init__(self, config, world: World, launch: Launch):
        super().__init__(config, world, launch)
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from diffusers.training_utils import EMAModel

        section: PixelModel = config.model
        self.section, self.loss_config = section, config.loss
        if not section.init:
            raise LaVITError("model.init: give stage 1's export (eva, tokenizer, VQ decoder); the development "
                             "tokenizer is the MLX trainer's only")
        self.init = Path(section.init).expanduser()
        heads = launch.vision_heads
        decoder_name = PIXEL_DECODERS[section.decoder]
        for needed in ("eva", "tokenizer", decoder_name):
            if not release.has_component(self.init, needed):
                raise LaVITError(f"model.init: {self.init} has no {needed} (train stage 1 first)")
        eva = release.load_eva(self.init, heads).requires_grad_(False)
        tokenizer = release.load_tokenizer(self.init, heads).requires_grad_(False)
        decoder = release.load_decoder(self.init, section.decoder == "highres", heads)
        if section.context_dims:
            decoder = new_heads(decoder, section.context_dims, section.pooled_dim)
        if not section.vae:
            raise LaVITError("model.vae: give the VAE stage's exported folder (lavit train vae writes it)")
        component = PIXEL_COMPONENTS[section.decoder]
        self.vae_folder = vae_folder(Path(section.vae).expanduser(), component)
        vae = load_diffusers(self.vae_folder, AutoencoderKL)
        self.vae_config = json.loads((self.vae_folder / "config.json").read_text())
        scale = 2 ** (len(self.vae_config["block_out_channels"]) - 1)
        if config.data.image_size % scale:
            raise LaVITError(f"data.image_size {config.data.image_size}: not a multiple of the VAE's scale factor "
                             f"{scale}")
        self.unet_config = unet_config(section, self.vae_config, decoder.config, config.data.image_size // scale)
        unet = None if section.unet else self._pretrained_unet(UNet2DConditionModel, component)
        if unet is None:
            unet = UNet2DConditionModel(**self.unet_config)
        else:
            self.unet_config = {k: v for k, v in unet.config.items() if not k.startswith("_")}
        decoder.requires_grad_(section.train_decoder == "all")
        if section.train_decoder == "heads":
            for name in HEADS:
                if hasattr(decoder, name):
                    getattr(decoder, name).requires_grad_(True)
        vae.requires_grad_(False)
        if world.cuda:
            eva, tokenizer, vae = eva.to(torch.bfloat16), tokenizer.to(torch.bfloat16), vae.to(torch.bfloat16)
        self.scheduler_config = {**DDIM_CONFIG, **section.scheduler, "prediction_type": self.loss_config.prediction_type}
        scheduler = DDPMScheduler.from_config(self.scheduler_config)
        self.module = PixelTraining(eva.eval(), tokenizer.eval(), decoder.train(), vae.eval(), unet.train(), scheduler,
                                    section, self.loss_config, world)
        self.module.start_ema()
        self.module.to(world.device)
        ema = section.ema
        self.ema_rule = EMAModel([], decay=ema.decay, min_decay=ema.min_decay, update_after_step=ema.update_after_step,
                                 use_ema_warmup=ema.use_warmup, inv_gamma=ema.inv_gamma, power=ema.power)
        self.data = self._loader(config.data.train)

    def _pretrained_unet(self, cls, component: str):
        """`unet/` beside the VAE, else the init folder's pixel decoder's, else None."""
        for candidate in (self.vae_folder.parent / "unet", self.init / RELEASE_FOLDERS[component] / "unet"):
            if (candidate / "config.json").is_file():
                return load_diffusers(candidate, cls)
        return None

    # ----- data
    def example(self, sample, stream) -> dict:
        from lavit_mlx.image_processing import preprocess

        pixels = picture(sample.image, self.config.data.image_size)
        signed = (pixels.astype(np.float32) / 127.5 - 1.0).transpose(2, 0, 1)
        return {"pixels": preprocess([Image.fromarray(pixels)], self.module.eva.config.image_size)[0],
                "image": signed, "original": np.float32([sample.image.height, sample.image.width])}

    def _loader(self, sources):
        data = self.config.data
        return StreamLoader(sources, self.world, self.config.train.batch_size, self.example, stack,
                            workers=self.launch.workers, seed=self.config.train.seed,
                            shuffle_buffer=data.shuffle_buffer, lines_per_shard=data.lines_per_shard)

    def batches(self):
        return iter(self.data)

    def data_state(self) -> dict:
        return self.data.state_dict()

    def load_data_state(self, state: dict) -> None:
        if state:
            self.data.load_state_dict(state)

    # ----- the model
    def blocks(self) -> List[nn.Module]:
        units = unet_units(self.module.unet)
        units += [m for m in (self.module.ema_unet, self.module.ema_decoder) if m is not None]  # sharded, never run
        return units

    def frozen(self) -> List[nn.Module]:
        return [self.module.eva, self.module.tokenizer, self.module.vae]

    def enable_checkpointing(self) -> None:
        self.module.unet.enable_gradient_checkpointing()
        if self.section.train_decoder == "all":
            from ..loop import checkpoint_blocks

            checkpoint_blocks(self.module.decoder.blocks)

    def saved_keys(self, key: str) -> bool:
        return super().saved_keys(key) or key.startswith(("ema_unet.", "ema_decoder."))

    @torch.no_grad()
    def after_step(self, model, metrics, step: int) -> None:
        self.module.update_ema(self.ema_rule.get_decay(step + 1))

    # ----- evaluation and export
    @torch.no_grad()
    def evaluate(self, model) -> Dict[str, float]:
        """The loss terms on the first `train.eval_batches` batches of `data.eval` (per rank)."""
        if not self.config.data.eval:
            return {}
        loader = eval_loader(self.config.data.eval, self.world, self.config.train.batch_size, self.example, stack,
                             self.config.data.lines_per_shard)
        total, count = 0.0, 0
        with unsharded(model):
            for index, (batch, counted) in enumerate(even_batches(loader, self.world, self.config.train.eval_batches)):
                torch.manual_seed(index)  # the same noise on every evaluation
                _, metrics = self.module({k: v.to(self.world.device) for k, v in batch.items()})
                if counted:
                    total += float(metrics["mse"])
                    count += 1
        parts = self.world.gather_objects((total, count))
        done = sum(n for _, n in parts)
        return {"mse": sum(t for t, _ in parts) / done} if done else {}

    def export(self, folder: Path, state: Dict[str, torch.Tensor]) -> None:
        """`out/model` in the released layout: the pixel-decoding folder (the UNet's EMA weights, the
        VAE, the scheduler config; low-res: zero `uncond_embeddings.bin`), the VQ decoder (EMA of its
        trained heads) and the init's encoder and tokenizer."""
        from diffusers import AutoencoderKL, UNet2DConditionModel

        folder = Path(folder)
        if folder.exists():
            shutil.rmtree(folder)
        dtype = torch.float16 if self.section.export_dtype == "float16" else torch.float32

        def part(prefix: str, cast=dtype) -> Dict[str, torch.Tensor]:
            return {k[len(prefix):]: v.to(cast) for k, v in state.items() if k.startswith(prefix)}

        target = folder / RELEASE_FOLDERS[PIXEL_COMPONENTS[self.section.decoder]]
        unet = UNet2DConditionModel.from_config(self.unet_config)
        unet.save_pretrained(target / "unet", state_dict=part("ema_unet."), safe_serialization=False)
        AutoencoderKL.from_config(self.vae_config).save_pretrained(target / "vae", state_dict=part("vae.", torch.float32),
                                                                   safe_serialization=True)
        (target / "scheduler").mkdir(parents=True, exist_ok=True)
        (target / "scheduler" / "scheduler_config.json").write_text(json.dumps(self.scheduler_config, indent=2))
        decoder = part("decoder.")
        if self.module.ema_decoder is not None:
            decoder.update({k: v for k, v in part("ema_decoder.").items()
                            if k.startswith(HEADS) or self.section.train_decoder == "all"})
        if self.section.decoder == "lowres":
            width = self.module.decoder.config.context_dims[0]
            torch.save(torch.zeros(1, 77, width), target / "uncond_embeddings.bin")
        save_release(folder / RELEASE_FILES[PIXEL_DECODERS[self.section.decoder]], decoder)
        for component in ("eva", "tokenizer"):
            save_release(folder / RELEASE_FILES[component], part(f"{component}.", torch.float32))

    def close(self) -> Optional[str]:
        return f"pixel data: {self.data.summary()}"


def unet_units(unet) -> List[nn.Module]:
    """FSDP2's units of a UNet: every ResNet block and every transformer block (SDXL's deepest
    attention holds 10 of them: a whole up block would be a 1.2 B-parameter unit)."""
    units = []
    for block in [*unet.down_blocks, unet.mid_block, *unet.up_blocks]:
        units += list(getattr(block, "resnets", []))
        for attention in getattr(block, "attentions", []):
            units += list(attention.transformer_blocks)
    return units
