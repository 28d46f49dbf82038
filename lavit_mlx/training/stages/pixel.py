"""`lavit train pixel`: LaVIT stage 3, the pixel decoder (LAVIT_REFERENCE.md section 5 item 3).

A latent-diffusion UNet (diffusers `UNet2DConditionModel` semantics, `models/unet.py`)
learns to denoise the frozen VAE's latents of each picture, conditioned on the VQ
decoder's output for that picture's own discrete tokens (tokenizer frozen; the decoder's
UNet heads `unet_proj*` / `unet_attnpool` train with the UNet, or the whole decoder with
`model.train_decoder: all`). The high-res decoder is SDXL-shaped: prompt embeddings
(B, N, sum(context_dims)) as `encoder_hidden_states`, the pooled embedding as
`text_embeds`, `time_ids` = (original height, width, crop top, left, target height,
width); the low-res one SD-1.5-shaped (context only). Per step, for latents x0 =
(posterior mean + std * n) * scaling_factor:

    t ~ U{0..T-1}, eps ~ N(0, I), x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
    target = eps (epsilon) or sqrt(abar_t) eps - sqrt(1 - abar_t) x0 (v_prediction)
    loss = mean_b  w(t_b) * mean((unet(x_t, t, cond_b) - target)^2)
    w = min(SNR, gamma) / SNR (epsilon) or min(SNR, gamma) / (SNR + 1) (v), SNR = abar / (1 - abar)

(min-SNR weighting, Hang et al. 2023; off with `loss.snr_gamma: 0`). Conditioning
dropout replaces a sample's prompt embeddings and pooled embedding by zeros with
probability `loss.cond_dropout`: the release's negative conditioning is zeros, so
classifier-free guidance works at inference. An EMA of the trained weights (diffusers
`EMAModel` semantics, decay warmup) is updated inside the compiled step, kept in the
stage state (checkpointed) and exported.

The tokenizer's codes and the VAE posterior of every training picture are computed once
and cached in `out/cache/` (the frozen parts never run again, and a resumed run reads the
same bytes). Before stage 1's tokenizer exists (`model.init` empty) a random development
tokenizer that keeps every patch (`model.dev_tokenizer`) stands in.

The export in `out/model` is loadable with `lavit_mlx.load`: the init folder's
components, the VQ decoder with its trained heads, and the pixel decoder (UNet with the
EMA weights, VAE, scheduler config, and the model's own inference defaults in
`PixelConfig.defaults`, which `generation.py` reads), so `lavit reconstruct` and
`lavit generate` work at the world's size.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from ...config import (EVAConfig, LaVITConfig, PixelConfig, TokenIds, TokenizerConfig, VQDecoderConfig,
                       mlp_width)
from ...errors import LaVITError
from ...image_processing import preprocess
from ...models.unet import UNet2DConditionModel, UNetConfig
from ...models.vq_decoder import VQDecoder
from ...pixel_decoder import SPATIAL_CONTEXT, spatial_map
from ...schedulers import NoiseScheduleConfig, alphas_cumprod
from ..config import RunConfig, register_stage
from ..loop import Stage, World
from . import stage_builder
from .vae import (DDIM_CONFIG, PIXEL_COMPONENTS, checker_keeps, distinct_pictures, for_training, initialise,
                  load_trained_vae, to_signed)

DECODERS = {"highres": "highres_decoder", "lowres": "lowres_decoder"}
TRAIN_DECODER = ("heads", "all", "none")
PREDICTION_TYPES = ("epsilon", "v_prediction")
# A small SDXL-shaped UNet (diffusers keys); the stage sets the keys that follow from the
# VAE and the VQ decoder (channels, cross_attention_dim, the text_time embedding sizes).
UNET_DEFAULTS = {
    "_class_name": "UNet2DConditionModel",
    "block_out_channels": [32, 64, 128],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "layers_per_block": 1,
    "attention_head_dim": [1, 2, 4],  # heads (diffusers' naming quirk)
    "transformer_layers_per_block": 1,
    "use_linear_projection": True,
    "norm_num_groups": 16,
    "addition_time_embed_dim": 16,
    "act_fn": "silu",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}
EVAL_TIMESTEPS = (50, 250, 500, 750, 950)


@dataclass
class EMASection:
    """diffusers `EMAModel` settings (the defaults of its warmup form, capped at `decay`)."""

    decay: float = 0.999
    min_decay: float = 0.0
    update_after_step: int = 0
    use_warmup: bool = True
    inv_gamma: float = 1.0
    power: float = 2 / 3


@dataclass
class DevTokenizer:
    """A random tokenizer that keeps every patch (codes = a random hash of each patch's pixels)
    and a VQ decoder, standing in for stage 1's until `model.init` names its export."""

    patch_size: int = 28
    width: int = 128  # EVA and tokenizer width; the decoder's feature_dim
    codebook_size: int = 1024
    code_dim: int = 32
    decoder_width: int = 128
    decoder_depth: int = 2
    num_heads: int = 4
    context_dims: List[int] = field(default_factory=lambda: [128, 128])
    pooled_dim: int = 128


@dataclass
class PixelModel:
    init: str = ""  # MLX folder with eva, tokenizer and the VQ decoder (stage 1's export); "": dev tokenizer
    vae: str = ""  # the VAE stage's export (or any folder holding this pixel decoder's VAE)
    decoder: str = "highres"  # highres (SDXL-shaped) or lowres (SD-1.5-shaped)
    unet: dict = field(default_factory=dict)  # diffusers UNet config keys over UNET_DEFAULTS
    context_dims: List[int] = field(default_factory=list)  # new decoder heads of these widths ([]: keep init's)
    pooled_dim: int = 0  # with context_dims: the new attention pool's width (high-res)
    train_decoder: str = "heads"  # heads (unet_proj*, unet_attnpool), all, or none
    # also the context as a map concatenated to the UNet's input (not the release's; pixel_decoder.py)
    spatial_context: bool = False
    max_images: int = 0  # distinct training pictures cached (0: all)
    scheduler: dict = field(default_factory=dict)  # overrides of the release's DDIM config
    defaults: dict = field(default_factory=lambda: {"steps": 20, "guidance": 3.0})  # inference defaults
    export_dtype: str = "float32"  # or float16 (the UNet and decoder weights)
    ema: EMASection = field(default_factory=EMASection)
    dev_tokenizer: DevTokenizer = field(default_factory=DevTokenizer)

    def check(self) -> None:
        if self.decoder not in DECODERS:
            raise LaVITError(f"model.decoder {self.decoder!r}: expected highres or lowres")
        if self.train_decoder not in TRAIN_DECODER:
            raise LaVITError(f"model.train_decoder {self.train_decoder!r}: expected one of {', '.join(TRAIN_DECODER)}")
        if self.export_dtype not in ("float32", "float16"):
            raise LaVITError(f"model.export_dtype {self.export_dtype!r}: expected float32 or float16")
        unknown = set(self.defaults) - {"height", "width", "steps", "guidance"}
        if unknown:
            raise LaVITError(f"model.defaults: unknown key {sorted(unknown)[0]!r} (height, width, steps, guidance)")
        if not 0 <= self.ema.decay < 1:
            raise LaVITError(f"model.ema.decay {self.ema.decay}: expected 0 <= decay < 1")


@dataclass
class PixelLoss:
    prediction_type: str = "epsilon"  # or v_prediction
    snr_gamma: float = 5.0  # min-SNR weighting (0: off)
    cond_dropout: float = 0.1  # probability of zero conditioning (classifier-free guidance)
    eval_images: int = 16  # held-out pictures reconstructed (tokens -> pixels) at evaluation

    def check(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise LaVITError(f"loss.prediction_type {self.prediction_type!r}: expected epsilon or v_prediction")
        if not 0 <= self.cond_dropout < 1:
            raise LaVITError(f"loss.cond_dropout {self.cond_dropout}: expected 0 <= p < 1")
        if self.snr_gamma < 0 or self.eval_images < 1:
            raise LaVITError("loss.snr_gamma must be >= 0 and loss.eval_images >= 1")


register_stage("pixel", PixelModel, PixelLoss,
               {"steps": 1000, "batch_size": 32, "learning_rate": 5e-4, "min_learning_rate": 2e-5,
                "warmup_steps": 50, "weight_decay": 0.01, "save_every": 200, "log_every": 10})


# ----------------------------------------------------------------------------- the maths
def min_snr_weights(snr: mx.array, gamma: float, prediction_type: str) -> mx.array:
    """Per-sample loss weights of min-SNR-gamma (1 everywhere when gamma is 0)."""
    if gamma <= 0:
        return mx.ones_like(snr)
    clipped = mx.minimum(snr, gamma)
    return clipped / snr if prediction_type == "epsilon" else clipped / (snr + 1.0)


def drop_conditioning(keep: mx.array, context: mx.array, pooled: Optional[mx.array] = None):
    """Zero the conditioning of the samples whose `keep` (B,) is False: the negative
    conditioning the pipelines guide against (zeros, as the release's high-res decoder)."""
    context = mx.where(keep[:, None, None], context, mx.zeros_like(context))
    if pooled is not None:
        pooled = mx.where(keep[:, None], pooled, mx.zeros_like(pooled))
    return context, pooled


def ema_decay(step, ema: EMASection) -> mx.array:
    """diffusers `EMAModel.get_decay` for the `step`-th update (1-based): 0 until
    update_after_step has passed, then 1 - (1 + s / inv_gamma)^-power (warmup) or
    (1 + s) / (10 + s), within [min_decay, decay]; s = step - update_after_step - 1."""
    s = mx.maximum(mx.array(step).astype(mx.float32) - (ema.update_after_step + 1), 0.0)
    if ema.use_warmup:
        value = 1.0 - (1.0 + s / ema.inv_gamma) ** -ema.power
    else:
        value = (1.0 + s) / (10.0 + s)
    value = mx.maximum(mx.minimum(value, ema.decay), ema.min_decay)
    return mx.where(s <= 0, mx.zeros_like(value), value)


def time_ids(original: np.ndarray, crop: np.ndarray, target: Tuple[int, int]) -> np.ndarray:
    """SDXL's (B, 6) ids: original (h, w), crop (top, left), target (h, w)."""
    target = np.broadcast_to(np.asarray(target, np.float32), original.shape)
    return np.concatenate([original, crop, target], axis=1).astype(np.float32)


def flat_key(key: str) -> str:
    """A parameter path as one stage-state key (dots would nest it in the checkpoint)."""
    return key.replace(".", "/")


# ----------------------------------------------------------------------------- what is trained
class PixelTrainee(nn.Module):
    """The UNet and the VQ decoder over the frozen codebook; `trainable_parameters` are what
    `model.train_decoder` says."""

    def __init__(self, unet: UNet2DConditionModel, decoder: VQDecoder, codebook: mx.array, train_decoder: str):
        super().__init__()
        self.unet = unet
        self.decoder = decoder
        self.codebook = codebook
        self.freeze(recurse=False, keys=["codebook"])
        self.decoder_trunk_frozen = train_decoder != "all"
        if train_decoder != "all":
            decoder.freeze()
        if train_decoder == "heads":
            heads = ("unet_proj_1", "unet_proj_2", "unet_attnpool") if decoder.config.highres else ("unet_proj",)
            for name in heads:
                decoder[name].unfreeze()

    def features(self, codes: mx.array, valid: mx.array) -> mx.array:
        """The decoder trunk on padded codes (B, N) with `valid` (B, N): (B, num_patches,
        feature_dim), as `VQDecoder.__call__` computes it for the unpadded rows."""
        rows = self.codebook[codes]  # (B, N, code_dim)
        x = self.decoder.decode_features(rows, valid.astype(rows.dtype))
        return mx.stop_gradient(x) if self.decoder_trunk_frozen else x

    def conditioning(self, codes: mx.array, valid: mx.array):
        """(context, pooled) for the UNet; pooled is None for the low-res decoder."""
        d = self.decoder
        x = self.features(codes, valid)
        if not d.config.highres:
            return d.unet_proj(x), None
        return mx.concatenate([d.unet_proj_1(x), d.unet_proj_2(x)], axis=-1), d.unet_attnpool(x)


# ----------------------------------------------------------------------------- frozen parts
@dataclass
class Frozen:
    """The components this stage does not train: tokenizer (and EVA), VQ decoder to start from,
    the VAE, the config they came with."""

    eva: nn.Module
    tokenizer: nn.Module
    decoder: VQDecoder
    vae: nn.Module
    vae_config: dict
    config: LaVITConfig
    init: Optional[Path]


def dev_components(dev: DevTokenizer, highres: bool) -> tuple:
    """A random EVA (patch embedding only) + tokenizer (no merger blocks, keeps every patch) +
    VQ decoder: codes are a random hash of each patch's pixels, in raster order."""
    from ...loading import build_component

    grid = 224 // dev.patch_size
    config = LaVITConfig(
        vision=EVAConfig(width=dev.width, depth=0, num_heads=dev.num_heads, mlp_dim=mlp_width(dev.width),
                         patch_size=dev.patch_size, image_size=224, head_dim_out=dev.width),
        tokenizer=TokenizerConfig(width=dev.width, merger_depth=0, num_heads=dev.num_heads,
                                  mlp_dim=mlp_width(dev.width), codebook_size=dev.codebook_size,
                                  code_dim=dev.code_dim),
        token_ids=TokenIds(codebook_size=dev.codebook_size))
    decoder_config = VQDecoderConfig(
        highres=highres, width=dev.decoder_width, depth=dev.decoder_depth, num_heads=dev.num_heads,
        mlp_dim=mlp_width(dev.decoder_width), code_dim=dev.code_dim, num_patches=grid * grid,
        feature_dim=dev.width, context_dims=tuple(dev.context_dims if highres else dev.context_dims[:1]),
        pooled_dim=dev.pooled_dim if highres else 0)
    setattr(config, DECODERS["highres" if highres else "lowres"], decoder_config)
    eva = build_component("eva", config)
    tokenizer = build_component("tokenizer", config)
    keep_every_patch = mx.zeros_like(tokenizer.token_predictor.out_conv[-1].bias) + mx.array([10.0, -10.0])
    tokenizer.token_predictor.out_conv[-1].bias = keep_every_patch
    decoder = build_component(DECODERS["highres" if highres else "lowres"], config)
    init_decoder_embeddings(decoder)
    return config, eva, tokenizer, decoder


def init_decoder_embeddings(decoder: VQDecoder, heads_only: bool = False) -> None:
    """Random position/query embeddings (the module's zeros would make every query the same)."""
    width = decoder.config.width
    if not heads_only:
        decoder.pos_embed = mx.random.normal(decoder.pos_embed.shape) * 0.02
        decoder.query_embed = mx.random.normal(decoder.query_embed.shape) * 0.02
    if decoder.config.highres:
        pool = decoder.unet_attnpool
        pool.positional_embedding = mx.random.normal(pool.positional_embedding.shape) * width ** -0.5


def load_frozen(m: PixelModel) -> Frozen:
    """The tokenizer and VQ decoder of `model.init` (or the dev tokenizer) and the VAE."""
    import lavit_mlx

    highres = m.decoder == "highres"
    name = DECODERS[m.decoder]
    if not m.vae:
        raise LaVITError("model.vae: give the VAE stage's exported folder (lavit train vae writes it)")
    vae, vae_config = load_trained_vae(m.vae, PIXEL_COMPONENTS[m.decoder])
    if m.init:
        model = lavit_mlx.load(m.init)
        config = model.config
        if config.component(name) is None:
            raise LaVITError(f"model.init {m.init}: holds no {name} (stage 1 exports it)")
        eva, tokenizer, decoder = model.eva, model.tokenizer, model.component(name)
        init = Path(m.init).expanduser()
    else:
        config, eva, tokenizer, decoder = dev_components(m.dev_tokenizer, highres)
        init = None
    if m.context_dims:
        decoder = new_heads(decoder, m.context_dims, m.pooled_dim)
        setattr(config, name, decoder.config)
    for module in (eva, tokenizer, decoder, vae):
        module.eval()
    return Frozen(eva, tokenizer, decoder, vae, vae_config, config, init)


def new_heads(decoder: VQDecoder, context_dims: List[int], pooled_dim: int) -> VQDecoder:
    """The same trunk with fresh UNet heads of other widths."""
    highres = decoder.config.highres
    dims = tuple(context_dims)
    if len(dims) != (2 if highres else 1) or (highres and pooled_dim <= 0):
        raise LaVITError(f"model.context_dims {list(dims)}: the {'high' if highres else 'low'}-res decoder needs "
                         f"{'two widths and model.pooled_dim' if highres else 'one width'}")
    fresh = VQDecoder(decoder.config.replace(context_dims=dims, pooled_dim=pooled_dim if highres else 0))
    heads = ("unet_proj_1", "unet_proj_2", "unet_attnpool", "unet_proj")
    trunk = [(k, v) for k, v in tree_flatten(decoder.parameters()) if not k.startswith(heads)]
    fresh.load_weights(trunk, strict=False)
    init_decoder_embeddings(fresh, heads_only=True)
    return fresh


def unet_config(m: PixelModel, vae_config: dict, decoder: VQDecoder, latent_size: int) -> dict:
    """The UNet's diffusers config: UNET_DEFAULTS < model.unet < what the VAE and decoder fix."""
    config = {**UNET_DEFAULTS, **m.unet}
    latent = vae_config["latent_channels"]
    width = int(sum(decoder.config.context_dims))
    config.update(in_channels=latent + (width if m.spatial_context else 0), out_channels=latent,
                  sample_size=latent_size, cross_attention_dim=width)
    config.pop(SPATIAL_CONTEXT, None)
    if m.spatial_context:
        config[SPATIAL_CONTEXT] = True
    if decoder.config.highres:
        config.update(addition_embed_type="text_time",
                      projection_class_embeddings_input_dim=decoder.config.pooled_dim
                      + 6 * config["addition_time_embed_dim"])
    else:
        config.update(addition_embed_type=None, addition_time_embed_dim=None,
                      projection_class_embeddings_input_dim=None)
    return config


# ----------------------------------------------------------------------------- the cache
CACHE_VERSION = 1


@dataclass
class Cached:
    """Per picture: the VAE posterior (mean, std), the tokenizer's codes padded to num_patches
    with `valid`, the SDXL size ids; for held-out pictures also the pixels and caption."""

    mean: np.ndarray  # (M, C, h, w)
    std: np.ndarray  # (M, C, h, w)
    codes: np.ndarray  # (M, N) int32
    valid: np.ndarray  # (M, N) bool
    time_ids: np.ndarray  # (M, 6)
    pixels: Optional[np.ndarray] = None  # (M, H, W, 3) uint8
    texts: Optional[List[str]] = None

    def __len__(self) -> int:
        return self.mean.shape[0]

    def arrays(self) -> Dict[str, np.ndarray]:
        out = {"mean": self.mean, "std": self.std, "codes": self.codes, "valid": self.valid, "time_ids": self.time_ids}
        if self.pixels is not None:
            out["pixels"] = self.pixels
        return out


def encode_pictures(frozen: Frozen, pictures: List[tuple], image_size: int, chunk: int = 16,
                    keep_pixels: bool = False) -> Cached:
    """Tokenize and VAE-encode pictures in fixed chunks (the same bytes on every run)."""
    num_patches = frozen.decoder.config.num_patches
    vision_size = frozen.config.vision.image_size if frozen.config.vision else 224
    parts: Dict[str, list] = {k: [] for k in ("mean", "std", "codes", "valid")}
    for start in range(0, len(pictures), chunk):
        group = pictures[start:start + chunk]
        pixels = np.stack([p for p, _, _ in group])
        posterior = frozen.vae.encode(mx.array(to_signed(pixels)))
        from PIL import Image

        processed = preprocess([Image.fromarray(p) for p in pixels], vision_size)
        features = frozen.eva(mx.array(processed))[:, 1:]
        tokens = frozen.tokenizer.tokenize(features)
        codes = np.zeros((len(group), num_patches), np.int32)
        valid = np.zeros((len(group), num_patches), bool)
        for row, ids in enumerate(tokens.codes):
            codes[row, :len(ids)] = ids
            valid[row, :len(ids)] = True
        mx.eval(posterior.mean, posterior.std)
        parts["mean"].append(np.array(posterior.mean))
        parts["std"].append(np.array(posterior.std))
        parts["codes"].append(codes)
        parts["valid"].append(valid)
    originals = np.array([o for _, o, _ in pictures], np.float32)
    return Cached(
        mean=np.concatenate(parts["mean"]), std=np.concatenate(parts["std"]), codes=np.concatenate(parts["codes"]),
        valid=np.concatenate(parts["valid"]),
        time_ids=time_ids(originals, np.zeros_like(originals), (image_size, image_size)),
        pixels=np.stack([p for p, _, _ in pictures]) if keep_pixels else None,
        texts=[t or "" for _, _, t in pictures] if keep_pixels else None)


def cached_pictures(folder: Path, split: str, fingerprint: dict, build) -> Cached:
    """The cache file `folder/split.safetensors` when its fingerprint matches, else `build()`
    written there (atomically) first."""
    from ...export import _atomic_safetensors

    path, meta = folder / f"{split}.safetensors", folder / f"{split}.json"
    fingerprint = json.loads(json.dumps(fingerprint))  # as stored (tuples become lists), or it never matches
    if path.is_file() and meta.is_file() and json.loads(meta.read_text()).get("fingerprint") == fingerprint:
        stored = {k: np.array(v) for k, v in mx.load(str(path)).items()}
        texts = json.loads(meta.read_text()).get("texts")
        return Cached(mean=stored["mean"], std=stored["std"], codes=stored["codes"], valid=stored["valid"],
                      time_ids=stored["time_ids"], pixels=stored.get("pixels"), texts=texts)
    cache = build()
    folder.mkdir(parents=True, exist_ok=True)
    _atomic_safetensors(path, {k: mx.array(v) for k, v in cache.arrays().items()})
    from ...export import atomic_text

    atomic_text(meta, json.dumps({"fingerprint": fingerprint, "texts": cache.texts, "images": len(cache)}))
    return cache


def fingerprint(config: RunConfig, sources, limit: int) -> dict:
    """What a cache depends on: the frozen parts' sources and the pictures'."""
    from ...data.shards import find_files

    files = find_files(sources).paths
    stats = [(f, Path(f).stat().st_size, int(Path(f).stat().st_mtime)) for f in files]
    m = config.model
    return {"version": CACHE_VERSION, "init": m.init, "vae": m.vae, "decoder": m.decoder,
            "dev_tokenizer": json.dumps(m.dev_tokenizer.__dict__, sort_keys=True) if not m.init else None,
            "seed": config.train.seed if not m.init else None, "files": stats, "limit": limit,
            "image_size": config.data.image_size}


# ----------------------------------------------------------------------------- the stage
@stage_builder("pixel")
class PixelStage(Stage):
    """`lavit train pixel` (see the module docstring)."""

    name = "pixel"

    def __init__(self, config: RunConfig, world: World):
        super().__init__(config, world)
        m = config.model
        if config.data.train is None:
            raise LaVITError("data.train: give the pictures' manifest (lavit_mlx.shapes.write_manifest writes one)")
        self.frozen = load_frozen(m)
        vae = self.frozen.vae
        if config.data.image_size % vae.scale_factor:
            raise LaVITError(f"data.image_size {config.data.image_size}: not a multiple of the VAE's scale factor "
                             f"{vae.scale_factor}")
        self.scaling_factor = float(self.frozen.vae_config["scaling_factor"])
        self.latent_size = config.data.image_size // vae.scale_factor
        self.unet_config = unet_config(m, self.frozen.vae_config, self.frozen.decoder, self.latent_size)
        unet = UNet2DConditionModel(UNetConfig.from_dict(self.unet_config))
        initialise(unet)
        self.model = PixelTrainee(for_training(unet), self.frozen.decoder, self.codebook(), m.train_decoder)
        self.scheduler_config = {**DDIM_CONFIG, **m.scheduler, "prediction_type": config.loss.prediction_type}
        schedule = alphas_cumprod(NoiseScheduleConfig.from_dict(self.scheduler_config))
        self.num_timesteps = len(schedule)
        self.alphas_cumprod = mx.array(schedule)
        self.state = {"ema": {flat_key(k): mx.array(v) for k, v in tree_flatten(self.model.trainable_parameters())},
                      "ema_step": mx.array(0, mx.int32)}
        self.cache = self.build_cache()
        self.drawn = 0  # samples handed out so far (all ranks), the data cursor
        self._eval = None

    def codebook(self) -> mx.array:
        return self.frozen.tokenizer.quantize.embedding.weight

    # ------------------------------------------------------------------ data
    def build_cache(self) -> Cached:
        config, m = self.config, self.config.model
        folder = Path(config.out) / "cache"

        def build():
            started = time.perf_counter()
            pictures = list(distinct_pictures(config.data.train, config, m.max_images))
            cache = encode_pictures(self.frozen, pictures, config.data.image_size)
            if self.world.main:
                print(f"pixel cache: {len(cache)} pictures tokenized and VAE-encoded in "
                      f"{time.perf_counter() - started:.0f} s", file=sys.stderr)
            return cache

        cache = cached_pictures(folder, "train", fingerprint(config, config.data.train, m.max_images), build)
        if not len(cache):
            raise LaVITError(f"{config.data.train}: no pictures to train on")
        return cache

    def batches(self):
        size, ranks = self.config.train.batch_size, self.world.size
        while True:
            picked = self.indices(self.drawn, size * ranks)[self.world.rank * size:(self.world.rank + 1) * size]
            self.drawn += size * ranks
            c = self.cache
            yield {"mean": mx.array(c.mean[picked]), "std": mx.array(c.std[picked]),
                   "codes": mx.array(c.codes[picked]), "valid": mx.array(c.valid[picked]),
                   "time_ids": mx.array(c.time_ids[picked])}

    def indices(self, start: int, count: int) -> np.ndarray:
        """Positions start..start+count of the endless sequence of epoch permutations of the cache."""
        total = len(self.cache)
        orders: Dict[int, np.ndarray] = {}
        out = []
        for position in range(start, start + count):
            epoch, offset = divmod(position, total)
            if epoch not in orders:
                orders[epoch] = np.random.default_rng([self.config.train.seed, epoch]).permutation(total)
            out.append(orders[epoch][offset])
        return np.array(out)

    def data_state(self) -> dict:
        return {"drawn": self.drawn}

    def load_data_state(self, state: dict) -> None:
        self.drawn = int(state.get("drawn", 0))

    def samples_in(self, batch: dict) -> int:
        return int(batch["mean"].shape[0])

    # ------------------------------------------------------------------ loss and EMA
    def noisy(self, latents: mx.array, timesteps: mx.array, noise: mx.array):
        """(x_t, target) for x0 = latents."""
        abar = self.alphas_cumprod[timesteps].reshape(-1, 1, 1, 1)
        signal, sigma = mx.sqrt(abar), mx.sqrt(1.0 - abar)
        x_t = signal * latents + sigma * noise
        target = noise if self.config.loss.prediction_type == "epsilon" else signal * noise - sigma * latents
        return x_t, target

    def predict(self, model: PixelTrainee, x_t, timesteps, context, pooled, ids) -> mx.array:
        if self.config.model.spatial_context:
            x_t = mx.concatenate([x_t, spatial_map(context, *x_t.shape[2:])], axis=1)
        if pooled is not None:
            return model.unet(x_t, timesteps, context, text_embeds=pooled, time_ids=ids)
        return model.unet(x_t, timesteps, context)

    def loss(self, model: PixelTrainee, batch: dict):
        cfg = self.config.loss
        latents = (batch["mean"] + batch["std"] * mx.random.normal(batch["mean"].shape)) * self.scaling_factor
        B = latents.shape[0]
        timesteps = mx.random.randint(0, self.num_timesteps, (B,))
        noise = mx.random.normal(latents.shape)
        x_t, target = self.noisy(latents, timesteps, noise)
        context, pooled = model.conditioning(batch["codes"], batch["valid"])
        keep = mx.random.uniform(shape=(B,)) >= cfg.cond_dropout
        context, pooled = drop_conditioning(keep, context, pooled)
        prediction = self.predict(model, x_t, timesteps, context, pooled, batch["time_ids"])
        per_sample = mx.mean((prediction - target) ** 2, axis=(1, 2, 3))
        abar = self.alphas_cumprod[timesteps]
        weights = min_snr_weights(abar / (1.0 - abar), cfg.snr_gamma, cfg.prediction_type)
        return mx.mean(per_sample * weights), {"mse": mx.mean(per_sample)}

    def update(self, model: PixelTrainee, metrics: Dict[str, mx.array]) -> None:
        """One EMA step of every trained weight: shadow -= (1 - decay) * (shadow - weight)."""
        step = self.state["ema_step"] + 1
        decay = ema_decay(step, self.config.model.ema)
        weights = dict(tree_flatten(model.trainable_parameters()))
        shadows = self.state["ema"]
        for key, weight in weights.items():
            shadow = shadows[flat_key(key)]
            shadows[flat_key(key)] = shadow - (1.0 - decay) * (shadow - weight)
        self.state["ema_step"] = step

    def ema_weights(self) -> List[tuple]:
        return [(k.replace("/", "."), v) for k, v in self.state["ema"].items()]

    # ------------------------------------------------------------------ evaluation
    def held_out(self) -> Cached:
        if self._eval is None:
            config = self.config
            sources = config.data.eval if config.data.eval is not None else config.data.train
            count = config.loss.eval_images

            def build():
                return encode_pictures(self.frozen, list(distinct_pictures(sources, config, count)),
                                       config.data.image_size, keep_pixels=True)

            self._eval = cached_pictures(Path(config.out) / "cache", "eval", fingerprint(config, sources, count), build)
        return self._eval

    def inference_defaults(self) -> dict:
        size = self.config.data.image_size
        return {"height": size, "width": size, **self.config.model.defaults}

    def pixel_decoder(self):
        from ...pixel_decoder import PixelDecoder

        uncond = None
        if not self.frozen.decoder.config.highres:
            # zeros, as the conditioning dropped in training (one token, padded with zeros at inference)
            uncond = mx.zeros((1, 1, int(sum(self.frozen.decoder.config.context_dims))))
        return PixelDecoder(self.model.unet, self.frozen.vae, self.scheduler_config,
                            highres=self.frozen.decoder.config.highres, uncond_embeddings=uncond,
                            spatial_context=self.config.model.spatial_context)

    def evaluate(self) -> Dict[str, float]:
        """With the EMA weights: the denoising loss of held-out pictures at fixed timesteps and
        noise, and their reconstruction (own tokens -> denoising with the inference defaults ->
        VAE -> pixels) judged by the shapes checker."""
        current = list(tree_flatten(self.model.trainable_parameters()))
        self.model.update(tree_unflatten(self.ema_weights()))
        self.model.eval()
        try:
            return self._evaluate()
        finally:
            self.model.update(tree_unflatten(current))
            self.model.train()

    def _evaluate(self) -> Dict[str, float]:
        held = self.held_out()
        defaults = self.inference_defaults()
        decoder = self.pixel_decoder()
        losses, kept, shapes, correct, seconds = [], [], [], [], 0.0
        chunk = min(8, len(held))
        for start in range(0, len(held), chunk):
            part = slice(start, start + chunk)
            codes, valid = mx.array(held.codes[part]), mx.array(held.valid[part])
            context, pooled = self.model.conditioning(codes, valid)
            latents = mx.array(held.mean[part]) * self.scaling_factor
            for i, t in enumerate(EVAL_TIMESTEPS):
                noise = mx.random.normal(latents.shape, key=mx.random.key(1000 + i))
                timesteps = mx.full((latents.shape[0],), t, mx.int32)
                x_t, target = self.noisy(latents, timesteps, noise)
                prediction = self.predict(self.model, x_t, timesteps, context, pooled,
                                          mx.array(held.time_ids[part]))
                losses.append(float(mx.mean((prediction - target) ** 2)))
            started = time.perf_counter()
            conditioning = (context, pooled) if pooled is not None else context
            height, width = defaults["height"], defaults["width"]
            noise = mx.random.normal((latents.shape[0], *latents.shape[1:]), key=mx.random.key(7))
            result = None
            for _, _, result in decoder.denoise(conditioning, height, width, defaults["steps"], defaults["guidance"],
                                                latents=noise * decoder.scheduler().init_noise_sigma):
                pass
            images = decoder.to_images(result)
            seconds += time.perf_counter() - started
            for original, image, text in zip(held.pixels[part], images, held.texts[part]):
                score = checker_keeps(original, image, text)
                kept.append(score["colour_and_cell"])
                correct.append(score["correct"])
        return {"loss": float(np.mean(losses)), "reconstruction_colour_and_cell": float(np.mean(kept)),
                "reconstruction_correct": float(np.mean(correct)), "images": float(len(held)),
                "seconds_per_image": seconds / len(held)}

    # ------------------------------------------------------------------ export
    def export(self, folder: Path) -> None:
        """The init folder's components, the VQ decoder (trained heads) and the pixel decoder
        (EMA weights) with the inference defaults, into the MLX folder `folder`."""
        from ...export import save_components

        m = self.config.model
        folder = Path(folder)
        self.model.update(tree_unflatten(self.ema_weights()))
        self.model.eval()
        if self.frozen.init is not None and self.frozen.init.resolve() != folder.resolve():
            shutil.copytree(self.frozen.init, folder, dirs_exist_ok=True)
        config = self.frozen.config
        name, pixel_name = DECODERS[m.decoder], PIXEL_COMPONENTS[m.decoder]
        setattr(config, name, self.frozen.decoder.config)
        setattr(config, pixel_name, PixelConfig(unet=self.unet_config, vae=self.frozen.vae_config,
                                                scheduler=self.scheduler_config, defaults=self.inference_defaults()))
        modules = {name: self.frozen.decoder, pixel_name: self.pixel_decoder()}
        if self.frozen.init is None:
            modules.update(eva=self.frozen.eva, tokenizer=self.frozen.tokenizer)
        dtype = mx.float16 if m.export_dtype == "float16" else None
        save_components(folder, config, modules, dtype=dtype)
