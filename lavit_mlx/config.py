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


def vision_heads_for(width: int, given: Optional[int], what: str, source: str) -> int:
    """The attention head count of a vision component read from a released-layout file.

    Shapes cannot reveal it. At the release's width (1408) the release's 16 heads are
    right; at any other width a guess would give silently wrong tokens, so the count must
    be given (`--vision-heads`). A given count must divide the width.
    """
    from .errors import CheckpointError

    if given is None:
        if width != RELEASE_VISION_WIDTH:
            raise CheckpointError(
                f"{source}: the {what} is {width} wide, not the release's {RELEASE_VISION_WIDTH}, so its attention "
                "head count is unknown (shapes cannot tell): pass --vision-heads N"
            )
        return RELEASE_VISION_HEADS
    if given <= 0 or width % given:
        raise CheckpointError(
            f"vision heads {given} does not divide the {what} width {width}; "
            "pass the head count the checkpoint was trained with (--vision-heads)"
        )
    return given


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


def _count_blocks(keys: Sequence[str], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    ids = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
    return max(ids) + 1 if ids else 0


@dataclass
class EVAConfig(_Config):
    """EVA-CLIP ViT-g/14 vision tower (official `modeling_visual_encoder.py`)."""

    width: int = 1408
    depth: int = 40
    num_heads: int = RELEASE_VISION_HEADS
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
            num_heads=vision_heads_for(width, num_heads, "EVA vision transformer", source),
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
    num_heads: int = RELEASE_VISION_HEADS
    mlp_dim: int = 6144
    codebook_size: int = 16384
    code_dim: int = 32
    eps: float = 1e-5

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, tuple], num_heads: Optional[int],
                    source: str = "tokenizer") -> "TokenizerConfig":
        # The understanding weights (visual_weight.bin) have no codebook: keep the default.
        codebook_size, code_dim = shapes.get("quantize.embedding.weight", (cls.codebook_size, cls.code_dim))
        width = shapes["token_predictor.in_conv.1.weight"][0]
        return cls(
            width=width,
            merger_depth=_count_blocks(list(shapes), "causal_encoder.blocks."),
            num_heads=vision_heads_for(width, num_heads, "token merger", source),
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
    num_heads: int = RELEASE_VISION_HEADS
    mlp_dim: int = 6144
    code_dim: int = 32
    num_patches: int = 256
    feature_dim: int = 1408  # decode_task_layer output, fixed upstream
    context_dims: tuple = (768,)  # unet_proj (low-res) or unet_proj_1, unet_proj_2 (high-res)
    pooled_dim: int = 1280  # high-res attention pool output
    eps: float = 1e-5

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, tuple], num_heads: Optional[int],
                    source: str = "VQ decoder") -> "VQDecoderConfig":
        highres = "unet_attnpool.c_proj.weight" in shapes
        width, code_dim = shapes["in_proj.weight"]
        num_heads = vision_heads_for(width, num_heads, "VQ decoder", source)
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
class LaVITConfig(_Config):
    """The composed model. Components are None until known (read or loaded)."""

    vision_heads: Optional[int] = None  # None: the release's rule (16 at width 1408, else required)
    eva: EVAConfig | None = None
    tokenizer: TokenizerConfig | None = None
    llm_hidden: int = 4096  # vit_proj output width
    lowres_decoder: VQDecoderConfig | None = None
    highres_decoder: VQDecoderConfig | None = None
    token_ids: TokenIds = field(default_factory=TokenIds)
    llm: dict | None = None  # transformers-style LLaMA config.json


_NESTED = {
    ("LaVITConfig", "eva"): EVAConfig,
    ("LaVITConfig", "tokenizer"): TokenizerConfig,
    ("LaVITConfig", "lowres_decoder"): VQDecoderConfig,
    ("LaVITConfig", "highres_decoder"): VQDecoderConfig,
    ("LaVITConfig", "token_ids"): TokenIds,
}
