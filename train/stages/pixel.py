"""Stage 3 in PyTorch: the pixel decoder (reference section 5 item 3), on diffusers.

A latent-diffusion UNet (diffusers `UNet2DConditionModel`) learns to denoise the frozen
VAE's latents of an image conditioned on the VQ decoder's output for the same image's
discrete tokens (the frozen EVA + tokenizer with inference's deterministic selection, the
codebook rows of the kept codes, `VQDecoder.decode_features` + its UNet heads), the usual
noise-prediction loss:

    loss = mean_b w_b * mean(|unet(x_t, t, c_b) - target_b|^2)
    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,   target = eps (or v, by the scheduler's prediction_type)
    w_b = 1, or min-SNR-gamma: min(snr_t, gamma) / snr_t (eps) resp. / (snr_t + 1) (v)

with the conditioning of a `condition_dropout` share of the images replaced by zeros (the
release's negative conditioning for guidance: zero prompt and pooled embeddings). The
high-res (SDXL-shaped) UNet also reads `time_ids` (res, res, 0, 0, res, res) for the
center-cropped squares it trains on. What trains: the UNet, and the VQ decoder's UNet heads
(`unet_proj*`, the attention pool; frozen in stage 1), its whole trunk too with
`train_decoder: all`. `model.ema` keeps an EMA of the UNet with diffusers' `EMAModel`
decay rule (exported instead of the raw UNet). Noise, timesteps, dropout and the VAE's
posterior samples are drawn for the global batch and sliced per rank.

The MLX pixel stage was not written when this was; its sections are defined here first
(`sections.PixelModel`, `sections.PixelLoss`).
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
from lavit_mlx.layout import RELEASE_FILES, RELEASE_FOLDERS

from .. import checkpoint as release
from ..data import StreamLoader, eval_loader, even_batches
from ..distributed import World, unsharded
from ..loop import Launch, Stage
from ..sections import PixelLoss, PixelModel
from . import save_release, stage_builder
from .tokenizer import kept_positions

PIXEL_COMPONENTS = {"highres": "highres_pixel", "lowres": "lowres_pixel"}
DECODER_COMPONENTS = {"highres": "highres_decoder", "lowres": "lowres_decoder"}
HEADS = ("unet_proj", "unet_proj_1", "unet_proj_2", "unet_attnpool")


def square_image(image: Image.Image, size: int) -> np.ndarray:
    """The VAE's input: shorter side resized to `size` (bicubic), center-cropped, in [-1, 1], CHW."""
    width, height = image.size
    scale = size / min(width, height)
    resized = image.resize((max(size, round(width * scale)), max(size, round(height * scale))), Image.BICUBIC)
    left, top = (resized.width - size) // 2, (resized.height - size) // 2
    pixels = np.asarray(resized.crop((left, top, left + size, top + size)), dtype=np.float32) / 127.5 - 1.0
    return pixels.transpose(2, 0, 1)


def snr_weights(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float, prediction: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights per sample (Hang et al. 2023)."""
    abar = alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = abar / (1.0 - abar)
    clipped = snr.clamp(max=gamma)
    return clipped / (snr + 1.0) if prediction == "v_prediction" else clipped / snr


class PixelTraining(nn.Module):
    """Frozen EVA, tokenizer and VAE; the VQ decoder and the UNet; forward = the loss."""

    def __init__(self, eva, tokenizer, decoder, vae, unet, scheduler, model: PixelModel, loss: PixelLoss,
                 world: World):
        super().__init__()
        self.eva, self.tokenizer, self.decoder, self.vae, self.unet = eva, tokenizer, decoder, vae, unet
        self.ema_unet = copy.deepcopy(unet).requires_grad_(False) if model.ema else None
        self.scheduler, self.model_config, self.loss_config, self.world = scheduler, model, loss, world
        self.prediction = loss.prediction or scheduler.config.prediction_type
        self.highres = decoder.config.highres

    @torch.no_grad()
    def train(self, mode: bool = True):
        """Training mode for what trains; the frozen encoders stay in inference mode."""
        super().train(mode)
        for frozen in (self.eva, self.tokenizer, self.vae,):
            frozen.eval()
        return self

    def latents_and_tokens(self, batch):
        """VAE latents of the images (posterior sample, scaled) and the kept codebook rows."""
        world = self.world
        dtype = self.eva.patch_embed.proj.weight.dtype
        patches = self.eva(batch["pixels"].to(dtype))[:, 1:]
        out = self.tokenizer(patches.to(self.tokenizer.encode_task_layer[0].weight.dtype))  # eval: inference's rule
        vae_dtype = self.vae.dtype
        posterior = self.vae.encode(batch["image"].to(vae_dtype)).latent_dist
        B = posterior.mean.shape[0]
        eps = torch.randn((world.size * B, *posterior.mean.shape[1:]), device=posterior.mean.device)
        latents = posterior.mean.float() + posterior.std.float() * eps[world.rank_slice(B)]
        scaling = self.vae.config.scaling_factor
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * scaling, out.quantized.float(), out.keep.float()

    def condition(self, rows, keep):
        """The UNet's conditioning from the kept codebook rows: context (B, 256, C), pooled or None."""
        trunk = self.model_config.train_decoder == "all"
        with torch.set_grad_enabled(trunk and torch.is_grad_enabled()):
            features = self.decoder.decode_features(rows, keep, kept_positions(keep))
        with torch.set_grad_enabled(self.model_config.train_decoder != "none" and torch.is_grad_enabled()):
            condition = self.decoder.unet_condition(features)
        return condition if self.highres else (condition, None)

    def forward(self, batch: Dict[str, torch.Tensor]):
        world, cfg = self.world, self.loss_config
        latents, rows, keep = self.latents_and_tokens(batch)
        B = latents.shape[0]
        device = latents.device
        context, pooled = self.condition(rows, keep)
        # draws for the global batch, this rank's rows (any world size draws the same per sample)
        total = world.size * B
        mine = world.rank_slice(B)
        noise = torch.randn((total, *latents.shape[1:]), device=device)[mine]
        if cfg.noise_offset:
            noise = noise + cfg.noise_offset * torch.randn((total, latents.shape[1], 1, 1), device=device)[mine]
        steps = self.scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (total,), device=device)[mine]
        dropped = (torch.rand(total, device=device) < cfg.condition_dropout)[mine]
        keep_condition = (~dropped).to(context.dtype)
        context = context * keep_condition[:, None, None]
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        if self.prediction == "v_prediction":
            target = self.scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        unet_dtype = self.unet.dtype
        extra = {}
        if self.highres:
            size = float(batch["image"].shape[-1])
            time_ids = torch.tensor([size, size, 0.0, 0.0, size, size], device=device).expand(B, 6)
            extra["added_cond_kwargs"] = {"text_embeds": (pooled * keep_condition[:, None]).to(unet_dtype),
                                          "time_ids": time_ids.to(unet_dtype)}
        prediction = self.unet(noisy.to(unet_dtype), timesteps, encoder_hidden_states=context.to(unet_dtype),
                               **extra).sample
        per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if cfg.min_snr_gamma > 0:
            weights = snr_weights(self.scheduler.alphas_cumprod, timesteps, cfg.min_snr_gamma, self.prediction)
        else:
            weights = torch.ones_like(per_sample)
        loss = (weights * per_sample).mean()
        return loss, {"mse": per_sample.mean(), "condition_dropped": dropped.float().mean(),
                      "tokens_per_image": world.global_sum(keep.sum()) / total}

    @torch.no_grad()
    def update_ema(self, step: int, decay_rule) -> None:
        """diffusers `EMAModel.step` on the UNet's parameters (sharded or not, shard by shard)."""
        decay = decay_rule.get_decay(step)
        for ema, param in zip(self.ema_unet.parameters(), self.unet.parameters()):
            ema.sub_((1.0 - decay) * (ema - param.detach()))


def unet_units(unet) -> List[nn.Module]:
    """FSDP2's units of a UNet: every ResNet block and every transformer block (SDXL's deepest
    attention holds 10 of them: a whole up block would be a 1.2 B-parameter unit)."""
    units = []
    for block in [*unet.down_blocks, unet.mid_block, *unet.up_blocks]:
        units += list(getattr(block, "resnets", []))
        for attention in getattr(block, "attentions", []):
            units += list(attention.transformer_blocks)
    return units


def load_pixel_folder(folder: Path):
    """(vae, scheduler config, unet or None) of a diffusers pixel-decoding folder."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    if not (folder / "vae" / "config.json").is_file():
        raise LaVITError(f"model.pixel: {folder} has no vae/ (a diffusers folder: unet/, vae/, scheduler/)")
    if (folder / "vae" / "diffusion_mlx_model.safetensors").is_file():
        raise LaVITError(f"{folder} is in MLX layout: `lavit convert --to torch` it first")
    scheduler = folder / "scheduler" / "scheduler_config.json"
    if not scheduler.is_file():
        raise LaVITError(f"{folder} has no scheduler/scheduler_config.json")
    vae = AutoencoderKL.from_pretrained(folder / "vae")
    unet = UNet2DConditionModel.from_pretrained(folder / "unet") if (folder / "unet" / "config.json").is_file() \
        else None
    return vae, json.loads(scheduler.read_text()), unet


def new_unet(sizes: dict, decoder_config):
    """A UNet from config keys, with the context widths of the VQ decoder that conditions it."""
    from diffusers import UNet2DConditionModel

    context = sum(decoder_config.context_dims)
    config = {"cross_attention_dim": context, **sizes}
    if decoder_config.highres:
        config.setdefault("addition_embed_type", "text_time")
        config.setdefault("addition_time_embed_dim", 32)
        config.setdefault("projection_class_embeddings_input_dim",
                          decoder_config.pooled_dim + 6 * config["addition_time_embed_dim"])
    if config["cross_attention_dim"] != context:
        raise LaVITError(f"model.unet.cross_attention_dim {config['cross_attention_dim']}: the VQ decoder gives "
                         f"{context}-wide context")
    return UNet2DConditionModel(**config)


@stage_builder("pixel")
class PixelStage(Stage):
    """`python -m lavit_train pixel`: stage 3, the pixel decoder (see the module docstring)."""

    name = "pixel"

    def __init__(self, config, world: World, launch: Launch):
        super().__init__(config, world, launch)
        from diffusers import DDPMScheduler
        from diffusers.training_utils import EMAModel

        section: PixelModel = config.model
        self.section, self.loss_config = section, config.loss
        self.init = Path(section.init).expanduser()
        heads = section.vision_heads or launch.vision_heads
        decoder_name = DECODER_COMPONENTS[section.decoder]
        for needed in ("eva", "tokenizer", decoder_name):
            if not release.has_component(self.init, needed):
                raise LaVITError(f"model.init: {self.init} has no {needed} (train stage 1 first)")
        eva = release.load_eva(self.init, heads).requires_grad_(False)
        tokenizer = release.load_tokenizer(self.init, heads).requires_grad_(False)
        decoder = release.load_decoder(self.init, section.decoder == "highres", heads).train()
        self.pixel_folder = Path(section.pixel).expanduser() if section.pixel \
            else self.init / RELEASE_FOLDERS[PIXEL_COMPONENTS[section.decoder]]
        vae, self.scheduler_config, unet = load_pixel_folder(self.pixel_folder)
        if section.unet or unet is None:
            if not section.unet:
                raise LaVITError(f"{self.pixel_folder} has no unet/: give model.unet (sizes of a new UNet)")
            unet = new_unet(section.unet, decoder.config)
        decoder.requires_grad_(section.train_decoder == "all")
        if section.train_decoder == "heads":
            for name in HEADS:
                if hasattr(decoder, name):
                    getattr(decoder, name).requires_grad_(True)
        vae.requires_grad_(False)
        if world.cuda:
            eva, tokenizer, vae = eva.to(torch.bfloat16), tokenizer.to(torch.bfloat16), vae.to(torch.bfloat16)
        scheduler = DDPMScheduler.from_config(self.scheduler_config)
        self.module = PixelTraining(eva.eval(), tokenizer.eval(), decoder, vae.eval(), unet.train(), scheduler,
                                    section, self.loss_config, world).to(world.device)
        self.ema_rule = EMAModel([], decay=section.ema_decay, use_ema_warmup=section.ema_warmup)
        self.data = self._loader(config.data.train, shuffle=True)

    # ----- data
    def example(self, sample, stream) -> dict:
        from lavit_mlx.image_processing import preprocess

        return {"pixels": preprocess([sample.image], self.config.data.image_size)[0],
                "image": square_image(sample.image, self.section.resolution)}

    def _loader(self, sources, shuffle: bool):
        from ..data import stack

        data = self.config.data
        return StreamLoader(sources, self.world, self.config.train.batch_size, self.example, stack,
                            workers=self.launch.workers if shuffle else 0, seed=self.config.train.seed,
                            shuffle_buffer=data.shuffle_buffer, lines_per_shard=data.lines_per_shard,
                            epochs=None if shuffle else 1, shuffle=shuffle)

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
        if self.module.ema_unet is not None:
            units.append(self.module.ema_unet)  # sharded, never run
        return units

    def frozen(self) -> List[nn.Module]:
        return [self.module.eva, self.module.tokenizer, self.module.vae]

    def enable_checkpointing(self) -> None:
        self.module.unet.enable_gradient_checkpointing()
        if self.section.train_decoder == "all":
            from ..loop import checkpoint_blocks

            checkpoint_blocks(self.module.decoder.blocks)

    def saved_keys(self, key: str) -> bool:
        return super().saved_keys(key) or key.startswith("ema_unet.")

    @torch.no_grad()
    def after_step(self, model, metrics, step: int) -> None:
        if self.module.ema_unet is not None:
            self.module.update_ema(step + 1, self.ema_rule)

    # ----- evaluation and export
    @torch.no_grad()
    def evaluate(self, model) -> Dict[str, float]:
        """The loss (mse) on the first `train.eval_batches` batches of `data.eval` (per rank)."""
        if not self.config.data.eval:
            return {}
        from ..data import stack

        loader = eval_loader(self.config.data.eval, self.world, self.config.train.batch_size, self.example, stack,
                             self.config.data.lines_per_shard)
        total, count = 0.0, 0
        with unsharded(model):
            for index, (batch, counted) in enumerate(even_batches(loader, self.world, self.config.train.eval_batches)):
                torch.manual_seed(index)  # the same noise on every evaluation
                batch = {k: v.to(self.world.device) for k, v in batch.items()}
                _, metrics = self.module(batch)
                if counted:
                    total += float(metrics["mse"])
                    count += 1
        parts = self.world.gather_objects((total, count))
        done = sum(n for _, n in parts)
        return {"mse": sum(t for t, _ in parts) / done} if done else {}

    def export(self, folder: Path, state: Dict[str, torch.Tensor]) -> None:
        """`out/model` in the released layout: the pixel-decoding folder (UNet, EMA weights if kept;
        the VAE and scheduler as they came; low-res: `uncond_embeddings.bin`), the VQ decoder with
        its trained heads, and the init's encoder and tokenizer."""
        folder = Path(folder)
        if folder.exists():
            shutil.rmtree(folder)
        target = folder / RELEASE_FOLDERS[PIXEL_COMPONENTS[self.section.decoder]]
        prefix = "ema_unet." if self.module.ema_unet is not None else "unet."
        unet_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        self.module.unet.save_pretrained(target / "unet", state_dict=unet_state, safe_serialization=False)
        vae_state = {k[len("vae."):]: v.float() for k, v in state.items() if k.startswith("vae.")}
        self.module.vae.save_pretrained(target / "vae", state_dict=vae_state, safe_serialization=True)
        (target / "scheduler").mkdir(parents=True, exist_ok=True)
        (target / "scheduler" / "scheduler_config.json").write_text(json.dumps(self.scheduler_config, indent=2))
        if self.section.decoder == "lowres":
            uncond = self.pixel_folder / "uncond_embeddings.bin"
            if uncond.is_file():
                shutil.copyfile(uncond, target / "uncond_embeddings.bin")
            else:
                width = self.module.decoder.config.context_dims[0]
                torch.save(torch.zeros(1, 77, width), target / "uncond_embeddings.bin")
        for component, prefix in (("eva", "eva."), ("tokenizer", "tokenizer."),
                                  (DECODER_COMPONENTS[self.section.decoder], "decoder.")):
            save_release(folder / RELEASE_FILES[component],
                         {k[len(prefix):]: v.float() for k, v in state.items() if k.startswith(prefix)})

    def close(self) -> Optional[str]:
        return f"pixel data: {self.data.summary()}"
