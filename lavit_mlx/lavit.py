"""LaVIT: the model object, an `nn.Module` whose children are the built components.

`lavit_mlx.load(path)` returns one. Components are built from the nested config on
first use (under a lock, so a server's threads can share one model) or up front with
`load(path, components=[...])`; text-to-image never builds EVA and tokenizing never
builds the LLM. Because the components are children, `model.parameters()`,
`freeze()`, LoRA wrapping, `value_and_grad` and saving see the whole tree.

The image side has two levels:
- `encode`, `tokenizer_forward`, `embed_images`: differentiable forwards on arrays (no
  host synchronisation), for training and for callers that batch themselves;
- `tokenize`, `tokenize_pixels`: host-side wrappers that return ids per image.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .checkpoint import Checkpoint
from .config import LaVITConfig, TokenIds
from .errors import LaVITError
from .image_processing import ImageInput, load_or_error, preprocess, source_name
from .loading import COMPONENTS, PIXEL, VISION, load_codebook, load_llm, load_pixel_decoder, load_vision
from .seeding import check_seed, key, resolve_seed


@dataclass
class ImageTokens:
    """The discrete tokens of one image."""

    codes: np.ndarray  # (T,) visual codes in raster order of the kept patches
    keep_mask: np.ndarray  # (num_patches,) bool
    source: Optional[str] = None
    error: Optional[str] = None  # why this image could not be tokenized (with skip_bad)

    @property
    def num_tokens(self) -> int:
        return int(self.codes.shape[0])

    def llm_ids(self, token_ids: TokenIds, special: bool = True) -> List[int]:
        """LLM ids: `[IMG]`, visual ids (offset + code), `[/IMG]` (the last two optional)."""
        ids = (self.codes + token_ids.visual_offset).tolist()
        return [token_ids.image_start, *ids, token_ids.image_end] if special else ids


class LaVIT(nn.Module):
    """A LaVIT checkpoint's components, built from `config` as they are needed.

    Use `lavit_mlx.load(path)` to create one.
    """

    def __init__(self, config: LaVITConfig, checkpoint: Checkpoint, quantize: Optional[int] = None,
                 group_size: int = 64, vision_heads: Optional[int] = None, adapter=None):
        super().__init__()
        self.config = config
        self.checkpoint = checkpoint
        self.quantize = quantize  # LLM bits applied at load time (4 or 8), None for none
        self.group_size = group_size
        self.vision_heads = vision_heads  # as given by the user (None: stored or the release's rule)
        self.adapter = adapter  # a LoRA adapter folder applied to the LLM (and understanding) as they load
        self._lock = threading.RLock()
        self._text_tokenizer = None

    # ----------------------------------------------------------------- components
    def component(self, name: str) -> nn.Module:
        """The built component `name` (one of `loading.COMPONENTS`), building it once."""
        if name in self:
            return self[name]
        if name not in COMPONENTS:
            raise LaVITError(f"unknown component {name!r}; choose from {', '.join(COMPONENTS)}")
        with self._lock:
            if name not in self:
                self[name] = self._build(name)
        return self[name]

    def _build(self, name: str):
        if name in VISION:
            module = load_vision(self.checkpoint, name, self.config)
            if name == "understanding" and self.adapter is not None:
                from .training.lora import load_understanding_adapter

                load_understanding_adapter(module, self.adapter)
            return module
        if name == "llm":
            lm = load_llm(self.checkpoint, self.config, self.quantize, self.group_size)
            if self.adapter is not None:
                from .training.lora import load_llm_adapter

                load_llm_adapter(lm, self.adapter)
            return lm
        if name in PIXEL:
            return load_pixel_decoder(self.checkpoint, name, self.config)
        raise LaVITError(f"unknown component {name!r}")

    def unload(self, *names: str) -> None:
        """Free components (all when no name is given). Their cached conv kernels
        (`diffusion_blocks.DerivedWeights`) are dropped too, even where a caller still
        holds the component."""
        from .models.diffusion_blocks import release_derived_weights

        with self._lock:
            for name in names or list(self.loaded):
                if name in self:
                    release_derived_weights(self[name])
                    del self[name]
        mx.clear_cache()

    @property
    def loaded(self) -> List[str]:
        return [k for k in self if k in COMPONENTS or k == "codebook"]

    @property
    def token_ids(self) -> TokenIds:
        return self.config.token_ids

    @property
    def eva(self):
        return self.component("eva")

    @property
    def tokenizer(self):
        """Selector, merger and quantizer of `tokenizer_encoder.bin` (discrete tokens)."""
        return self.component("tokenizer")

    @property
    def understanding(self):
        """Selector, merger and `vit_proj` for understanding: the tokenizer's weights with
        `visual_weight.bin` loaded over them, as the official `build_dynamic_tokenizer`."""
        return self.component("understanding")

    @property
    def llm(self):
        """The LLaMA (`models.llm.LanguageModel`), quantized at load when `quantize` is set."""
        return self.component("llm")

    @property
    def text_tokenizer(self):
        """The sentencepiece text tokenizer of `language_model/` (no special tokens added)."""
        from .models.llm import TextTokenizer

        with self._lock:
            if self._text_tokenizer is None:
                self._text_tokenizer = TextTokenizer.from_folder(self.checkpoint.folder("llm"), self.token_ids)
        return self._text_tokenizer

    @property
    def codebook(self) -> mx.array:
        """The quantizer's codebook (codebook_size, code_dim), without building the tokenizer."""
        if "tokenizer" in self:
            return self["tokenizer"].quantize.embedding.weight
        with self._lock:
            if "codebook" not in self:
                self["codebook"] = load_codebook(self.checkpoint)
        return self["codebook"]

    def decoder(self, highres: bool = True):
        """The high-res (default) or low-res VQ decoder."""
        return self.component("highres_decoder" if highres else "lowres_decoder")

    def pixel_decoder(self, highres: bool = True):
        """The high-res (SDXL-shaped, default) or low-res (SD-1.5-shaped) pixel decoder."""
        return self.component("highres_pixel" if highres else "lowres_pixel")

    # ----------------------------------------------------------------- differentiable forwards
    def encode(self, pixel_values) -> mx.array:
        """EVA features (B, 1 + patches, width) of processed images (B, 3, H, W)."""
        size = self.config.vision.image_size if self.config.vision else 224
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (3, size, size):
            raise LaVITError(f"pixel values must be (B, 3, {size}, {size}), got {tuple(pixel_values.shape)}")
        pixels = pixel_values if isinstance(pixel_values, mx.array) else mx.array(np.asarray(pixel_values))
        return self.eva(pixels)

    def tokenizer_forward(self, pixel_values, understanding: bool = False, **options):
        """EVA, then the tokenizer's differentiable forward (`TokenizerForward`, every
        position); options as `DynamicVisualTokenizer.__call__` (keep, sample, key, noise, tau)."""
        features = self.encode(pixel_values)[:, 1:]
        return (self.understanding if understanding else self.tokenizer)(features, **options)

    def decode_codes(self, codes: Sequence[np.ndarray], highres: bool = True):
        """Visual codes of each image -> UNet conditioning.

        Returns:
            high-res: (prompt_embeds (B, 256, 2048), pooled (B, 1280)); low-res: (B, 256, 768).
        """
        from .errors import CheckpointError

        codebook = self.codebook
        decoder = self.decoder(highres)
        if codebook.shape[1] != decoder.config.code_dim:
            raise CheckpointError(
                f"codebook vectors have {codebook.shape[1]} dims but the VQ decoder expects "
                f"{decoder.config.code_dim}: the tokenizer and decoder files do not belong together"
            )
        rows = []
        for image_codes in codes:
            ids = np.asarray(image_codes, dtype=np.int64)
            if ids.size and (ids.min() < 0 or ids.max() >= codebook.shape[0]):
                raise LaVITError(f"visual code out of range 0..{codebook.shape[0] - 1}")
            rows.append(codebook[mx.array(ids.astype(np.int32))])
        try:
            return decoder(rows)
        except ValueError as exc:
            raise LaVITError(str(exc)) from None

    def understanding_rows(self, visual_embeds: Sequence[mx.array], prompts: Sequence[Sequence[int]]) -> List[mx.array]:
        """Per image: [IMG], its continuous visual embeddings, [/IMG], then the prompt's token
        embeddings (reference section 4, "Caption"), as (T_i, hidden) LLM input rows."""
        ids = self.token_ids
        lm = self.llm
        special = lm.embed(mx.array([ids.image_start, ids.image_end]))  # (2, hidden)
        rows = []
        for visual, prompt in zip(visual_embeds, prompts):
            parts = [special[:1], visual.astype(special.dtype), special[1:]]
            if len(prompt):
                parts.append(lm.embed(mx.array(list(prompt))))
            rows.append(mx.concatenate(parts))
        return rows

    # ----------------------------------------------------------------- host-side tokens
    def tokenize_pixels(self, pixel_values, sample: bool = False, seed=None, understanding: bool = False):
        """Run EVA and the tokenizer (or the understanding path) on processed images and
        return per-image tokens (`TokenizerOutput`).

        With `sample`, image i of the batch draws its keep mask with the key of `seed + i`,
        or of `seed[i]` when `seed` is a list (so results do not depend on the batching).
        """
        features = self.encode(pixel_values)[:, 1:]
        tokenizer = self.understanding if understanding else self.tokenizer
        keep = None
        if sample:
            if isinstance(seed, (list, tuple)):
                seeds = [check_seed(s) for s in seed]
            else:
                base = resolve_seed(seed)
                seeds = [base + i for i in range(features.shape[0])]
            logprobs = tokenizer.token_predictor(features)
            keep = mx.concatenate([tokenizer.select(logprobs[i:i + 1], sample=True, key=key(s))
                                   for i, s in enumerate(seeds)])
        return tokenizer.tokenize(features, keep=keep)

    def tokenize(
        self,
        images: Sequence[ImageInput],
        sample: bool = False,
        seed: Optional[int] = None,
        batch_size: int = 8,
        progress: Optional[Callable[[int], None]] = None,
        skip_bad: bool = False,
    ) -> List[ImageTokens]:
        """Turn images into LaVIT's dynamic discrete visual tokens.

        Args:
            images: paths or PIL images, any size/mode (see `image_processing.load_image`).
            sample: draw the token selection with seeded Gumbel noise (the official
                inference samples); default keeps the patches whose keep
                log-probability is higher (deterministic).
            seed: seed for `sample`; image i (0-based, in the order given) uses
                `seed + i`, so results do not depend on the batch size.
            batch_size: images per forward pass.
            progress: called with the number of images done after each batch.
            skip_bad: an image that cannot be read gives an `ImageTokens` with `error`
                set (and no codes) instead of raising, and the others are tokenized.

        Returns:
            One `ImageTokens` per image, in order.
        """
        images = list(images)
        size = self.config.vision.image_size if self.config.vision else 224
        if sample:
            seed = resolve_seed(seed)
        results: List[ImageTokens] = []
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            loaded = [load_or_error(image, skip_bad) for image in chunk]
            good = [i for i, (picture, _) in enumerate(loaded) if picture is not None]
            out, keep, row = None, None, {i: r for r, i in enumerate(good)}
            if good:
                pixels = preprocess([loaded[i][0] for i in good], size)
                seeds = [seed + start + i for i in good] if sample else None
                out = self.tokenize_pixels(pixels, sample=sample, seed=seeds)
                keep = np.array(out.keep_mask) > 0.5
            for i, image in enumerate(chunk):
                if i in row:
                    results.append(ImageTokens(out.codes[row[i]], keep[row[i]], source_name(image)))
                else:
                    results.append(ImageTokens(np.zeros((0,), np.int64), np.zeros((0,), bool), source_name(image),
                                               error=loaded[i][1]))
            if progress:
                progress(len(chunk))
        return results

    def describe(self) -> dict:
        """What the checkpoint holds (`lavit info --model`); see `info.describe`."""
        from .info import describe

        return describe(self)


def load(path=None, components: Optional[Sequence[str]] = None, vision_heads: Optional[int] = None,
         quantize: Optional[int] = None, group_size: int = 64, adapter=None) -> LaVIT:
    """Open a LaVIT checkpoint folder (see `loading.load`); no path: the bundled model."""
    from .loading import load as _load

    if path is None:
        from .zoo import bundled_model

        path = bundled_model()

    return _load(path, components=components, vision_heads=vision_heads, quantize=quantize, group_size=group_size,
                 adapter=adapter)
