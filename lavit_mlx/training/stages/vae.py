"""`lavit train vae`: the image autoencoder of a pixel decoder, trained on a world's pictures.

LaVIT's pixel decoders use Stable Diffusion's VAEs, trained elsewhere (LAVIT_REFERENCE.md
section 3, "Pixel decoders"); a new world needs its own before the UNet can be trained
(stage 3, `stages/pixel.py`). An `AutoencoderKL` (diffusers semantics, `models/vae.py`)
learns to reconstruct random crops of the pictures (it is fully convolutional, so crops
cost a fraction of whole pictures and teach the same local statistics):

    loss = l1 * |x' - x| + l2 * (x' - x)^2 + edge * |grad x' - grad x| + kl * KL(q(z|x) || N(0, 1))

(means over pixels, resp. latent elements; x' decodes a sample of the posterior; the edge
term compares horizontal and vertical differences, a cheap stand-in for a perceptual loss
that keeps shape outlines sharp). Crops alone are not enough: GroupNorm normalises over the
whole input, and a crop centred on an object is mostly object where a picture is mostly
background, so a VAE trained only on crops shifts colours on whole pictures (measured on the
shapes world after 800 steps of 64 px crops: blue (30, 60, 230) came back as (34, 57, 232)
from a crop, (54, 178, 168) from the whole picture). The last `loss.full_picture_steps` steps
therefore train on whole pictures, `loss.full_batch_size` at a time. Evaluation decodes whole held-out pictures from the
posterior mean: PSNR, and the shapes checker on the reconstructions (every object read
with its colour, shape and cell). A decoder-only run (`model.init` + `model.frozen:
[encoder]`, this project's) starts from a trained VAE and leaves its encoder as it is, so
the latents, and a UNet trained on them, stay valid; the export keeps the init's
`scaling_factor`. (Measured on the shapes VAE: the shapes
checker read every object's colour and cell back from only 30% of its whole-picture
reconstructions, red coming back orange or purple; the UNet cannot do better than that.)
The export is the VAE's diffusers folder in `out/model`
with `scaling_factor` = 1 / std of the latents (as Stable Diffusion set its 0.18215) and
a DDIM scheduler config like the release's, as the `vae` and `scheduler` parts of a
`PixelConfig`; the pixel stage adds the UNet.

On the CPU, convolutions train through `for_training`: each conv is one unfold + matmul,
whose backward is matmuls (2-6x faster than MLX's own conv backward on 2 cores, measured);
values are the inference convs' to float32 rounding.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_map
from PIL import Image

from ...config import PixelConfig
from ...data import DataStream, format_stats, merge_states
from ...errors import LaVITError
from ...export import _atomic_safetensors, _read_config, atomic_text, write_manifest
from ...layout import MLX_FORMAT, RELEASE_FOLDERS
from ...models.diffusion_blocks import Conv2d, Upsample2D, upsample_nearest
from ...models.vae import AutoencoderKL, VAEConfig
from ..config import RunConfig, register_stage
from ..loop import Stage, World
from . import stage_builder

# The release's scheduler config (highres_pixel_decoding/scheduler), the pixel decoders' default.
DDIM_CONFIG = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "thresholding": False,
    "timestep_spacing": "leading",
    "rescale_betas_zero_snr": False,
}
PIXEL_COMPONENTS = {"highres": "highres_pixel", "lowres": "lowres_pixel"}
VAE_FROZEN_PARTS = ("encoder",)


@dataclass
class VAEModel:
    """The autoencoder's sizes (diffusers `AutoencoderKL` keys) and where its export goes."""

    channels: List[int] = field(default_factory=lambda: [16, 32, 64, 64])  # block_out_channels
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 8
    mid_block_attention: bool = False
    decoder: str = "highres"  # the pixel decoder it belongs to: highres or lowres
    scheduler: dict = field(default_factory=dict)  # overrides of DDIM_CONFIG
    init: str = ""  # a folder holding a trained VAE of this pixel decoder to start from (its sizes win)
    frozen: list = ()  # encoder: the encoder and quant_conv stay as model.init has them (see the docstring)

    def check(self) -> None:
        if self.decoder not in PIXEL_COMPONENTS:
            raise LaVITError(f"model.decoder {self.decoder!r}: expected highres or lowres")
        unknown = [part for part in self.frozen if part not in VAE_FROZEN_PARTS]
        if unknown:
            raise LaVITError(f"model.frozen: choose among {', '.join(VAE_FROZEN_PARTS)}, not {unknown}")
        if self.frozen and not self.init:
            raise LaVITError("model.frozen: parts can only be frozen when model.init gives them trained")
        if not self.channels or any(c % self.norm_num_groups for c in self.channels):
            raise LaVITError(f"model.channels {self.channels}: each must be a multiple of model.norm_num_groups "
                             f"{self.norm_num_groups}")

    def vae_config(self) -> dict:
        """The diffusers config dict (scaling_factor is set at export)."""
        levels = len(self.channels)
        return {
            "_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3,
            "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
            "block_out_channels": list(self.channels), "layers_per_block": self.layers_per_block,
            "act_fn": "silu", "latent_channels": self.latent_channels, "norm_num_groups": self.norm_num_groups,
            "scaling_factor": 1.0, "shift_factor": None, "use_quant_conv": True, "use_post_quant_conv": True,
            "mid_block_add_attention": self.mid_block_attention, "force_upcast": True,
        }


@dataclass
class VAELoss:
    l1_weight: float = 1.0
    l2_weight: float = 1.0
    edge_weight: float = 0.5
    kl_weight: float = 1e-4
    crop_size: int = 64  # training crops (0: whole pictures); a multiple of the VAE's scale factor
    crop_on_object: float = 0.8  # the share of crops centred on a non-background pixel (most are white)
    full_picture_steps: int = 0  # the last N steps train on whole pictures (GroupNorm's statistics; see below)
    full_batch_size: int = 4  # pictures per batch in those steps
    eval_images: int = 64  # held-out pictures decoded for PSNR and the checker

    def check(self) -> None:
        if self.crop_size < 0 or self.eval_images < 1 or not 0 <= self.crop_on_object <= 1:
            raise LaVITError("loss.crop_size must be >= 0, loss.eval_images >= 1, loss.crop_on_object in [0, 1]")
        if self.full_picture_steps < 0 or self.full_batch_size < 1:
            raise LaVITError("loss.full_picture_steps must be >= 0 and loss.full_batch_size >= 1")


register_stage("vae", VAEModel, VAELoss,
               {"steps": 600, "batch_size": 16, "learning_rate": 2e-3, "min_learning_rate": 5e-5,
                "warmup_steps": 20, "weight_decay": 0.0, "save_every": 100, "log_every": 10})


# ----------------------------------------------------------------------------- training convolutions
def unfold_conv2d(x: mx.array, weight: mx.array, bias: Optional[mx.array], stride: int = 1,
                  padding: int = 0) -> mx.array:
    """torch-style conv2d of NHWC `x` with an (out, kh, kw, in) weight as one unfold + matmul."""
    out_channels, kh, kw, in_channels = weight.shape
    B, H, W, _ = x.shape
    if kh == kw == 1 and stride == 1 and padding == 0:
        columns = x.reshape(-1, in_channels)
    else:
        out_h, out_w = (H + 2 * padding - kh) // stride + 1, (W + 2 * padding - kw) // stride + 1
        padded = mx.pad(x, [(0, 0), (padding, padding), (padding, padding), (0, 0)]) if padding else x
        taps = [padded[:, i:i + stride * (out_h - 1) + 1:stride, j:j + stride * (out_w - 1) + 1:stride, :]
                for i in range(kh) for j in range(kw)]
        columns = mx.concatenate(taps, axis=-1).reshape(-1, kh * kw * in_channels)  # (pixels, taps x in)
        H, W = out_h, out_w
    w = weight.reshape(out_channels, -1).T
    y = mx.addmm(bias, columns, w) if bias is not None else columns @ w
    return y.reshape(B, H, W, out_channels)


def unfold_upsample2x_conv3x3(x: mx.array, weight: mx.array, bias: Optional[mx.array]) -> mx.array:
    """conv3x3(nearest_upsample_2x(x)) as four 2x2 convs on x (one per output parity, the kernels
    folded by `folded_kernels`), unfolded and run as one batched matmul."""
    B, H, W, C = x.shape
    out_channels = weight.shape[0]
    padded = mx.pad(x, [(0, 0), (1, 1), (1, 1), (0, 0)])
    shifted = [[padded[:, s:s + H, t:t + W, :] for t in range(3)] for s in range(3)]
    columns = mx.stack([
        mx.concatenate([shifted[a + i][b + j] for i in range(2) for j in range(2)], axis=-1).reshape(-1, 4 * C)
        for a in range(2) for b in range(2)])  # (parity, pixels, 4 taps x in)
    kernels = mx.stack([k.reshape(out_channels, -1).T for k in folded_kernels(weight)])  # (parity, 4 in, out)
    out = (columns @ kernels).reshape(2, 2, B, H, W, out_channels)
    out = out.transpose(2, 3, 0, 4, 1, 5).reshape(B, 2 * H, 2 * W, out_channels)  # pixel (2i + a, 2j + b)
    return out + bias if bias is not None else out


def folded_kernels(weight: mx.array) -> List[mx.array]:
    """`cpu.conv.subpixel_kernels` with slices (their gradient is cheaper than a gather's): the
    3x3 kernel's rows, then columns, summed into 2 for each output parity, (out, 2, 2, in) each."""

    def fold(w: mx.array, axis: int, parity: int) -> mx.array:
        def tap(i: int) -> mx.array:
            return w[:, i:i + 1] if axis == 1 else w[:, :, i:i + 1]

        first, second = (tap(0), tap(1) + tap(2)) if parity == 0 else (tap(0) + tap(1), tap(2))
        return mx.concatenate([first, second], axis=axis)

    return [fold(fold(weight, 1, a), 2, b) for a in range(2) for b in range(2)]


class UnfoldConv2d(Conv2d):
    """`Conv2d` trained as an unfold + matmul (same weights, same values)."""

    def __call__(self, x: mx.array) -> mx.array:
        return unfold_conv2d(x, self.weight, self.get("bias"), self.stride, self.padding)


class UnfoldUpsample2D(Upsample2D):
    """`Upsample2D` trained as four unfolded sub-pixel convs (same weights, same values)."""

    def __call__(self, x: mx.array, size: Optional[tuple] = None) -> mx.array:
        B, H, W, _ = x.shape
        if size is not None and tuple(size) != (2 * H, 2 * W):
            return unfold_conv2d(upsample_nearest(x, size), self.conv.weight, self.conv.get("bias"), padding=1)
        return unfold_upsample2x_conv3x3(x, self.conv.weight, self.conv.get("bias"))


def for_training(module: nn.Module) -> nn.Module:
    """Switch a UNet's or VAE's convolutions to their unfold + matmul form, in place, on the CPU
    (their backward is matmuls; MLX's CPU conv backward is several times slower)."""
    if mx.default_device() != mx.cpu:
        return module
    for _, child in module.named_modules():
        if type(child) is Conv2d:
            child.__class__ = UnfoldConv2d
        elif type(child) is Upsample2D:
            child.__class__ = UnfoldUpsample2D
    return module


# ----------------------------------------------------------------------------- data
def picture_array(image: Image.Image, size: int) -> np.ndarray:
    """An RGB picture as (size, size, 3) uint8 (bicubic resize when needed)."""
    if image.size != (size, size):
        image = image.resize((size, size), Image.BICUBIC)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def to_signed(pixels: np.ndarray) -> np.ndarray:
    """uint8 (B, H, W, 3) -> float32 (B, 3, H, W) in [-1, 1], the VAE's input."""
    return (pixels.astype(np.float32) / 127.5 - 1.0).transpose(0, 3, 1, 2)


def to_uint8(images: mx.array) -> np.ndarray:
    """VAE output (B, 3, H, W) in about [-1, 1] -> uint8 (B, H, W, 3), as `PixelDecoder.to_images`."""
    images = mx.clip(images / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)
    return np.round(np.array(images) * 255).astype(np.uint8)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 99.0 if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def checker_keeps(original: np.ndarray, reconstruction: np.ndarray, text: Optional[str]) -> dict:
    """The shapes checker on a reconstruction: `score_image` against the caption's scene when
    the sample has a world caption, else the same reading (colour, shape, cell) as the original."""
    from ...shapes.checker import read_scene, score_image
    from ...shapes.world import scene_from_prompt

    scene = None
    if text:
        try:
            scene = scene_from_prompt(text)
        except LaVITError:
            scene = None
    if scene is not None:
        score = score_image(reconstruction, scene)
        return {"correct": score.correct, "colour_and_cell": score.found == score.objects}
    read = lambda picture: sorted((d.colour, d.shape, d.row, d.col) for d in read_scene(picture))  # noqa: E731
    want, got = read(original), read(reconstruction)
    cells = lambda objects: sorted((o[0], o[2], o[3]) for o in objects)  # noqa: E731
    return {"correct": want == got, "colour_and_cell": cells(want) == cells(got)}


def crop_corner(picture: np.ndarray, crop: int, rng: np.random.Generator, on_object: float) -> tuple:
    """(top, left) of a crop: with probability `on_object` centred on a random pixel that differs
    from the picture's corner colour (the background), else anywhere."""
    size_y, size_x = picture.shape[:2]
    if rng.random() < on_object:
        ys, xs = np.nonzero(np.abs(picture.astype(np.int16) - picture[0, 0].astype(np.int16)).sum(-1) > 30)
        if len(ys):
            pick = int(rng.integers(len(ys)))
            return (int(np.clip(ys[pick] - crop // 2, 0, size_y - crop)),
                    int(np.clip(xs[pick] - crop // 2, 0, size_x - crop)))
    return int(rng.integers(0, size_y - crop + 1)), int(rng.integers(0, size_x - crop + 1))


class PictureData:
    """Batches of random crops from one `DataStream`; the crops of batch i are drawn from
    (seed, i), and i is part of the cursor, so a resumed run sees the same crops."""

    def __init__(self, config: RunConfig, world: World, crop: int, on_object: float, full_from: Optional[int] = None,
                 full_batch_size: int = 4):
        data = config.data
        self.size, self.crop, self.on_object = data.image_size, crop or data.image_size, on_object
        self.batch_size, self.seed = config.train.batch_size, config.train.seed
        self.full_from, self.full_batch_size = full_from, full_batch_size  # micro-batch index of the first whole-picture batch
        self.batch_index = 0
        self.stream = DataStream(data.train, rank=world.rank, world_size=world.size, seed=config.train.seed,
                                 shuffle_buffer=data.shuffle_buffer, lines_per_shard=data.lines_per_shard,
                                 transform=lambda sample: picture_array(sample.image, self.size))

    def whole(self) -> bool:
        """Whether the next batch is of whole pictures."""
        return self.full_from is not None and self.batch_index >= self.full_from

    def __iter__(self) -> Iterator[Dict[str, mx.array]]:
        group = []
        for picture in self.stream:  # grouped here: the batch size changes for the whole-picture steps
            group.append(picture)
            whole = self.whole()
            if len(group) < (self.full_batch_size if whole else self.batch_size):
                continue
            rng = np.random.default_rng([self.seed, self.batch_index])
            self.batch_index += 1
            if whole:
                crops = np.stack(group)
            else:
                corners = [crop_corner(p, self.crop, rng, self.on_object) for p in group]
                crops = np.stack([p[y:y + self.crop, x:x + self.crop] for p, (y, x) in zip(group, corners)])
            group = []
            yield {"images": mx.array(to_signed(crops))}

    def state(self) -> dict:
        return {"stream": self.stream.state_dict(), "batches": self.batch_index}

    def load(self, state: dict) -> None:
        if state:
            self.stream.load_state_dict(state["stream"])
            self.batch_index = state["batches"]


def distinct_pictures(sources, config: RunConfig, limit: int = 0) -> Iterator[tuple]:
    """(picture uint8 (S, S, 3), original (height, width), caption or None) of each distinct
    picture, in manifest order (a VQA manifest names a picture once per question); at most
    `limit` (0: all)."""
    import hashlib

    data = config.data
    stream = DataStream(sources, seed=0, shuffle_buffer=1, shuffle_shards=False, lines_per_shard=data.lines_per_shard,
                        epochs=1, transform=lambda s: (picture_array(s.image, data.image_size),
                                                       (s.image.height, s.image.width), s.text))
    seen = set()
    for pixels, original, text in stream:
        digest = hashlib.sha1(pixels.tobytes()).digest()
        if digest in seen:
            continue
        seen.add(digest)
        yield pixels, original, text
        if limit and len(seen) >= limit:
            return


def held_out(config: RunConfig, count: int) -> List[tuple]:
    """The first `count` held-out pictures (eval manifest, else the training one):
    [(uint8 (H, W, 3), caption or None)]."""
    sources = config.data.eval if config.data.eval is not None else config.data.train
    out = [(pixels, text) for pixels, _, text in distinct_pictures(sources, config, count)]
    if not out:
        raise LaVITError("no held-out pictures to evaluate on (data.eval or data.train)")
    return out


# ----------------------------------------------------------------------------- export
def write_pixel_part(folder: Path, component: str, vae: AutoencoderKL, vae_config: dict,
                     scheduler_config: dict) -> Path:
    """Write a VAE and a scheduler config into the MLX folder `folder` as the `vae` and
    `scheduler` parts of `component`'s `PixelConfig` (the UNet part stays empty until the
    pixel stage writes the whole decoder with `export.save_components`)."""
    from mlx.utils import tree_flatten

    folder = Path(folder)
    pixel = folder / RELEASE_FOLDERS[component]
    _atomic_safetensors(pixel / "vae" / f"{MLX_FORMAT['pixel_weights']}.safetensors",
                        dict(tree_flatten(vae.parameters())))
    atomic_text(pixel / "vae" / "config.json", json.dumps(vae_config, indent=2))
    atomic_text(pixel / "scheduler" / "scheduler_config.json", json.dumps(scheduler_config, indent=2))
    stored = _read_config(folder)
    previous = stored.get(component) or {}
    stored[component] = PixelConfig(unet=previous.get("unet") or {}, vae=vae_config, scheduler=scheduler_config,
                                    defaults=previous.get("defaults") or {}).to_dict()
    stored["format_version"] = MLX_FORMAT["version"]
    atomic_text(folder / "config.json", json.dumps(stored, indent=2))
    write_manifest(folder)
    return folder


def load_trained_vae(folder, component: str = "highres_pixel") -> tuple:
    """The VAE of `folder` and its config dict: an MLX folder (this stage's export, or any model
    folder holding `component`) or a diffusers `vae/` folder."""
    from ...checkpoint import Checkpoint
    from ...models.diffusion_blocks import load_diffusers_model
    from ...weights import read_json

    folder = Path(folder).expanduser()
    if (folder / "config.json").is_file() and read_json(folder / "config.json").get("format") == MLX_FORMAT["name"]:
        sub, layout = folder / RELEASE_FOLDERS[component] / "vae", "mlx"
    elif (folder / "config.json").is_file():
        sub = folder
        layout = "mlx" if (folder / f"{MLX_FORMAT['pixel_weights']}.safetensors").is_file() else "torch"
    else:
        Checkpoint.open(folder)  # the one-line error for a missing or foreign folder
        sub, layout = folder / RELEASE_FOLDERS[component] / "vae", "torch"
    if not (sub / "config.json").is_file():
        raise LaVITError(f"{folder}: no VAE for {component} (train one with `lavit train vae`)")
    vae = load_diffusers_model(sub, AutoencoderKL, VAEConfig, "VAE", source_layout=layout)  # the stem follows the layout
    return vae, read_json(sub / "config.json")


# ----------------------------------------------------------------------------- the stage
@stage_builder("vae")
class VAEStage(Stage):
    """`lavit train vae` (see the module docstring)."""

    name = "vae"

    def __init__(self, config: RunConfig, world: World):
        super().__init__(config, world)
        m, loss = config.model, config.loss
        self.vae_config = m.vae_config()
        self.kept_scaling = None  # the init's scaling_factor, kept when its encoder is frozen
        if m.init:
            vae, self.vae_config = load_trained_vae(m.init, PIXEL_COMPONENTS[m.decoder])
            vae.update(tree_map(lambda a: a.astype(mx.float32), vae.parameters()))
            self.model = for_training(vae)
            if "encoder" in m.frozen:
                self.kept_scaling = float(self.vae_config["scaling_factor"])
                self.model.encoder.freeze()
                if "quant_conv" in self.model:
                    self.model.quant_conv.freeze()
        else:
            self.model = for_training(AutoencoderKL(VAEConfig.from_dict(self.vae_config)))
            initialise(self.model)
        factor = self.model.scale_factor
        for name, value in (("data.image_size", config.data.image_size), ("loss.crop_size", loss.crop_size)):
            if value % factor or value > config.data.image_size:
                raise LaVITError(f"{name} {value}: expected a multiple of the VAE's scale factor {factor}, "
                                 f"at most data.image_size")
        if config.data.train is None:
            raise LaVITError("data.train: give the pictures' manifest (lavit_mlx.shapes.write_manifest writes one)")
        if loss.full_picture_steps > config.train.steps:
            raise LaVITError(f"loss.full_picture_steps {loss.full_picture_steps}: at most train.steps "
                             f"{config.train.steps}")
        full_from = ((config.train.steps - loss.full_picture_steps) * config.train.grad_accumulation
                     if loss.full_picture_steps else None)
        self.data = PictureData(config, world, loss.crop_size, loss.crop_on_object, full_from, loss.full_batch_size)
        self._held_out = None
        self._latent_std = None

    def loss(self, model: AutoencoderKL, batch: dict):
        w = self.config.loss
        images = batch["images"]
        posterior = model.encode(images)
        reconstruction = model.decode(posterior.sample())
        error = reconstruction - images
        l1, l2 = mx.mean(mx.abs(error)), mx.mean(error * error)
        edge = (mx.mean(mx.abs(error[..., 1:, :] - error[..., :-1, :]))
                + mx.mean(mx.abs(error[..., :, 1:] - error[..., :, :-1])))
        variance = mx.exp(posterior.logvar)
        kl = 0.5 * mx.mean(posterior.mean ** 2 + variance - 1.0 - posterior.logvar)
        total = w.l1_weight * l1 + w.l2_weight * l2 + w.edge_weight * edge + w.kl_weight * kl
        return total, {"l1": l1, "l2": l2, "edge": edge, "kl": kl}

    def batches(self):
        return iter(self.data)

    def data_state(self) -> dict:
        return self.data.state()

    def load_data_state(self, state: dict) -> None:
        self.data.load(state)

    def merge_data_states(self, states):
        return {"stream": merge_states([s["stream"] for s in states]), "batches": states[0]["batches"]}

    def held_out(self) -> List[tuple]:
        if self._held_out is None:
            self._held_out = held_out(self.config, self.config.loss.eval_images)
        return self._held_out

    def evaluate(self) -> Dict[str, float]:
        """PSNR and the checker on reconstructions (from the posterior mean) of whole held-out
        pictures; the latents' mean and std."""
        self.model.eval()
        pictures = self.held_out()
        psnrs, correct, kept, latents = [], [], [], []
        for start in range(0, len(pictures), self.config.train.batch_size):
            chunk = pictures[start:start + self.config.train.batch_size]
            originals = np.stack([p for p, _ in chunk])
            mean = self.model.encode(mx.array(to_signed(originals))).mean
            rebuilt = to_uint8(self.model.decode(mean))
            latents.append(np.array(mean))
            for (original, text), image in zip(chunk, rebuilt):
                psnrs.append(psnr(original, image))
                score = checker_keeps(original, image, text)
                correct.append(score["correct"])
                kept.append(score["colour_and_cell"])
        self.model.train()
        values = np.concatenate(latents)
        self._latent_std = float(values.std())
        return {"psnr": float(np.mean(psnrs)), "checker_correct": float(np.mean(correct)),
                "checker_colour_and_cell": float(np.mean(kept)), "latent_mean": float(values.mean()),
                "latent_std": self._latent_std, "images": float(len(pictures))}

    def export(self, folder: Path) -> None:
        """The VAE (with scaling_factor = 1 / latent std) and the scheduler config into `folder`."""
        if self._latent_std is None:
            self.evaluate()
        # a frozen encoder keeps the init's scaling: the latents a UNet was trained on
        scaling = self.kept_scaling or round(1.0 / max(self._latent_std, 1e-6), 5)
        vae_config = {**self.vae_config, "scaling_factor": scaling}
        scheduler = {**DDIM_CONFIG, **self.config.model.scheduler}
        self.model.eval()
        write_pixel_part(folder, PIXEL_COMPONENTS[self.config.model.decoder], self.model, vae_config, scheduler)

    def close(self) -> None:
        import sys

        if self.world.main:
            print(f"vae data: {format_stats(self.data.stream.stats)}", file=sys.stderr)


def initialise(module: nn.Module) -> None:
    """Conv weights ~ kaiming-uniform over fan-in (torch's default, as diffusers models start);
    the module's placeholders are zeros."""
    for _, child in module.named_modules():
        if isinstance(child, Conv2d):
            out_channels, kh, kw, in_channels = child.weight.shape
            bound = 1.0 / math.sqrt(kh * kw * in_channels)
            child.weight = mx.random.uniform(-bound, bound, child.weight.shape)
            if "bias" in child:
                child.bias = mx.random.uniform(-bound, bound, child.bias.shape)
