"""Configuration of every LaVIT component.

Pure Python (no mlx, no torch) so that the MLX package and the PyTorch mirror in
`lavit_train` share one definition. Sizes follow LAVIT_REFERENCE.md section 3;
`from_shapes` recovers them from a state dict's tensor shapes, which is how the
released checkpoint (which ships no config for its vision parts) is sized.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

# Values that tensor shapes cannot reveal; the release's.
RELEASE_VISION_HEADS = 16
RELEASE_VISION_WIDTH = 1408  # EVA-CLIP ViT-g/14, the merger and the VQ decoders of the release


def vision_heads_for(width: int, given: Optional[int]) -> Optional[int]:
    """The attention head count of a vision component read from a released-layout file.

    Shapes cannot reveal it. At the release's width (1408) the release's 16 heads are
    right; at any other width a guess would give silently wrong tokens, so it stays
    unknown (None) until given (`--vision-heads`); `check_heads` refuses to build with it.
    """
    if given is None:
        return RELEASE_VISION_HEADS if width == RELEASE_VISION_WIDTH else None
    return given


def check_heads(width: int, heads: Optional[int], what: str, source: str) -> int:
    """The head count a component is built with, or a one-line CheckpointError."""
    from .errors import CheckpointError

    if heads is None:
        raise CheckpointError(
            f"{source}: the {what} is {width} wide, not the release's {RELEASE_VISION_WIDTH}, so its attention "
            "head count is unknown (shapes cannot tell): pass --vision-heads N"
        )
    if heads <= 0 or width % heads:
        raise CheckpointError(
            f"vision heads {heads} does not divide the {what} width {width}; "
            "pass the head count the checkpoint was trained with (--vision-heads)"
        )
    return heads


def mlp_width(width: int) -> int:
    """MLP width of EVA, merger and VQ decoders: int(W * 4.3637) (6144 for 1408)."""
    return int(width * 4.3637)


class _Config:
    """from_dict / to_dict for nested dataclass configs; unknown keys are ignored."""

    @classmethod
    def from_dict(cls, params: Mapping[str, Any]):
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name not in params:
                continue
            value = params[f.name]
            sub = _NESTED.get((cls.__name__, f.name))
            if sub is not None and isinstance(value, Mapping):
                value = sub.from_dict(value)
            kwargs[f.name] = value
        return cls(**kwargs)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


def _count_blocks(keys: Sequence[str], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    ids = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
    return max(ids) + 1 if ids else 0


@dataclass
class EVAConfig(_Config):
    """EVA-CLIP ViT-g/14 vision tower (official `modeling_visual_encoder.py`)."""

    width: int = 1408
    depth: int = 40
    num_heads: Optional[int] = RELEASE_VISION_HEADS  # None: unknown (see vision_heads_for)
    mlp_dim: int = 6144
    patch_size: int = 14
    image_size: int = 224
    head_dim_out: int = 1024  # CLIP head Linear(width, 1024); unused by the tokenizer
    eps: float = 1e-6

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, tuple], num_heads: Optional[int], source: str = "EVA") -> "EVAConfig":
        width, _, patch, _ = shapes["patch_embed.proj.weight"]
        grid = math.isqrt(shapes["pos_embed"][1] - 1)
        return cls(
            width=width,
            depth=_count_blocks(list(shapes), "blocks."),
            num_heads=vision_heads_for(width, num_heads),
            mlp_dim=shapes["blocks.0.mlp.fc1.weight"][0],
            patch_size=patch,
            image_size=grid * patch,
            head_dim_out=shapes["head.weight"][0],
        )


@dataclass
class TokenizerConfig(_Config):
    """Token selector, token merger and quantizer (official `modeling_visual_tokenzier.py`)."""

    width: int = 1408
    merger_depth: int = 12
    num_heads: Optional[int] = RELEASE_VISION_HEADS
    mlp_dim: int = 6144
    codebook_size: int = 16384
    code_dim: int = 32
    eps: float = 1e-5
    # The deterministic selection keeps a patch when p(keep) > keep_threshold. 0.5 is the
    # release's rule (logp[keep] > logp[drop]); a trained model may store the threshold that
    # keeps its target fraction rho (the shapes build calibrates it: lavit_mlx/shapes/build.py).
    keep_threshold: float = 0.5

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, tuple], num_heads: Optional[int],
                    source: str = "tokenizer") -> "TokenizerConfig":
        # The understanding weights (visual_weight.bin) have no codebook: keep the default.
        codebook_size, code_dim = shapes.get("quantize.embedding.weight", (cls.codebook_size, cls.code_dim))
        width = shapes["token_predictor.in_conv.1.weight"][0]
        return cls(
            width=width,
            merger_depth=_count_blocks(list(shapes), "causal_encoder.blocks."),
            num_heads=vision_heads_for(width, num_heads),
            mlp_dim=shapes["causal_encoder.blocks.0.mlp.fc1.weight"][0],
            codebook_size=codebook_size,
            code_dim=code_dim,
        )


@dataclass
class VQDecoderConfig(_Config):
    """Low-res and high-res VQ decoders (official `modeling_decoder.py`)."""

    highres: bool = True
    width: int = 1408
    depth: int = 12
    num_heads: Optional[int] = RELEASE_VISION_HEADS
    mlp_dim: int = 6144
    code_dim: int = 32
    num_patches: int = 256
    feature_dim: int = 1408  # decode_task_layer output, fixed upstream
    context_dims: tuple = (768,)  # unet_proj (low-res) or unet_proj_1, unet_proj_2 (high-res)
    pooled_dim: int = 1280  # high-res attention pool output
    eps: float = 1e-5

    def __post_init__(self):
        self.context_dims = tuple(self.context_dims)  # a list after a JSON round trip

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, tuple], num_heads: Optional[int],
                    source: str = "VQ decoder") -> "VQDecoderConfig":
        highres = "unet_attnpool.c_proj.weight" in shapes
        width, code_dim = shapes["in_proj.weight"]
        num_heads = vision_heads_for(width, num_heads)
        if highres:
            context_dims = (shapes["unet_proj_1.weight"][0], shapes["unet_proj_2.weight"][0])
            pooled_dim = shapes["unet_attnpool.c_proj.weight"][0]
        else:
            context_dims, pooled_dim = (shapes["unet_proj.weight"][0],), 0
        return cls(
            highres=highres,
            width=width,
            depth=_count_blocks(list(shapes), "blocks."),
            num_heads=num_heads,
            mlp_dim=shapes["blocks.0.mlp.fc1.weight"][0],
            code_dim=code_dim,
            num_patches=shapes["pos_embed"][1],
            feature_dim=shapes["decode_task_layer.2.weight"][0],
            context_dims=tuple(context_dims),
            pooled_dim=pooled_dim,
        )


@dataclass
class TokenIds(_Config):
    """Special ids of the unified vocabulary (reference section 3, "LLM").

    The release uses a 32000-piece text vocabulary, then `[IMG]`, `[/IMG]` and the
    16384 visual codes. A model with its own text vocabulary keeps the same order.
    """

    unk: int = 0
    bos: int = 1
    eos: int = 2
    num_text: int = 32000
    codebook_size: int = 16384

    @property
    def image_start(self) -> int:  # [IMG]
        return self.num_text

    @property
    def image_end(self) -> int:  # [/IMG]
        return self.num_text + 1

    @property
    def visual_offset(self) -> int:
        return self.num_text + 2

    @property
    def vocab_size(self) -> int:
        return self.visual_offset + self.codebook_size

    @property
    def pad(self) -> int:  # the release pads with eos
        return self.eos

    @classmethod
    def for_vocab(cls, vocab_size: int, codebook_size: int = 16384, **kw) -> "TokenIds":
        num_text = vocab_size - 2 - codebook_size
        if num_text <= 3:
            raise ValueError(
                f"vocabulary of {vocab_size} is too small for {codebook_size} visual codes"
            )
        return cls(num_text=num_text, codebook_size=codebook_size, **kw)


@dataclass
class LLMConfig(_Config):
    """The unified LLM: a LLaMA as transformers' `LlamaConfig` (config.json) describes it.

    Defaults are transformers' where a config.json may omit a key (the release sets
    `rms_norm_eps` 1e-5 and has a separate `lm_head`). `extra` keeps every other key of
    the config.json, so `to_hf()` gives it back unchanged.
    """

    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: Optional[int] = None
    vocab_size: int = 48386
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    model_type: str = "llama"
    extra: dict = field(default_factory=dict)

    REQUIRED = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "vocab_size")

    @classmethod
    def from_hf(cls, config: Mapping[str, Any], source: str = "config.json") -> "LLMConfig":
        """From a transformers config.json dict; a missing size is a one-line CheckpointError."""
        from .errors import CheckpointError

        absent = [k for k in cls.REQUIRED if k not in config]
        if absent:
            raise CheckpointError(f"{source}: missing {', '.join(absent)}")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in config.items() if k in names and v is not None}
        extra = {k: v for k, v in config.items() if k not in names and k != "quantization"}
        return cls(**known, extra=extra)

    def to_hf(self) -> dict:
        """The transformers config.json dict."""
        out = dict(self.extra)
        out.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"})
        if out.get("num_key_value_heads") is None:
            out["num_key_value_heads"] = self.num_attention_heads
        return out


@dataclass
class PixelConfig(_Config):
    """One pixel decoder: its diffusers UNet, VAE and scheduler configs (as in their folders;
    `lavit_mlx.models.unet.UNetConfig` / `vae.VAEConfig` check and read them)."""

    unet: dict = field(default_factory=dict)
    vae: dict = field(default_factory=dict)
    scheduler: dict = field(default_factory=dict)
    # The model's own inference defaults, any of {"height", "width", "steps", "guidance"}
    # (written by the pixel stage; empty for the release, whose defaults are the pipeline's).
    defaults: dict = field(default_factory=dict)


@dataclass
class QuantizationConfig(_Config):
    """Per group of components, None or {"bits", "group_size"}: how the weights are stored."""

    llm: Optional[dict] = None
    vision: Optional[dict] = None
    unet: Optional[dict] = None


@dataclass
class LaVITConfig(_Config):
    """The composed model, the single source of truth for every size.

    A component's field is None when the checkpoint does not hold it. An MLX folder
    stores this as its config.json; for the released layout `lavit_mlx.loading` infers it
    once from tensor shapes (and the head count, which shapes cannot reveal).
    """

    vision: Optional[EVAConfig] = None
    tokenizer: Optional[TokenizerConfig] = None
    understanding_dim: Optional[int] = None  # vit_proj's output width (the LLM's hidden size)
    llm: Optional[LLMConfig] = None
    lowres_decoder: Optional[VQDecoderConfig] = None
    highres_decoder: Optional[VQDecoderConfig] = None
    highres_pixel: Optional[PixelConfig] = None
    lowres_pixel: Optional[PixelConfig] = None
    token_ids: TokenIds = field(default_factory=TokenIds)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)

    def component(self, name: str):
        """The config of a component by its checkpoint name ('eva', 'tokenizer', ...)."""
        return getattr(self, COMPONENT_FIELDS.get(name, name))


# Component names of the checkpoint layouts -> LaVITConfig fields (where they differ).
COMPONENT_FIELDS = {"eva": "vision", "understanding": "tokenizer"}

_NESTED = {
    ("LaVITConfig", "vision"): EVAConfig,
    ("LaVITConfig", "tokenizer"): TokenizerConfig,
    ("LaVITConfig", "llm"): LLMConfig,
    ("LaVITConfig", "lowres_decoder"): VQDecoderConfig,
    ("LaVITConfig", "highres_decoder"): VQDecoderConfig,
    ("LaVITConfig", "highres_pixel"): PixelConfig,
    ("LaVITConfig", "lowres_pixel"): PixelConfig,
    ("LaVITConfig", "token_ids"): TokenIds,
    ("LaVITConfig", "quantization"): QuantizationConfig,
}
