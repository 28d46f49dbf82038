"""The YAML sections of the three LaVIT stages, pure Python (no torch, no mlx).

One run config describes a run for either framework (`lavit_mlx.training.config`): the
MLX trainers register their `model:`/`loss:` sections from their stage modules, which
import mlx. These are the same dataclasses, field for field and default for default
(`tests/train_torch/test_sections.py` compares them with the MLX stage modules wherever
those import), so that the PyTorch trainers read the same files without importing mlx.
They belong in one pure module that both sides import (`lavit_mlx/training/sections.py`);
until the MLX stages move there, `register()` adds these where MLX has not registered
its own.

Stage 3's are the MLX pixel stage's as it stood in its worktree (not yet committed there).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from lavit_mlx.errors import LaVITError
from lavit_mlx.training import config as run_config

# ----------------------------------------------------------------------------- stage 1: tokenizer
DECODERS = {"highres": "highres_decoder", "lowres": "lowres_decoder"}
CODEBOOK_MODES = ("ema", "gradient")
PATCH_WEIGHTS = ("uniform", "norm")
PROJECTION_INITS = ("random", "pca")
KMEANS_ON = ("all", "kept")
FROZEN_PARTS = ("selector", "merger", "projection", "codebook")
TARGET_SPACES = ("raw", "whitened")


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

    init: str = ""  # folder holding the encoder (eva); the export starts as a copy of it
    merger_depth: int = 2
    num_heads: int = 4
    mlp_dim: int = 0  # 0: int(width * 4.3637); the width is EVA's
    codebook_size: int = 1024
    code_dim: int = 32
    decoders: list = ("highres",)  # which VQ decoders to train: highres, lowres
    highres_decoder: DecoderSection = field(default_factory=DecoderSection)
    lowres_decoder: DecoderSection = field(default_factory=lambda: DecoderSection(context_dims=(128,), pooled_dim=0))
    tokenizer_init: str = ""  # a folder whose tokenizer (and decoders, where it has them) this run starts from
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
    decision_weight: float = 0.5  # weight of mean p(1 - p) of the keep probabilities
    commitment: float = 0.25  # beta
    codebook: str = "ema"  # ema | gradient
    codebook_weight: float = 1.0  # the codebook term (gradient mode)
    ema_decay: float = 0.99
    init_batches: int = 2  # batches read once at the start: the feature mean and the k-means data
    kmeans_iters: int = 10  # 0: the codebook starts from random unit rows
    center_features: bool = True  # shift EVA's output to zero mean
    calibrate_threshold: bool = True  # the MLX stage's export stores a calibrated keep threshold
    dead_after: int = 100  # steps without a use that make a code dead (logged, and restarted)
    restart_dead: bool = True
    patch_weights: str = "uniform"  # uniform | norm: each patch's term weighted by its target's length
    projection_init: str = "random"  # random | pca: the quantizer's projection starts as the kept merger outputs' PCA
    kmeans_on: str = "all"  # all | kept: the positions whose encoder outputs the codebook's k-means clusters
    target_space: str = "raw"  # raw | whitened: the reconstruction's cosine on PCA-whitened features

    def check(self) -> None:
        if self.target_space not in TARGET_SPACES:
            raise LaVITError(f"loss.target_space {self.target_space!r}: choose from {', '.join(TARGET_SPACES)}")
        if self.target_space == "whitened" and self.init_batches < 1:
            raise LaVITError("loss.target_space whitened: needs loss.init_batches of at least 1 (its data)")
        if self.projection_init not in PROJECTION_INITS:
            raise LaVITError(f"loss.projection_init {self.projection_init!r}: choose from {', '.join(PROJECTION_INITS)}")
        if self.kmeans_on not in KMEANS_ON:
            raise LaVITError(f"loss.kmeans_on {self.kmeans_on!r}: choose from {', '.join(KMEANS_ON)}")
        if self.projection_init == "pca" and self.init_batches < 1:
            raise LaVITError("loss.projection_init pca: needs loss.init_batches of at least 1 (its data)")
        if self.codebook not in CODEBOOK_MODES:
            raise LaVITError(f"loss.codebook {self.codebook!r}: choose from {', '.join(CODEBOOK_MODES)}")
        if self.patch_weights not in PATCH_WEIGHTS:
            raise LaVITError(f"loss.patch_weights {self.patch_weights!r}: choose from {', '.join(PATCH_WEIGHTS)}")
        if not 0 < self.keep_ratio <= 1:
            raise LaVITError(f"loss.keep_ratio {self.keep_ratio}: expected in (0, 1]")
        if not 0 <= self.ema_decay < 1:
            raise LaVITError(f"loss.ema_decay {self.ema_decay}: expected in [0, 1)")
        if self.gumbel_tau <= 0 or self.dead_after < 1:
            raise LaVITError("loss.gumbel_tau must be > 0 and loss.dead_after at least 1")


TOKENIZER_DEFAULTS = {"steps": 600, "batch_size": 32, "learning_rate": 1e-3, "warmup_steps": 50, "weight_decay": 0.01}

# ----------------------------------------------------------------------------- stage 2: llm
TARGETS = ("both", "text", "image")
SAMPLE_KINDS = ("caption", "vqa")
UNDERSTANDING_MODES = ("train", "projection", "frozen")
UNDERSTANDING_INITS = ("tokenizer", "identity")
EXPORTS = ("model", "adapter", "both")
EXPORT_DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class LoRASection:
    """`model.lora` of the llm stage (MLX's LoRA fine-tuning; the PyTorch trainer pretrains in full)."""

    rank: int = 0  # 0: train the whole LLM (no adapters)
    layers: int = -1  # adapters in the last N transformer blocks (-1: every block)
    scale: float = 20.0  # mlx-lm's: the update is scale * (x @ lora_a) @ lora_b
    dropout: float = 0.0
    dora: bool = False
    keys: Optional[List[str]] = None  # module paths inside a block (default: every linear)
    visual_rows: bool = True  # train the [IMG], [/IMG] and visual-id rows in full

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    def check(self) -> None:
        if self.rank < 0:
            raise LaVITError(f"model.lora.rank {self.rank}: expected 0 (full training) or more")
        if self.layers == 0 or self.layers < -1:
            raise LaVITError(f"model.lora.layers {self.layers}: expected -1 (every block) or at least 1")
        if not 0.0 <= self.dropout < 1.0:
            raise LaVITError(f"model.lora.dropout {self.dropout}: expected 0 <= dropout < 1")
        if self.dora and not self.enabled:
            raise LaVITError("model.lora.dora needs model.lora.rank of at least 1")


@dataclass
class LLMModelSection:
    """`model:` of the llm stage: where the LLM and the image side come from."""

    init: Optional[str] = None  # LaVIT folder: eva + tokenizer (+ understanding, llm, decoders)
    language_model: Optional[str] = None  # a text-only LLaMA folder (HF layout) to grow
    llm: dict = field(default_factory=dict)  # sizes of an LLM from scratch (config.json keys; vocab is derived)
    text_tokenizer: Optional[str] = None  # folder with tokenizer.model; default the LLM's
    understanding: str = "train"  # train (merger + vit_proj with the LLM) | projection (vit_proj only) | frozen
    understanding_init: str = "tokenizer"  # a new understanding merger: the tokenizer's | identity
    projection_init: str = "random"  # random here; scene_labels (the shapes world's fit) is MLX only
    projection_images: int = 2000  # (MLX only, with projection_init scene_labels)
    train_projection: bool = True  # false (vit_proj fixed) is MLX only
    quantize: Optional[int] = None  # 4 | 8: QLoRA (MLX only)
    group_size: int = 64
    lora: LoRASection = field(default_factory=LoRASection)
    init_std: float = 0.02  # normal init of a from-scratch LLM (LLaMA / GPT-2 practice)
    grow_noise: float = 0.1  # grown rows: mean of the text rows + this x their per-dim std x N(0, 1)
    vision_heads: Optional[int] = None
    export: str = "model"  # model | adapter | both
    export_dtype: Optional[str] = None  # float16 | bfloat16 | float32 (None: as trained)
    max_length: int = 256  # longest training sequence (longer ones are cut)
    bucket: int = 16  # sequences are padded to a multiple of this
    cache_batch: int = 32  # images per forward pass when tokenizing the data once (MLX)

    def check(self) -> None:
        if not self.init:
            raise LaVITError("model.init: give the MLX LaVIT folder with the encoder and the tokenizer")
        if self.language_model and self.llm:
            raise LaVITError("give model.language_model (grow a text LLaMA) or model.llm (sizes from scratch), not both")
        if self.understanding not in UNDERSTANDING_MODES:
            raise LaVITError(f"model.understanding {self.understanding!r}: choose {' or '.join(UNDERSTANDING_MODES)}")
        if self.understanding_init not in UNDERSTANDING_INITS:
            raise LaVITError(f"model.understanding_init {self.understanding_init!r}: choose "
                             f"{' or '.join(UNDERSTANDING_INITS)}")
        if self.projection_init != "random" or not self.train_projection:
            raise LaVITError("model.projection_init scene_labels and model.train_projection false are MLX only "
                             "(lavit train llm)")
        if self.quantize not in (None, 4, 8):
            raise LaVITError(f"model.quantize {self.quantize}: expected 4 or 8")
        if self.quantize and not self.lora.enabled:
            raise LaVITError("model.quantize trains adapters on a quantized LLM (QLoRA): set model.lora.rank")
        if self.export not in EXPORTS:
            raise LaVITError(f"model.export {self.export!r}: choose from {', '.join(EXPORTS)}")
        if self.export in ("adapter", "both") and not self.lora.enabled:
            raise LaVITError(f"model.export {self.export}: an adapter needs model.lora.rank of at least 1")
        if self.export_dtype not in (None, *EXPORT_DTYPES):
            raise LaVITError(f"model.export_dtype {self.export_dtype!r}: choose from {', '.join(EXPORT_DTYPES)}")
        self.llm = _llm_sizes(self.llm)
        if self.max_length < 8 or self.bucket < 1 or self.cache_batch < 1:
            raise LaVITError("model.max_length must be at least 8, model.bucket and model.cache_batch at least 1")
        self.lora.check()


def _llm_sizes(values: dict) -> dict:
    """`model.llm` checked against the LLaMA config's keys, numbers read as numbers (YAML
    reads 1e-5 as text)."""
    import dataclasses

    from lavit_mlx.config import LLMConfig

    defaults = {f.name: f.default for f in dataclasses.fields(LLMConfig) if f.name != "extra"}
    out = {}
    for key, value in (values or {}).items():
        if key not in defaults:
            raise LaVITError(f"unknown key model.llm.{key}{run_config._nearest(key, list(defaults))}")
        out[key] = run_config._coerce(value, defaults[key], f"model.llm.{key}")
    return out


@dataclass
class LLMLossSection:
    """`loss:` of the llm stage: which pairs, in which order, with which targets."""

    samples: list = field(default_factory=lambda: list(SAMPLE_KINDS))  # manifest lines used: caption, vqa
    generation_fraction: float = 0.5  # caption pairs put in [text, image] order (the rest [image, text])
    vqa_fraction: float = 1.0  # VQA lines used per epoch (drawn anew each epoch): the caption:VQA mix
    understanding_targets: str = "both"  # both | text | image: the targets of [image, text] sequences
    generation_targets: str = "both"  # the targets of [text, image] sequences
    mask_prompt: bool = True  # the VQA prompt "Question: {} Answer:" is input only
    text_weight: float = 1.0
    image_weight: float = 1.0
    drop_text: float = 0.0  # generation pairs whose text is dropped: the unconditional branch of guidance
    caption_suffix: str = "."  # appended to [image, text] captions (inference cuts at the first '.')
    answer_suffix: str = "."  # appended to answers (VQA decodes at least 2 tokens and cuts at '.')
    content_words: list = field(default_factory=list)  # their pieces' accuracy is logged as content_accuracy

    def check(self) -> None:
        bad = [k for k in self.samples if k not in SAMPLE_KINDS]
        if bad or not self.samples:
            raise LaVITError(f"loss.samples: choose among {', '.join(SAMPLE_KINDS)}, not {bad or 'none'}")
        for name in ("understanding_targets", "generation_targets"):
            if getattr(self, name) not in TARGETS:
                raise LaVITError(f"loss.{name} {getattr(self, name)!r}: choose from {', '.join(TARGETS)}")
        for name in ("generation_fraction", "vqa_fraction", "drop_text"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise LaVITError(f"loss.{name} {getattr(self, name)}: expected 0..1")
        if self.text_weight < 0 or self.image_weight < 0 or self.text_weight + self.image_weight == 0:
            raise LaVITError("loss.text_weight and loss.image_weight must be >= 0, not both 0")
        odd = [w for w in self.content_words if not isinstance(w, str) or not w.strip()]
        if odd:
            raise LaVITError(f"loss.content_words: expected a list of words, got {odd[0]!r} in it")


LLM_DEFAULTS = {"steps": 2000, "batch_size": 16, "learning_rate": 1e-3, "warmup_steps": 100,
                "min_learning_rate": 1e-5, "weight_decay": 0.01, "save_every": 500}

# ----------------------------------------------------------------------------- stage 3: pixel
PIXEL_DECODERS = {"highres": "highres_decoder", "lowres": "lowres_decoder"}
TRAIN_DECODER = ("heads", "all", "none")
PREDICTION_TYPES = ("epsilon", "v_prediction")


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
    """A random tokenizer that keeps every patch and a VQ decoder, standing in for stage 1's
    until `model.init` names its export (MLX only)."""

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
    """`model:` of the pixel stage."""

    init: str = ""  # folder with eva, tokenizer and the VQ decoder (stage 1's export); "": dev tokenizer (MLX)
    vae: str = ""  # the VAE stage's export (or any folder holding this pixel decoder's VAE)
    decoder: str = "highres"  # highres (SDXL-shaped) or lowres (SD-1.5-shaped)
    unet: dict = field(default_factory=dict)  # diffusers UNet config keys over UNET_DEFAULTS
    context_dims: List[int] = field(default_factory=list)  # new decoder heads of these widths ([]: keep init's)
    pooled_dim: int = 0  # with context_dims: the new attention pool's width (high-res)
    train_decoder: str = "heads"  # heads (unet_proj*, unet_attnpool), all, or none
    spatial_context: bool = False  # true (the context also as an input map) is MLX only
    max_images: int = 0  # distinct training pictures cached (0: all; MLX)
    scheduler: dict = field(default_factory=dict)  # overrides of the release's DDIM config
    defaults: dict = field(default_factory=lambda: {"steps": 20, "guidance": 3.0})  # inference defaults
    export_dtype: str = "float32"  # or float16 (the UNet and decoder weights)
    ema: EMASection = field(default_factory=EMASection)
    dev_tokenizer: DevTokenizer = field(default_factory=DevTokenizer)

    def check(self) -> None:
        if self.decoder not in PIXEL_DECODERS:
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
        if self.spatial_context:
            raise LaVITError("model.spatial_context true is MLX only (lavit train pixel)")


@dataclass
class PixelLoss:
    """`loss:` of the pixel stage."""

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


PIXEL_DEFAULTS = {"steps": 1000, "batch_size": 32, "learning_rate": 5e-4, "min_learning_rate": 2e-5,
                  "warmup_steps": 50, "weight_decay": 0.01, "save_every": 200, "log_every": 10}

SECTIONS = {
    "tokenizer": (TokenizerModel, TokenizerLoss, TOKENIZER_DEFAULTS),
    "llm": (LLMModelSection, LLMLossSection, LLM_DEFAULTS),
    "pixel": (PixelModel, PixelLoss, PIXEL_DEFAULTS),
}


def register() -> None:
    """Register these sections for every stage the MLX side has not registered itself."""
    for name, (model, loss, defaults) in SECTIONS.items():
        if name not in run_config._STAGE_SECTIONS:
            run_config.register_stage(name, model, loss, defaults)


def load_run_config(stage: Optional[str] = None, path=None, overrides=()) -> run_config.RunConfig:
    """`lavit_mlx.training.config.load_run_config` with the PyTorch trainers' stages known."""
    register()
    config = run_config.load_run_config(stage, path, list(overrides))
    if config.stage not in SECTIONS:
        raise LaVITError(f"the PyTorch trainers train {', '.join(SECTIONS)}; train the {config.stage!r} stage in MLX "
                         "(lavit train)")
    return config
