"""The tokenizer stage: LaVIT's stage 1 (paper section 3.1, reference section 5 item 1).

EVA is frozen (read from `model.init`, an MLX folder such as the encoder stage's export).
The selector, merger, quantizer and VQ decoder(s) learn to reconstruct the frozen encoder's
patch features (the ones the tokenizer reads: last block before the final norm, CLS
dropped) from the kept, quantised tokens:

    loss = mean_patches(1 - cos(decoded, target))      summed over the trained decoders
         + keep_weight * (mean keep fraction - keep_ratio)^2
         + decision_weight * mean(p_keep * (1 - p_keep))
         + commitment * ||z - sg(e)||^2                  (kept tokens)
         + codebook_weight * ||sg(z) - e||^2             (kept tokens; `codebook: gradient` only)

The decision term is this project's: the release samples the selection at inference, where
the keep fraction is the mean keep probability that the ratio term holds at rho; this
project's default is the deterministic rule p_keep > 1/2, which keeps rho only when the
probabilities are decided. In a short run they are not: the selector ranks content patches
higher but leaves every probability below 1/2 (3% kept deterministically against 39%
sampled after 50 steps). The term pushes each probability away from 1/2, to the side it
leans to. (Annealing the Gumbel noise instead fails: a draw with noise scale s keeps a
patch with probability sigmoid(logit / s), and the selector shrinks its logits with s.)

Centred features (`center_features`): the pre-norm features of a residual ViT share a large
constant component (for the shapes encoder the mean feature alone scores 1 - cos = 0.07, and
after the merger's LayerNorms every token is ~97% the same vector), so the quantizer's inputs
start collapsed and the decoder learns to ignore the codes (measured: a decoder whose output
did not depend on the image). The stage therefore subtracts the mean patch feature of the
first `init_batches` batches from the frozen EVA's output, folded into its last block's
`mlp.fc2.bias` (exact, no new parameter); the tokenizer reads, and the decoder reconstructs,
centred features, at training and at inference, and the shifted EVA is exported with them.

Patch weights (`patch_weights: norm`, this project's; the paper's sum is `uniform`): each
patch's 1 - cos is weighted by the length of its centred target feature, normalised to mean 1
per image. In a world of small objects on a plain background most patches are background,
close to the mean feature; under uniform weights the decoder reconstructs them well and the
objects' patches hardly at all, and nothing asks the codes to keep what tells objects apart.
Measured on the shapes tokenizer (uniform): decoded features of object patches at cos 0.14 to
their targets (background 0.75), and a kept object patch's code told its colour no better than
chance (18%, six colours) although the encoder's features give it linearly at 99%.

Re-quantization (`model.tokenizer_init` + `model.frozen`, `loss.projection_init: pca`,
`loss.kmeans_on: kept`; this project's, the shapes build's `quantizer` step): a second run
starts from a trained tokenizer, keeps its selector and merger (and keep threshold) as they
are, sets the quantizer's projection to the first `code_dim` principal components of the kept
merger outputs of the `init_batches` batches (`pca_projection`), k-means the codebook on the
kept tokens only, and trains the codebook and the decoder on the new codes. Measured on the
shapes tokenizer: the first pass's trained projection keeps what the background patches
need; a linear probe finds a kept object patch's colour in the merger's output 99.9% of the
time, in z 35% and in its code's row 18%; after the second pass z gives it 99.9% and the row 85%.

Whitened targets (`loss.target_space: whitened`, this project's; the paper compares raw
features): the reconstruction's cosine is taken between PCA-whitened decoded and target
features (`whitening`, fitted once on the `init_batches` batches' target features, kept in
the stage state), so every principal direction of the features counts alike. With
`model.frozen` naming every tokenizer part, codebook included (no EMA, no restarts), a run
trains the decoder alone and every code stays as it was. Measured on the bundled shapes
model (2026-12-06): a linear probe read a held-out object patch's colour from the decoded
features 15% of the time (chance 17%; its code's row 79%, the target 99.7%); 1500
decoder-only steps in the whitened space (lr 2e-3) gave 53% (`lavit_mlx/shapes/probes.py`).

The paper's sum over the 256 patches is taken as a mean here (so `keep_weight` is on the
scale of one patch). The keep fraction is the batch's, so images with more content can keep
more tokens. Selection is a straight-through hard Gumbel-softmax (`gumbel_tau`); the codebook
lookup is straight-through (`z + sg(e - z)`), both in `DynamicVisualTokenizer.__call__`.

Codebook (l2-normalised rows, as the release's): either BEiT-v2's norm-EMA (`codebook: ema`;
the rows get no gradient: each step, for every code used, the mean of the l2-normalised
encoder outputs assigned to it is l2-normalised, the row moves to it with `ema_decay` and is
re-normalised; the counts and sums are all-reduced over data-parallel ranks, so every rank
keeps the same codebook) or plain gradient updates (`codebook: gradient`, rows re-normalised
after each step). Both start from spherical k-means on the encoder outputs of the first
`init_batches` batches, and a code unused for `dead_after` steps is re-drawn from the
step's kept encoder outputs (the same draw on every rank).

Fixed shapes in the compiled step: all N positions are computed; dropped tokens are masked
in the merger's softmax (the model's behaviour) and in the decoder's cross-attention. The
kept tokens stay at their positions and each gets the position embedding of its rank among
the kept ones, so the decoder sees what inference gives it (the kept codes in raster order
with positions 0..T-1): cross-attention does not depend on the order of its keys
(`VQDecoder.decode_features`). In training the decoder's key mask is the straight-through
keep mask used as softmax weights (forward: the padding mask, to 1e-6) rather than the
additive padding bias, so that the selector learns what each kept code is worth to the
reconstruction; through the merger's attention alone that signal is too weak for a short run.

The decoder's trunk and `decode_task_layer` are trained here against the target features;
its `unet_proj*` heads (and the high-res attention pool) stay frozen at their
initialisation and are trained with the pixel decoder in stage 3.

Export: `out/model` = a copy of the init folder + `eva` (centred), `tokenizer` and the trained
decoders, so `lavit tokenize --model out/model` works.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Dict, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ...config import LaVITConfig, TokenizerConfig, VQDecoderConfig, check_heads, mlp_width
from ...data import merge_states
from ...errors import LaVITError
from ...models.visual_tokenizer import DynamicVisualTokenizer, l2_normalize
from ...models.vq_decoder import VQDecoder
from ..config import RunConfig, register_stage
from ..loop import Stage, World
from . import stage_builder
from .encoder import INIT_STD, ImageData, eval_sources

DECODERS = {"highres": "highres_decoder", "lowres": "lowres_decoder"}
CODEBOOK_MODES = ("ema", "gradient")
PATCH_WEIGHTS = ("uniform", "norm")
PROJECTION_INITS = ("random", "pca")
KMEANS_ON = ("all", "kept")
FROZEN_PARTS = ("selector", "merger", "projection", "codebook")
TARGET_SPACES = ("raw", "whitened")
WHITEN_FLOOR = 1e-4  # eigenvalues of the target covariance below this times the largest are raised to it


@dataclass
class DecoderSection:
    """One VQ decoder's sizes (`code_dim`, `num_patches` and `feature_dim` follow the tokenizer and EVA)."""

    width: int = 128
    depth: int = 2
    num_heads: int = 4
    mlp_dim: int = 0  # 0: int(width * 4.3637)
    context_dims: list = (128, 128)  # high-res: unet_proj_1, unet_proj_2; low-res: unet_proj
    pooled_dim: int = 128  # high-res attention pool output


@dataclass
class TokenizerModel:
    """`model:` of the tokenizer stage."""

    init: str = ""  # MLX folder holding the encoder (eva); the export starts as a copy of it
    merger_depth: int = 2
    num_heads: int = 4
    mlp_dim: int = 0  # 0: int(width * 4.3637); the width is EVA's
    codebook_size: int = 1024
    code_dim: int = 32
    decoders: list = ("highres",)  # which VQ decoders to train: highres, lowres
    highres_decoder: DecoderSection = field(default_factory=DecoderSection)
    lowres_decoder: DecoderSection = field(default_factory=lambda: DecoderSection(context_dims=(128,), pooled_dim=0))
    tokenizer_init: str = ""  # an MLX folder whose tokenizer (and decoders, where it has them) this run starts from
    frozen: list = ()  # tokenizer parts left as they start: selector, merger, projection, codebook (no EMA, no restarts)

    def check(self) -> None:
        if not self.init:
            raise LaVITError("model.init: the MLX folder of the encoder (eva) is required")
        unknown = [p for p in self.frozen if p not in FROZEN_PARTS]
        if unknown:
            raise LaVITError(f"model.frozen: choose among {', '.join(FROZEN_PARTS)}, not {unknown}")
        if self.frozen and not self.tokenizer_init:
            raise LaVITError("model.frozen: parts can only be frozen when model.tokenizer_init gives them trained")
        unknown = [d for d in self.decoders if d not in DECODERS]
        if unknown or not self.decoders:
            raise LaVITError(f"model.decoders: choose among {', '.join(DECODERS)}, not {unknown or 'none'}")
        if self.codebook_size < 2 or self.code_dim < 1:
            raise LaVITError("model.codebook_size must be at least 2 and model.code_dim at least 1")
        for name in self.decoders:
            dims = getattr(self, DECODERS[name]).context_dims
            if len(dims) != (2 if name == "highres" else 1):
                raise LaVITError(f"model.{DECODERS[name]}.context_dims: expected "
                                 f"{'2 widths' if name == 'highres' else '1 width'}, got {list(dims)}")


@dataclass
class TokenizerLoss:
    """`loss:` of the tokenizer stage."""

    keep_ratio: float = 1 / 3  # rho: the target mean keep fraction
    keep_weight: float = 2.0  # lambda
    gumbel_tau: float = 1.0  # temperature of the straight-through Gumbel-softmax selection
    decision_weight: float = 0.5  # weight of mean p(1 - p) of the keep probabilities (see the docstring)
    commitment: float = 0.25  # beta
    codebook: str = "ema"  # ema | gradient
    codebook_weight: float = 1.0  # the codebook term (gradient mode)
    ema_decay: float = 0.99
    init_batches: int = 2  # batches read once at the start: the feature mean and the k-means data
    kmeans_iters: int = 10  # 0: the codebook starts from random unit rows
    center_features: bool = True  # shift EVA's output to zero mean (see the module docstring)
    calibrate_threshold: bool = True  # evaluate and export with the keep threshold that keeps rho
    dead_after: int = 100  # steps without a use that make a code dead (logged, and restarted)
    restart_dead: bool = True
    patch_weights: str = "uniform"  # uniform | norm: each patch's term weighted by its target's length (see the docstring)
    projection_init: str = "random"  # random | pca: the quantizer's projection starts as the kept merger outputs' PCA
    kmeans_on: str = "all"  # all | kept: the positions whose encoder outputs the codebook's k-means clusters
    target_space: str = "raw"  # raw | whitened: the reconstruction's cosine on PCA-whitened features (see the docstring)

    def check(self) -> None:
        if self.projection_init not in PROJECTION_INITS:
            raise LaVITError(f"loss.projection_init {self.projection_init!r}: choose from {', '.join(PROJECTION_INITS)}")
        if self.kmeans_on not in KMEANS_ON:
            raise LaVITError(f"loss.kmeans_on {self.kmeans_on!r}: choose from {', '.join(KMEANS_ON)}")
        if self.projection_init == "pca" and self.init_batches < 1:
            raise LaVITError("loss.projection_init pca: needs loss.init_batches of at least 1 (its data)")
        if self.target_space not in TARGET_SPACES:
            raise LaVITError(f"loss.target_space {self.target_space!r}: choose from {', '.join(TARGET_SPACES)}")
        if self.target_space == "whitened" and self.init_batches < 1:
            raise LaVITError("loss.target_space whitened: needs loss.init_batches of at least 1 (its data)")
        if self.patch_weights not in PATCH_WEIGHTS:
            raise LaVITError(f"loss.patch_weights {self.patch_weights!r}: choose from {', '.join(PATCH_WEIGHTS)}")
        if self.codebook not in CODEBOOK_MODES:
            raise LaVITError(f"loss.codebook {self.codebook!r}: choose from {', '.join(CODEBOOK_MODES)}")
        if not 0 < self.keep_ratio <= 1:
            raise LaVITError(f"loss.keep_ratio {self.keep_ratio}: expected in (0, 1]")
        if not 0 <= self.ema_decay < 1:
            raise LaVITError(f"loss.ema_decay {self.ema_decay}: expected in [0, 1)")
        if self.gumbel_tau <= 0 or self.dead_after < 1:
            raise LaVITError("loss.gumbel_tau must be > 0 and loss.dead_after at least 1")


register_stage("tokenizer", TokenizerModel, TokenizerLoss,
               {"steps": 600, "batch_size": 32, "learning_rate": 1e-3, "warmup_steps": 50, "weight_decay": 0.01})


# ----------------------------------------------------------------------------- codebook mechanics
def code_statistics(codes: mx.array, z: mx.array, kept: mx.array, codebook_size: int):
    """Per code: how many kept tokens chose it (K,) and the sum of their z (K, d)."""
    codes, kept = codes.reshape(-1), kept.reshape(-1)
    z = z.reshape(codes.shape[0], -1)
    counts = mx.zeros((codebook_size,), mx.float32).at[codes].add(kept)
    sums = mx.zeros((codebook_size, z.shape[-1]), mx.float32).at[codes].add(z * kept[:, None])
    return counts, sums


def norm_ema_update(codebook: mx.array, counts: mx.array, sums: mx.array, decay: float) -> mx.array:
    """BEiT-v2's norm-EMA step: each used code moves to the l2-normalised mean of its
    assignments with `decay`, then is re-normalised; unused codes stay."""
    centroid = l2_normalize(sums / mx.maximum(counts, 1.0)[:, None])
    moved = l2_normalize(decay * codebook + (1.0 - decay) * centroid)
    return mx.where((counts > 0)[:, None], moved, codebook)


def perplexity(counts: mx.array) -> mx.array:
    """exp(entropy) of the code usage: 1 when one code takes everything, K when all are equal."""
    p = counts / mx.maximum(mx.sum(counts), 1.0)
    return mx.exp(-mx.sum(mx.where(p > 0, p * mx.log(mx.maximum(p, 1e-30)), 0.0)))


def spherical_kmeans(points: mx.array, k: int, iters: int, key: mx.array) -> mx.array:
    """k unit centroids of unit `points` (n, d) by cosine k-means; empty clusters keep their centroid."""
    n = points.shape[0]
    start = mx.random.permutation(n, key=key)[:k] if n >= k else mx.random.randint(0, n, (k,), key=key)
    centroids = points[start]
    for _ in range(iters):
        assign = mx.argmax(points @ centroids.T, axis=-1)
        counts, sums = code_statistics(assign, points, mx.ones((n,)), k)
        centroids = mx.where((counts > 0)[:, None], l2_normalize(sums), centroids)
        mx.eval(centroids)
    return centroids


def cosine(a: mx.array, b: mx.array) -> mx.array:
    return mx.sum(l2_normalize(a) * l2_normalize(b), axis=-1)


def patch_weights(target: mx.array, mode: str) -> mx.array:
    """Per-patch weights (B, N) of the reconstruction term, mean 1 in each image: 1 everywhere
    (`uniform`), or each target feature's length (`norm`; the features are centred)."""
    if mode == "uniform":
        return mx.ones(target.shape[:2], target.dtype)
    length = mx.linalg.norm(target, axis=-1)
    return length / mx.maximum(mx.mean(length, axis=1, keepdims=True), 1e-6)


def whitening(features: np.ndarray):
    """(mean (w,), matrix (w, w)) that map features (n, w) to PCA-whitened ones, `(x - mean) @ matrix`
    with unit variance along every principal direction; eigenvalues under `WHITEN_FLOOR` times the
    largest are raised to it (directions of no variance are not blown up)."""
    points = np.asarray(features, np.float64).reshape(-1, features.shape[-1])
    mean = points.mean(axis=0)
    values, vectors = np.linalg.eigh(np.cov(points - mean, rowvar=False))
    values = np.maximum(values, WHITEN_FLOOR * values.max())
    return mean.astype(np.float32), (vectors / np.sqrt(values)).astype(np.float32)


def pca_projection(points: np.ndarray, code_dim: int):
    """The quantizer projection `Linear(w, w) -> tanh -> Linear(w, code_dim)` that gives the first
    `code_dim` principal components of `points` (n, w), each scaled by the first one's standard
    deviation (so tanh stays near its linear part): (w1, b1, w2, b2) as float32 numpy arrays."""
    points = np.asarray(points, np.float64)
    if points.shape[0] < 2:
        raise LaVITError("loss.projection_init pca: fewer than 2 kept tokens in the init batches")
    mean = points.mean(axis=0)
    values, vectors = np.linalg.eigh(np.cov((points - mean).T))
    order = np.argsort(values)[::-1]
    vectors = vectors[:, order]
    sign = np.where(vectors[np.abs(vectors).argmax(axis=0), np.arange(vectors.shape[1])] < 0, -1.0, 1.0)
    vectors = vectors * sign  # deterministic signs: the largest entry of each component positive
    scale = max(float(np.sqrt(max(values[order[0]], 0.0))), 1e-6)
    w1 = vectors.T / scale
    b1 = -w1 @ mean
    width = points.shape[1]
    w2 = np.zeros((code_dim, width))
    w2[np.arange(min(code_dim, width)), np.arange(min(code_dim, width))] = 1.0
    return tuple(a.astype(np.float32) for a in (w1, b1, w2, np.zeros(code_dim)))


def kept_positions(kept: mx.array) -> mx.array:
    """Each token's rank among the kept ones of its image (B, N): the decoder position it has at inference."""
    return mx.maximum(mx.cumsum(kept, axis=1) - 1, 0).astype(mx.int32)


# ----------------------------------------------------------------------------- model
class TokenizerTraining(nn.Module):
    """The frozen EVA, the tokenizer and the decoder(s) being trained, as one tree."""

    def __init__(self, eva: nn.Module, tokenizer: DynamicVisualTokenizer, decoders: Dict[str, VQDecoder]):
        super().__init__()
        self.eva = eva
        self.tokenizer = tokenizer
        for name, decoder in decoders.items():
            setattr(self, name, decoder)


def init_decoder(decoder: VQDecoder) -> None:
    """Random query and position embeddings (the module's zeros are placeholders for loading)."""
    decoder.pos_embed = INIT_STD * mx.random.normal(decoder.pos_embed.shape)
    decoder.query_embed = INIT_STD * mx.random.normal(decoder.query_embed.shape)
    if decoder.config.highres:
        pool = decoder.unet_attnpool
        pool.positional_embedding = mx.random.normal(pool.positional_embedding.shape) * decoder.config.feature_dim ** -0.5


def tokenizer_part(tokenizer: DynamicVisualTokenizer, part: str) -> list:
    """The modules of a `model.frozen` part."""
    return {"selector": [tokenizer.token_predictor], "merger": [tokenizer.causal_encoder],
            "projection": list(tokenizer.encode_task_layer), "codebook": [tokenizer.quantize]}[part]


def freeze_unet_heads(decoder: VQDecoder) -> None:
    """The UNet projections are trained with the pixel decoder (stage 3), not here."""
    for name in ("unet_proj", "unet_proj_1", "unet_proj_2", "unet_attnpool"):
        if name in decoder:
            decoder[name].freeze()


# ----------------------------------------------------------------------------- the stage
@stage_builder("tokenizer")
class TokenizerStage(Stage):
    """`lavit train tokenizer`: LaVIT's stage 1 (see the module docstring)."""

    name = "tokenizer"

    def __init__(self, config: RunConfig, world: World):
        super().__init__(config, world)
        import lavit_mlx

        self.model_config: TokenizerModel = config.model
        self.loss_config: TokenizerLoss = config.loss
        init = Path(self.model_config.init).expanduser()
        self.init_folder = init
        encoder = lavit_mlx.load(init, components=["eva"])
        vision = encoder.config.vision
        self.lavit_config = self._lavit_config(encoder.config)
        tokenizer = DynamicVisualTokenizer(self.lavit_config.tokenizer, quantizer=True)
        tokenizer.quantize.embedding.weight = l2_normalize(tokenizer.quantize.embedding.weight)
        decoders = {}
        for name in self.model_config.decoders:
            decoders[DECODERS[name]] = decoder = VQDecoder(self.lavit_config.component(DECODERS[name]))
            init_decoder(decoder)
        if self.model_config.tokenizer_init:
            self._start_from(Path(self.model_config.tokenizer_init).expanduser(), tokenizer, decoders)
        for decoder in decoders.values():
            freeze_unet_heads(decoder)
        self.decoder_names = list(decoders)
        self.model = TokenizerTraining(encoder.eva, tokenizer, decoders)
        self.model.eva.freeze()
        if self.loss_config.codebook == "ema":
            tokenizer.quantize.freeze()  # moved by `update`, not by the optimizer
        for part in self.model_config.frozen:
            for module in tokenizer_part(tokenizer, part):
                module.freeze()
        self.codebook_frozen = "codebook" in self.model_config.frozen
        self.model.train()
        self.model.eva.eval()
        self.codebook_size = self.lavit_config.tokenizer.codebook_size
        self.centring_key = f"eva.blocks.{vision.depth - 1}.mlp.fc2.bias"
        self.num_patches = vision.num_patches
        self.state = {
            "idle": mx.zeros((self.codebook_size,), mx.int32),  # steps since each code was last used
            "restart_key": mx.random.key(config.train.seed),  # the same dead-code draws on every rank
            "initialised": mx.zeros((1,), mx.int32),  # 1 once the feature mean and k-means were set
        }
        if self.loss_config.target_space == "whitened":
            width = self.lavit_config.tokenizer.width
            self.state["whiten_mean"] = mx.zeros((width,))
            self.state["whiten"] = mx.eye(width)  # set from the init batches' features
        self.data = ImageData(config, world, self._example)

    def _start_from(self, folder: Path, tokenizer: DynamicVisualTokenizer, decoders: Dict[str, VQDecoder]) -> None:
        """`model.tokenizer_init`: the folder's tokenizer (and its keep threshold) replaces the
        fresh one, and its decoders the fresh ones where it has them; the sizes must match."""
        import lavit_mlx
        from mlx.utils import tree_flatten

        if not folder.is_dir():
            raise LaVITError(f"model.tokenizer_init {folder}: no such folder")
        source = lavit_mlx.load(folder)
        if source.config.tokenizer is None:
            raise LaVITError(f"model.tokenizer_init {folder}: holds no tokenizer")
        ours, theirs = self.lavit_config.tokenizer, source.config.tokenizer
        for size in ("width", "merger_depth", "num_heads", "mlp_dim", "codebook_size", "code_dim"):
            if getattr(ours, size) != getattr(theirs, size):
                raise LaVITError(f"model.tokenizer_init {folder}: its tokenizer has {size} {getattr(theirs, size)}, "
                                 f"this run's model section {getattr(ours, size)}")
        components = {"tokenizer": tokenizer}
        components.update({name: decoder for name, decoder in decoders.items()
                           if source.config.component(name) is not None})
        for name, module in components.items():
            if name != "tokenizer" and source.config.component(name) != self.lavit_config.component(name):
                raise LaVITError(f"model.tokenizer_init {folder}: its {name} has other sizes than this run's model section")
            weights = [(k, v.astype(mx.float32)) for k, v in tree_flatten(source.component(name).parameters())]
            module.load_weights([(k, v) for k, v in weights if not k.startswith("vit_proj.")], strict=True)
        ours.keep_threshold = theirs.keep_threshold
        tokenizer.config.keep_threshold = theirs.keep_threshold

    def _lavit_config(self, encoder_config: LaVITConfig) -> LaVITConfig:
        vision = encoder_config.vision
        if vision is None:
            raise LaVITError(f"{self.init_folder}: holds no eva to train the tokenizer on")
        m = self.model_config
        tokenizer = TokenizerConfig(width=vision.width, merger_depth=m.merger_depth, num_heads=m.num_heads,
                                    mlp_dim=m.mlp_dim or mlp_width(vision.width), codebook_size=m.codebook_size,
                                    code_dim=m.code_dim)
        check_heads(vision.width, m.num_heads, "token merger", "model.num_heads")
        parts = {"tokenizer": tokenizer,
                 "token_ids": encoder_config.token_ids.replace(codebook_size=m.codebook_size)}
        for name in m.decoders:
            section: DecoderSection = getattr(m, DECODERS[name])
            check_heads(section.width, section.num_heads, "VQ decoder", f"model.{DECODERS[name]}.num_heads")
            if name == "highres":
                check_heads(vision.width, section.num_heads, "VQ decoder pooling", f"model.{DECODERS[name]}.num_heads")
            parts[DECODERS[name]] = VQDecoderConfig(
                highres=name == "highres", width=section.width, depth=section.depth, num_heads=section.num_heads,
                mlp_dim=section.mlp_dim or mlp_width(section.width), code_dim=m.code_dim,
                num_patches=vision.num_patches, feature_dim=vision.width, context_dims=tuple(section.context_dims),
                pooled_dim=section.pooled_dim if name == "highres" else 0)
        return encoder_config.replace(**parts)

    @staticmethod
    def _example(sample) -> dict:
        return {"num_objects": np.int32(sample.meta.get("num_objects", 0))}

    # ----------------------------------------------------------------- loss and updates
    def loss(self, model, batch):
        cfg = self.loss_config
        target = mx.stop_gradient(model.eva(batch["pixels"])[:, 1:])  # (B, N, width), CLS dropped
        out = model.tokenizer(target, tau=cfg.gumbel_tau)  # training mode: a hard Gumbel draw
        kept = mx.stop_gradient(out.keep)  # the forward values: exactly 0 or 1
        positions = kept_positions(kept)
        weights = patch_weights(target, cfg.patch_weights)
        compared = self._target_space(target)
        metrics = {}
        loss = 0.0
        for name in self.decoder_names:
            decoded = model[name].decode_features(out.quantized, kept, positions, policy=out.keep)
            term = mx.mean(weights * (1.0 - cosine(self._target_space(decoded), compared)))
            metrics[f"{name.split('_')[0]}_reconstruction"] = term
            loss = loss + term
        keep_fraction = mx.mean(out.keep)  # carries the straight-through gradient
        ratio = (keep_fraction - cfg.keep_ratio) ** 2
        keep_probability = mx.exp(out.logprobs[..., 0])
        indecision = mx.mean(keep_probability * (1.0 - keep_probability))
        count = mx.maximum(mx.sum(kept), 1.0)
        rows = model.tokenizer.quantize.embedding(out.codes)
        commitment = mx.sum(kept * mx.sum((out.z - mx.stop_gradient(rows)) ** 2, axis=-1)) / count
        loss = loss + cfg.keep_weight * ratio + cfg.commitment * commitment + cfg.decision_weight * indecision
        if cfg.codebook == "gradient":
            # (e - sg(z)), not (sg(z) - e): with its stop_gradients removed as no-ops, the latter is the
            # commitment term's graph again, and mx.compile (0.32) fails with `_Map_base::at` when it merges
            # two equivalent subgraphs of which the later one is also an output (this metric)
            codebook = mx.sum(kept * mx.sum((rows - mx.stop_gradient(out.z)) ** 2, axis=-1)) / count
            loss = loss + cfg.codebook_weight * codebook
            metrics["codebook"] = codebook
        counts, _ = code_statistics(out.codes, out.z, kept, self.codebook_size)
        metrics.update({
            "keep_ratio_loss": ratio, "indecision": indecision, "commitment": commitment,
            "keep_fraction": keep_fraction,
            "tokens_per_image": mx.sum(kept) / kept.shape[0], "perplexity": perplexity(counts),
            "dead_codes": mx.sum(self.state["idle"] >= cfg.dead_after),
            # arrays for `update` (not logged)
            "codes": out.codes, "z": out.z, "kept": kept,
        })
        return loss, metrics

    def _target_space(self, features: mx.array) -> mx.array:
        """Features as the reconstruction compares them: as they are, or PCA-whitened."""
        if self.loss_config.target_space == "raw":
            return features
        return (features - self.state["whiten_mean"]) @ self.state["whiten"]

    def update(self, model, metrics) -> None:
        """Codebook statistics of the step (all-reduced over ranks) -> norm-EMA or re-normalisation,
        idle counters, dead-code restarts. Runs inside the compiled step."""
        cfg = self.loss_config
        if self.codebook_frozen:  # model.frozen: codebook: the rows stay as they started
            return
        quantize = model.tokenizer.quantize
        counts, sums = code_statistics(metrics["codes"], metrics["z"], metrics["kept"], self.codebook_size)
        if self.world.size > 1:
            counts = mx.distributed.all_sum(counts, group=self.world.group)
            sums = mx.distributed.all_sum(sums, group=self.world.group)
        weight = quantize.embedding.weight
        if cfg.codebook == "ema":
            weight = norm_ema_update(weight, counts, sums, cfg.ema_decay)
        else:
            weight = l2_normalize(weight)
        idle = mx.where(counts > 0, 0, self.state["idle"] + 1)
        if cfg.restart_dead:
            key, draw = mx.random.split(self.state["restart_key"])
            dead = idle >= cfg.dead_after
            weight = mx.where(dead[:, None], self._restart_rows(metrics["z"], metrics["kept"], draw), weight)
            idle = mx.where(dead, 0, idle)
            self.state["restart_key"] = key
        self.state["idle"] = idle.astype(mx.int32)
        quantize.embedding.weight = weight

    def _restart_rows(self, z: mx.array, kept: mx.array, key: mx.array) -> mx.array:
        """One kept encoder output of the step (over all ranks) per code, drawn uniformly."""
        z = z.reshape(-1, z.shape[-1])
        kept = kept.reshape(-1)
        if self.world.size > 1:
            z = mx.distributed.all_gather(z, group=self.world.group)
            kept = mx.distributed.all_gather(kept, group=self.world.group)
        logits = mx.where(kept > 0, 0.0, -1e9)  # uniform over the kept tokens (all, if none is kept)
        return z[mx.random.categorical(logits, num_samples=self.codebook_size, key=key)]

    def initialise_from_data(self) -> None:
        """From the encoder's outputs on the first `init_batches` training batches: the feature
        mean folded into EVA (`center_features`), then spherical k-means of the tokenizer's
        outputs (every position, deterministic selection). A second stream reads them, so the
        training cursor does not move; they are all-gathered so that every rank does the same."""
        cfg = self.loss_config
        tokenizer = self.model.tokenizer
        if cfg.init_batches > 0:
            batches = list(islice(ImageData(self.config, self.world, self._example), cfg.init_batches))
            features = mx.concatenate([self.model.eva(batch["pixels"])[:, 1:] for batch in batches])
            if self.world.size > 1:
                features = mx.distributed.all_gather(features, group=self.world.group)
            if cfg.center_features:
                mean = mx.mean(features, axis=(0, 1))
                fc2 = self.model.eva.blocks[-1].mlp.fc2
                fc2.bias = fc2.bias - mean  # the residual stream ends with this bias: EVA's output - mean
                features = features - mean
            if cfg.target_space == "whitened":
                mean, matrix = whitening(np.array(features))
                self.state["whiten_mean"], self.state["whiten"] = mx.array(mean), mx.array(matrix)
            if cfg.projection_init == "pca" or cfg.kmeans_iters > 0:
                tokenizer.eval()
                out = tokenizer(features)
                kept = np.array(out.keep).reshape(-1) > 0.5
                if not kept.any():
                    kept[:] = True  # a selector that keeps nothing yet: every position
                if cfg.projection_init == "pca":
                    merged = np.array(out.merged).reshape(-1, out.merged.shape[-1])[kept]
                    w1, b1, w2, b2 = pca_projection(merged, self.lavit_config.tokenizer.code_dim)
                    first, last = tokenizer.encode_task_layer[0], tokenizer.encode_task_layer[2]
                    first.weight, first.bias, last.weight, last.bias = (mx.array(a) for a in (w1, b1, w2, b2))
                    out = tokenizer(features, keep=out.keep)
                tokenizer.train()
                if cfg.kmeans_iters > 0:
                    z = out.z.reshape(-1, out.z.shape[-1])
                    if cfg.kmeans_on == "kept":
                        z = z[mx.array(np.flatnonzero(kept).astype(np.int32))]
                    key = mx.random.key(self.config.train.seed + 1)
                    tokenizer.quantize.embedding.weight = spherical_kmeans(z, self.codebook_size, cfg.kmeans_iters, key)
        self.state["initialised"] = mx.ones((1,), mx.int32)
        mx.eval(self.model.parameters(), self.state)

    # ----------------------------------------------------------------- data
    def batches(self):
        if int(self.state["initialised"][0]) == 0:  # a fresh run (a resumed one loaded its codebook)
            self.initialise_from_data()
        yield from self.data

    def data_state(self) -> dict:
        return self.data.state()

    def load_data_state(self, state: dict) -> None:
        self.data.load(state)

    def merge_data_states(self, states):
        return merge_states(states)

    def saved_parameters(self) -> Dict[str, mx.array]:
        """The trainable parameters, the codebook (moved by `update` in EMA mode) and the EVA bias
        that carries the centring."""
        saved = super().saved_parameters()
        saved["tokenizer.quantize.embedding.weight"] = self.model.tokenizer.quantize.embedding.weight
        saved[self.centring_key] = self.model.eva.blocks[-1].mlp.fc2.bias
        return saved

    # ----------------------------------------------------------------- evaluation and export
    def evaluate(self) -> Dict[str, float]:
        """Over `train.eval_batches` eval batches, with inference's deterministic selection:
        reconstruction (1 - cos) per decoder, kept fraction, mean tokens per image (what the
        export gives `lavit tokenize`; 0 when no probability passes the rule's threshold) and
        by object count (`tokens_objects_N`, from the manifest's `num_objects`), distinct codes used."""
        tokenizer = self.model.tokenizer
        tokenizer.eval()
        self.calibrate_threshold()
        data = ImageData(self.config, self.world, self._example, sources=eval_sources(self.config), epochs=1,
                         shuffle=False)
        sums: Dict[str, float] = {}
        tokens: Dict[int, list] = {}
        used = np.zeros((self.codebook_size,), bool)
        batches = 0
        for batch in islice(data, self.config.train.eval_batches):
            target = self.model.eva(batch["pixels"])[:, 1:]
            out = tokenizer(target)
            positions = kept_positions(out.keep)
            for name in self.decoder_names:
                decoded = self.model[name].decode_features(out.quantized, out.keep, positions)
                key = f"{name.split('_')[0]}_reconstruction"
                compared = cosine(self._target_space(decoded), self._target_space(target))
                sums[key] = sums.get(key, 0.0) + float(mx.mean(1.0 - compared))
            sums["keep_fraction"] = sums.get("keep_fraction", 0.0) + float(mx.mean(out.keep))
            keep = np.array(out.keep) > 0.5
            sums["tokens_per_image"] = sums.get("tokens_per_image", 0.0) + float(keep.sum(axis=1).mean())
            for count, objects in zip(keep.sum(axis=1), np.array(batch["num_objects"])):
                tokens.setdefault(int(objects), []).append(int(count))
            used[np.array(out.codes)[keep]] = True
            batches += 1
        tokenizer.train()
        result = {key: value / max(batches, 1) for key, value in sums.items()}
        result.update({f"tokens_objects_{n}": float(np.mean(v)) for n, v in sorted(tokens.items())})
        result["codes_used"] = float(used.sum())
        return result

    def calibrate_threshold(self) -> None:
        """Set `tokenizer.keep_threshold` to the (1 - rho) quantile of the keep probabilities
        over the eval batches (`loss.calibrate_threshold`), the same on every rank.

        Training draws hard Gumbel masks, where the ratio term holds the *mean keep
        probability* at rho; inference's deterministic rule (p > 1/2) keeps rho only once the
        probabilities are decided, which a short run does not reach (a run of 40 steps on the
        test world keeps no patch by that rule). The stored threshold keeps the selector's
        highest-ranked rho of the patches on average, more on busier pictures.
        """
        if not self.loss_config.calibrate_threshold:
            return
        tokenizer = self.model.tokenizer
        data = ImageData(self.config, self.world, self._example, sources=eval_sources(self.config), epochs=1,
                         shuffle=False)
        probs = []
        for batch in islice(data, self.config.train.eval_batches):
            logprobs = tokenizer.token_predictor(self.model.eva(batch["pixels"])[:, 1:])
            probs.append(np.exp(np.array(logprobs[..., 0])).ravel())
        if not probs:
            return
        probs = np.concatenate(probs)
        if self.world.size > 1:
            probs = np.array(mx.distributed.all_gather(mx.array(probs), group=self.world.group))
        threshold = float(np.quantile(probs, 1.0 - self.loss_config.keep_ratio))
        self.lavit_config.tokenizer.keep_threshold = threshold
        tokenizer.config.keep_threshold = threshold

    def export(self, folder: Path) -> None:
        from ...export import save_components

        self.calibrate_threshold()

        folder = Path(folder)
        if folder.resolve() != self.init_folder.resolve():
            if folder.exists():
                shutil.rmtree(folder)  # an earlier export of this run
            shutil.copytree(self.init_folder, folder)
        self.model.tokenizer.eval()
        modules = {"eva": self.model.eva, "tokenizer": self.model.tokenizer,
                   **{name: self.model[name] for name in self.decoder_names}}
        save_components(folder, self.lavit_config, modules)

    def close(self) -> None:
        if self.world.main:
            print(f"tokenizer data: {self.data.close()}", file=sys.stderr)
