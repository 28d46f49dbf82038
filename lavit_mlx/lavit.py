"""LaVIT composed from its components, each loaded from the checkpoint when first needed.

`load(path)` opens a checkpoint folder; nothing heavy is read until a component is used,
so text-to-image never loads EVA and tokenizing never loads the LLM. Components are
built at the sizes their tensors reveal; head counts (which shapes cannot reveal) come
from `vision_heads` (16 in the release).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from .checkpoint import Checkpoint
from .config import (
    RELEASE_VISION_HEADS,
    RELEASE_VISION_WIDTH,
    EVAConfig,
    LaVITConfig,
    TokenIds,
    TokenizerConfig,
    VQDecoderConfig,
)
from .errors import CheckpointError, LaVITError
from .seeding import check_seed, key, resolve_seed
from .image_processing import ImageInput, load_or_error, preprocess, source_name
from .models.eva_vit import EVAVisionTransformer
from .models.visual_tokenizer import DynamicVisualTokenizer, TokenizerOutput
from .models.vq_decoder import VQDecoder
from .weights import load_strict, read_json, shapes


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


def _check_heads(width: int, heads: int, what: str) -> None:
    if heads <= 0 or width % heads:
        raise CheckpointError(
            f"vision heads {heads} does not divide the {what} width {width}; "
            "pass the head count the checkpoint was trained with (--vision-heads)"
        )


class LaVIT:
    """A LaVIT checkpoint with lazily loaded components.

    Use `lavit_mlx.load(path)` to create one.
    """

    def __init__(self, checkpoint: Checkpoint, vision_heads: Optional[int] = None,
                 quantize: Optional[int] = None, group_size: int = 64):
        self.checkpoint = checkpoint
        self.config = LaVITConfig(vision_heads=vision_heads)
        self.quantize = quantize  # LLM bits applied at load time (4 or 8), None for none
        self.group_size = group_size
        self._components: dict = {}
        llm_config = checkpoint.path / "language_model" / "config.json"
        if llm_config.is_file():
            self.config.llm = read_json(llm_config)
            self.config.llm_hidden = int(self.config.llm.get("hidden_size", self.config.llm_hidden))

    # ----------------------------------------------------------------- components
    def _get(self, name: str, build: Callable):
        if name not in self._components:
            self._components[name] = build()
        return self._components[name]

    def unload(self, *names: str) -> None:
        """Free components (all when no name is given)."""
        for name in names or list(self._components):
            self._components.pop(name, None)
        mx.clear_cache()

    @property
    def loaded(self) -> List[str]:
        return list(self._components)

    @property
    def token_ids(self) -> TokenIds:
        codebook = self.config.tokenizer.codebook_size if self.config.tokenizer else 16384
        if self.config.llm and "vocab_size" in self.config.llm:
            return TokenIds.for_vocab(int(self.config.llm["vocab_size"]), codebook)
        return TokenIds(codebook_size=codebook)

    def _component_config(self, component: str, cls, weights):
        """A component's config: stored in an MLX folder, inferred from shapes otherwise."""
        stored = self.checkpoint.config.get(component)
        if stored is not None:
            config = cls.from_dict(stored)
        else:
            try:
                config = cls.from_shapes(shapes(weights), self.config.vision_heads,
                                         str(self.checkpoint.file(component)))
            except KeyError as exc:
                raise CheckpointError(f"{self.checkpoint.file(component)}: missing key {exc}") from None
        return config

    def _load_module(self, component: str, model, weights, known_extra=None):
        """Quantize as stored (MLX folders), then load strictly."""
        quantization = self.checkpoint.quantization(component)
        if quantization:
            nn.quantize(
                model, group_size=quantization["group_size"], bits=quantization["bits"],
                class_predicate=lambda path, module: f"{path}.scales" in weights,
            )
        return load_strict(model, weights, str(self.checkpoint.file(component)), known_extra=known_extra)

    @property
    def eva(self) -> EVAVisionTransformer:
        def build():
            weights = self.checkpoint.weights("eva")
            if self.checkpoint.torch_layout:
                weights = EVAVisionTransformer.sanitize(weights)
            config = self._component_config("eva", EVAConfig, weights)
            _check_heads(config.width, config.num_heads, "EVA")
            self.config.eva = config
            return self._load_module("eva", EVAVisionTransformer(config), weights)

        return self._get("eva", build)

    def _tokenizer_config(self, weights) -> TokenizerConfig:
        config = self._component_config("tokenizer", TokenizerConfig, weights)
        _check_heads(config.width, config.num_heads, "token merger")
        self.config.tokenizer = config
        return config

    @property
    def tokenizer(self) -> DynamicVisualTokenizer:
        """Selector, merger and quantizer of `tokenizer_encoder.bin` (discrete tokens)."""

        def build():
            weights = self.checkpoint.weights("tokenizer")
            model = DynamicVisualTokenizer(self._tokenizer_config(weights), quantizer=True)
            return self._load_module("tokenizer", model, weights, self.checkpoint.known_extra("tokenizer"))

        return self._get("tokenizer", build)

    @property
    def understanding(self) -> DynamicVisualTokenizer:
        """Selector, merger and `vit_proj` for understanding: the tokenizer's weights with
        `visual_weight.bin` loaded over them, as the official `build_dynamic_tokenizer`."""

        def build():
            weights = self.checkpoint.understanding_weights()
            if self.checkpoint.config.get("tokenizer") is not None:
                config = TokenizerConfig.from_dict(self.checkpoint.config["tokenizer"])
            else:
                config = TokenizerConfig.from_shapes(shapes(weights), self.config.vision_heads,
                                                     str(self.checkpoint.file("understanding")))
            _check_heads(config.width, config.num_heads, "token merger")
            model = DynamicVisualTokenizer(config, quantizer=False, llm_hidden=self.config.llm_hidden)
            return self._load_module("understanding", model, weights)

        return self._get("understanding", build)

    @property
    def large_model_dtype(self) -> Optional[mx.Dtype]:
        """Compute dtype of the LLM and the UNets: float32 on the CPU (MLX's half-precision
        CPU kernels are slow), the stored dtype (float16/bfloat16) on a GPU."""
        return mx.float32 if mx.default_device() == mx.cpu else None

    # ----------------------------------------------------------------- language model
    @property
    def llm(self):
        """The LLaMA (`models.llm.LanguageModel`), quantized at load when `quantize` is set."""
        from .models.llm import load_language_model, load_mlx_language_model

        def build():
            folder = self.checkpoint.folder("llm")
            if self.checkpoint.kind == "mlx":
                return load_mlx_language_model(folder, dtype=self.large_model_dtype, quantize=self.quantize,
                                               group_size=self.group_size, token_ids=self.token_ids)
            return load_language_model(folder, dtype=self.large_model_dtype, quantize=self.quantize,
                                       group_size=self.group_size, token_ids=self.token_ids)

        return self._get("llm", build)

    @property
    def text_tokenizer(self):
        """The sentencepiece text tokenizer of `language_model/` (no special tokens added)."""
        from .models.llm import TextTokenizer

        return self._get("text_tokenizer", lambda: TextTokenizer.from_folder(
            self.checkpoint.folder("llm"), self.token_ids))

    def llm_logits(self, input_ids=None, inputs_embeds=None) -> mx.array:
        """Logits (B, T, vocab) of unpadded id or embedding sequences (no cache)."""
        if input_ids is not None:
            return self.llm(input_ids=mx.array(np.asarray(input_ids)))
        return self.llm(inputs_embeds=mx.array(inputs_embeds) if not isinstance(inputs_embeds, mx.array) else inputs_embeds)

    def understanding_input_embeds(self, visual_embeds: Sequence[mx.array], prompt_ids: Sequence[int] = ()) -> mx.array:
        """[IMG], the image's continuous visual embeddings, [/IMG], then the prompt's token
        embeddings (reference section 4, "Caption"), for each image: (B, T, hidden) if the
        rows have equal lengths, else a list of (T_i, hidden)."""
        rows = self.understanding_rows(visual_embeds, [list(prompt_ids)] * len(visual_embeds))
        lengths = {int(r.shape[0]) for r in rows}
        return mx.stack(rows) if len(lengths) == 1 else rows

    def understanding_rows(self, visual_embeds: Sequence[mx.array], prompts: Sequence[Sequence[int]]) -> List[mx.array]:
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

    def describe(self) -> dict:
        """What the checkpoint holds, for `lavit info --model`."""
        from .checkpoint import PURPOSE

        info = {"checkpoint": self.checkpoint.describe()}
        present = [name for name in PURPOSE if self.checkpoint.has(name)]
        absent = [name for name in PURPOSE if name not in present]
        info["components"] = ", ".join(present) or "none"
        if absent:
            info["missing"] = ", ".join(absent)
        if self.config.llm:
            llm = self.config.llm
            info["llm"] = (
                f"llama, hidden {llm.get('hidden_size')}, {llm.get('num_hidden_layers')} layers, "
                f"vocab {llm.get('vocab_size')}"
            )
            info["llm memory"] = self._llm_memory_line()
        ids = self.token_ids
        info["token ids"] = (
            f"[IMG]={ids.image_start} [/IMG]={ids.image_end} visual={ids.visual_offset}.."
            f"{ids.vocab_size - 1}"
        )
        info["vision heads"] = self._vision_heads_line()
        return info

    def _vision_heads_line(self) -> str:
        if self.checkpoint.config.get("vision_heads") is not None:
            return f"{self.checkpoint.config['vision_heads']} (stored in the MLX folder)"
        if self.config.vision_heads is not None:
            return f"{self.config.vision_heads} (given)"
        for component in ("eva", "tokenizer", "highres_decoder", "lowres_decoder"):
            if self.checkpoint.has(component):
                weights_shapes = self.checkpoint.shapes(component)
                key = "patch_embed.proj.weight" if component == "eva" else (
                    "token_predictor.in_conv.1.weight" if component == "tokenizer" else "in_proj.weight")
                width = weights_shapes[key][0]
                if width == RELEASE_VISION_WIDTH:
                    return f"{RELEASE_VISION_HEADS} (the release's, for its width {width})"
                return f"unknown: the width {width} is not the release's, pass --vision-heads"
        return "not needed (no vision component)"

    def _llm_memory_line(self) -> str:
        """LLM weight memory at each precision (counted on the unmaterialised model)."""
        from .models.llm import llama_args
        from mlx_lm.models.llama import Model as LlamaModel

        try:
            model = LlamaModel(llama_args({k: v for k, v in self.config.llm.items() if k != "quantization"}))
        except (CheckpointError, TypeError, ValueError) as exc:
            return f"unknown ({exc})"
        float_bytes = sum(v.size for _, v in tree_flatten(model.parameters()))
        parts = [f"float32 {4 * float_bytes / 2**30:.2f} GiB", f"float16 {2 * float_bytes / 2**30:.2f} GiB"]
        for bits in (8, 4):
            total = 0
            for _, layer in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module):
                for name, value in tree_flatten(layer.parameters()):
                    quantizable = hasattr(layer, "to_quantized") and name == "weight" and value.shape[-1] % self.group_size == 0
                    # packed weights + a float16 scale and bias per group
                    total += value.size * bits / 8 + value.size / self.group_size * 4 if quantizable else value.size * 2
            parts.append(f"{bits}-bit {total / 2**30:.2f} GiB")
        return ", ".join(parts)

    @property
    def codebook(self) -> mx.array:
        """The quantizer's codebook (codebook_size, code_dim), without loading the tokenizer."""

        def build():
            if "tokenizer" in self._components:
                return self.tokenizer.quantize.embedding.weight
            key = "quantize.embedding.weight"
            component = "codebook" if self.checkpoint.kind == "mlx" else "tokenizer"
            weights = self.checkpoint.weights(component, keys={key})
            if key not in weights:
                raise CheckpointError(f"{self.checkpoint.file(component)}: missing key {key!r}")
            return weights[key].astype(mx.float32)

        return self._get("codebook", build)

    def decoder(self, highres: bool = True) -> VQDecoder:
        """The high-res (default) or low-res VQ decoder."""
        name = "highres_decoder" if highres else "lowres_decoder"

        def build():
            weights = self.checkpoint.weights(name)
            config = self._component_config(name, VQDecoderConfig, weights)
            _check_heads(config.width, config.num_heads, "VQ decoder")
            if config.highres:
                _check_heads(config.feature_dim, config.num_heads, "VQ decoder pooling")
            setattr(self.config, name, config)
            return self._load_module(name, VQDecoder(config), weights)

        return self._get(name, build)

    def decode_codes(self, codes: Sequence[np.ndarray], highres: bool = True):
        """Visual codes of each image -> UNet conditioning.

        Returns:
            high-res: (prompt_embeds (B, 256, 2048), pooled (B, 1280)); low-res: (B, 256, 768).
        """
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

    def _diffusers_model(self, component: str, sub: str):
        """The UNet or VAE of a pixel-decoding folder (diffusers layout, or MLX layout in an MLX folder)."""
        from .layout import MLX_FORMAT
        from .models.diffusion_blocks import DIFFUSERS_STEM, load_diffusers_model
        from .models.unet import UNet2DConditionModel, UNetConfig
        from .models.vae import AutoencoderKL, VAEConfig

        model_cls, config_cls = (UNet2DConditionModel, UNetConfig) if sub == "unet" else (AutoencoderKL, VAEConfig)
        mlx_folder = self.checkpoint.kind == "mlx"
        return load_diffusers_model(
            self.checkpoint.folder(component) / sub, model_cls, config_cls, sub.upper(),
            # the VAE decodes in float32 (it overflows in float16, as the release notes)
            dtype=mx.float32 if sub == "vae" else self.large_model_dtype,
            source_layout="mlx" if mlx_folder else "torch",
            stem=MLX_FORMAT["pixel_weights"] if mlx_folder else DIFFUSERS_STEM,
            quantization=self.checkpoint.quantization(component),
        )

    def pixel_decoder(self, highres: bool = True):
        """The high-res (SDXL-shaped, default) or low-res (SD-1.5-shaped) pixel decoder."""
        from .pixel_decoder import PixelDecoder
        from .weights import read_tensor

        component = "highres_pixel" if highres else "lowres_pixel"

        def build():
            folder = self.checkpoint.folder(component)
            config_path = folder / "scheduler" / "scheduler_config.json"
            if not config_path.is_file():
                raise CheckpointError(f"checkpoint {self.checkpoint.path} is missing {config_path.relative_to(self.checkpoint.path)}")
            scheduler_config = read_json(config_path)
            uncond = None
            if not highres:
                name = "uncond_embeddings.safetensors" if self.checkpoint.kind == "mlx" else "uncond_embeddings.bin"
                uncond = read_tensor(folder / name).astype(mx.float32)
            return PixelDecoder(self._diffusers_model(component, "unet"), self._diffusers_model(component, "vae"),
                                scheduler_config, highres, uncond)

        return self._get(component, build)

    def decoder_config(self, highres: bool = True) -> VQDecoderConfig:
        """Sizes of a VQ decoder (without building it)."""
        name = "highres_decoder" if highres else "lowres_decoder"
        return self._component_config(name, VQDecoderConfig, self.checkpoint.weights(name))

    def stored_dtype(self, component: str) -> str:
        """The floating dtype a component's weights are stored in ('float16', 'bfloat16', ...)."""
        weights = self.checkpoint.weights(component)
        dtypes = {str(v.dtype).replace("mlx.core.", "") for v in weights.values()}
        return dtypes.pop() if len(dtypes) == 1 else "mixed: " + ", ".join(sorted(dtypes))

    # ----------------------------------------------------------------- tokenizer
    def encode(self, pixel_values: np.ndarray) -> mx.array:
        """EVA features (B, 1 + patches, width) of processed images (B, 3, H, W)."""
        size = self.eva.config.image_size
        if pixel_values.ndim != 4 or pixel_values.shape[1:] != (3, size, size):
            raise LaVITError(
                f"pixel values must be (B, 3, {size}, {size}), got {tuple(pixel_values.shape)}"
            )
        return self.eva(mx.array(pixel_values))

    def tokenize_pixels(
        self,
        pixel_values: np.ndarray,
        sample: bool = False,
        seed=None,
        understanding: bool = False,
    ) -> TokenizerOutput:
        """Run EVA and the tokenizer (or the understanding path) on processed images.

        With `sample`, image i of the batch draws its keep mask with the key of `seed + i`,
        or of `seed[i]` when `seed` is a list.
        """
        features = self.encode(pixel_values)[:, 1:]
        tokenizer = self.understanding if understanding else self.tokenizer
        keep = None
        if sample:
            logprobs = tokenizer.token_predictor(features)
            if isinstance(seed, (list, tuple)):
                seeds = [check_seed(s) for s in seed]
            else:
                base = resolve_seed(seed)
                seeds = [base + i for i in range(len(pixel_values))]
            keep = mx.concatenate(
                [tokenizer.select(logprobs[i : i + 1], sample=True, key=key(s)) for i, s in enumerate(seeds)]
            )
        return tokenizer(features, keep_mask=keep)

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
        size = self.eva.config.image_size
        results: List[ImageTokens] = []
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            loaded = [load_or_error(image, skip_bad) for image in chunk]
            good = [i for i, (picture, _) in enumerate(loaded) if picture is not None]
            out = None
            if good:
                pixels = preprocess([loaded[i][0] for i in good], size)
                # image j of the whole call samples with seed + j, whatever the batching
                seeds = None if seed is None else [seed + start + i for i in good]
                out = self.tokenize_pixels(pixels, sample=sample, seed=seeds)
                keep = np.array(out.keep_mask) > 0.5
            row = {i: r for r, i in enumerate(good)}
            for i, image in enumerate(chunk):
                if i in row:
                    results.append(ImageTokens(out.codes[row[i]], keep[row[i]], source_name(image)))
                else:
                    results.append(ImageTokens(np.zeros((0,), np.int64), np.zeros((0,), bool), source_name(image),
                                               error=loaded[i][1]))
            if progress:
                progress(len(chunk))
        return results


def load(path, vision_heads: Optional[int] = None, quantize: Optional[int] = None, group_size: int = 64) -> LaVIT:
    """Open a LaVIT checkpoint folder.

    Args:
        path: a folder in the released layout (rain1011/LaVIT-7B-v2) or the MLX
            folder format written by `lavit convert`.
        vision_heads: attention heads of the ViT, merger and VQ decoders (16 in the
            release; tensor shapes cannot reveal it).
        quantize: quantize the LLM to 4 or 8 bits when it loads (group size
            `group_size`; embeddings and lm_head too).

    Returns:
        A `LaVIT` whose components load on first use.

    Raises:
        CheckpointError: the folder is missing or is not a LaVIT checkpoint.
    """
    checkpoint = Checkpoint.open(path)
    stored = checkpoint.config.get("vision_heads")
    if stored is not None and vision_heads is not None and vision_heads != stored:
        raise CheckpointError(
            f"{checkpoint.path} was converted with vision heads {stored}; --vision-heads {vision_heads} contradicts it"
        )
    if quantize not in (None, 4, 8):
        raise LaVITError(f"--quantize {quantize}: expected 4 or 8")
    return LaVIT(checkpoint, vision_heads=vision_heads or stored,
                 quantize=quantize, group_size=group_size)
