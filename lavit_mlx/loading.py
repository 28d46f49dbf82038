"""One way to build and load every component: config -> module -> sanitize -> quantize as
stored -> strict load.

`load(path)` opens a checkpoint (released layout or MLX folder, `checkpoint.py` reads
both), takes its nested `LaVITConfig` (stored, or inferred once from shapes) and returns
a `LaVIT` whose components are built from that config only. `load_component` is the
single path every component goes through, here and in `lavit_convert`: errors name the
key and the file, layers stored quantized (a `.scales` next to their weight, as mlx-lm's
`load_model` detects them) are rebuilt quantized, and every module is put in eval mode.

Dtype policy: vision components and the VAE compute in float32 (as the release does);
the LLM and the UNets in float32 on the CPU (MLX's half-precision CPU kernels are slow)
and in their stored dtype on a GPU.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Callable, Dict, Mapping, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn

from .checkpoint import Checkpoint
from .config import LaVITConfig, check_heads
from .errors import CheckpointError, LaVITError
from .layout import MLX_FORMAT
from .weights import load_strict, read_sharded, read_tensor, read_weights

VISION = ("eva", "tokenizer", "understanding", "lowres_decoder", "highres_decoder")
PIXEL = ("highres_pixel", "lowres_pixel")
COMPONENTS = VISION + ("llm",) + PIXEL
QUANTIZE_BITS = (4, 8)


def compute_dtype(large: bool) -> Optional[mx.Dtype]:
    """float32, or None (keep the stored dtype) for the large models on a GPU."""
    return None if large and mx.default_device() != mx.cpu else mx.float32


def quantize_as_stored(module: nn.Module, weights: Mapping[str, mx.array], quantization: Optional[dict]) -> None:
    """Rebuild as quantized the layers whose weights were stored quantized."""
    if quantization:
        nn.quantize(module, group_size=quantization["group_size"], bits=quantization["bits"],
                    class_predicate=lambda path, layer: f"{path}.scales" in weights)


def load_component(module: nn.Module, weights: Dict[str, mx.array], source: str, *,
                   torch_layout: bool = False, quantization: Optional[dict] = None,
                   known_extra: Optional[Callable[[str], bool]] = None,
                   dtype: Optional[mx.Dtype] = mx.float32) -> nn.Module:
    """sanitize (when the weights are in PyTorch layout) -> quantize as stored -> strict load -> eval.

    Args:
        module: built from its config.
        weights: the component's tensors, official key names.
        source: the file or folder they came from (named in errors).
        torch_layout: convs are OIHW (the released layout) and need `module.sanitize`.
        quantization: {"bits", "group_size"} when stored quantized.
        known_extra: keys the release is known to carry that the module has no place for.
        dtype: the floating dtype to load in (None: as stored).
    """
    sanitize = getattr(module, "sanitize", None)
    if sanitize is not None:
        # this project's modules take the source layout; mlx-lm's models only the weights
        layout_aware = len(inspect.signature(sanitize).parameters) > 1
        weights = sanitize(weights, "torch" if torch_layout else "mlx") if layout_aware else sanitize(weights)
    quantize_as_stored(module, weights, quantization)
    load_strict(module, weights, source, known_extra=known_extra, dtype=dtype)
    module.eval()
    return module


# ----------------------------------------------------------------------------- builders
def build_component(name: str, config: LaVITConfig, source: str = "") -> nn.Module:
    """The (unloaded) module of a component, from the config alone."""
    from .models.eva_vit import EVAVisionTransformer
    from .models.visual_tokenizer import DynamicVisualTokenizer
    from .models.vq_decoder import VQDecoder

    part = config.component(name)
    if part is None:
        raise CheckpointError(f"{source or 'the checkpoint'} holds no {name}")
    if name == "eva":
        check_heads(part.width, part.num_heads, "EVA vision transformer", source)
        return EVAVisionTransformer(part)
    if name in ("tokenizer", "understanding"):
        check_heads(part.width, part.num_heads, "token merger", source)
        if name == "tokenizer":
            return DynamicVisualTokenizer(part, quantizer=True)
        if config.understanding_dim is None:
            raise CheckpointError(f"{source}: no vit_proj width for the understanding path")
        return DynamicVisualTokenizer(part, quantizer=False, llm_hidden=config.understanding_dim)
    if name in ("lowres_decoder", "highres_decoder"):
        check_heads(part.width, part.num_heads, "VQ decoder", source)
        if part.highres:
            check_heads(part.feature_dim, part.num_heads, "VQ decoder pooling", source)
        return VQDecoder(part)
    raise LaVITError(f"unknown component {name!r}")


def load_vision(checkpoint: Checkpoint, name: str, config: LaVITConfig) -> nn.Module:
    source = str(checkpoint.file(name))
    problem = checkpoint.problems.get("tokenizer" if name == "understanding" else name)
    if problem:
        raise CheckpointError(problem)
    module = build_component(name, config, source)
    weights = checkpoint.understanding_weights() if name == "understanding" else checkpoint.weights(name)
    return load_component(module, weights, source, torch_layout=checkpoint.torch_layout,
                          quantization=checkpoint.quantization(name), known_extra=checkpoint.known_extra(name))


def load_llm(checkpoint: Checkpoint, config: LaVITConfig, quantize: Optional[int] = None,
             group_size: int = 64):
    """The LLM (`models.llm.LanguageModel`); `quantize` 4/8 quantizes an unquantized one at load."""
    from .models.llm import load_language_model

    return load_language_model(checkpoint.folder("llm"), dtype=compute_dtype(large=True), quantize=quantize,
                               group_size=group_size, token_ids=config.token_ids)


def load_pixel_decoder(checkpoint: Checkpoint, name: str, config: LaVITConfig):
    """A pixel decoder: UNet (float32 on the CPU, stored dtype on a GPU), VAE (float32),
    the scheduler config and, for the low-res one, its unconditional embedding."""
    from .models.unet import UNet2DConditionModel, UNetConfig
    from .models.vae import AutoencoderKL, VAEConfig
    from .pixel_decoder import SPATIAL_CONTEXT, PixelDecoder

    part = config.component(name)
    if part is None:
        raise CheckpointError(f"{checkpoint.path} holds no {name}")
    folder = checkpoint.folder(name)
    stem = MLX_FORMAT["pixel_weights"] if not checkpoint.torch_layout else "diffusion_pytorch_model"
    quantization = checkpoint.quantization(name)
    unet = UNet2DConditionModel(UNetConfig.from_dict(part.unet))
    load_component(unet, read_diffusers_weights(folder / "unet", stem, "UNet"), str(folder / "unet"),
                   torch_layout=checkpoint.torch_layout, quantization=quantization, dtype=compute_dtype(large=True))
    vae = AutoencoderKL(VAEConfig.from_dict(part.vae))
    # the VAE decodes in float32: it overflows in float16, as the release notes
    load_component(vae, read_diffusers_weights(folder / "vae", stem, "VAE"), str(folder / "vae"),
                   torch_layout=checkpoint.torch_layout, quantization=quantization, dtype=mx.float32)
    uncond = None
    if name == "lowres_pixel":
        file = "uncond_embeddings.bin" if checkpoint.torch_layout else "uncond_embeddings.safetensors"
        uncond = read_tensor(folder / file).astype(mx.float32)
    return PixelDecoder(unet, vae, part.scheduler, highres=name == "highres_pixel", uncond_embeddings=uncond,
                        spatial_context=bool(part.unet.get(SPATIAL_CONTEXT, False)))


def read_diffusers_weights(folder: Path, stem: str, what: str) -> Dict[str, mx.array]:
    """`stem`.safetensors (or its shards with an index) or `stem`.bin of a diffusers folder."""
    safetensors = folder / f"{stem}.safetensors"
    if safetensors.is_file() or Path(f"{safetensors}.index.json").is_file():
        return read_sharded(safetensors)
    if (folder / f"{stem}.bin").is_file():
        return read_weights(folder / f"{stem}.bin")
    raise CheckpointError(f"{folder}: no {stem}.safetensors or {stem}.bin for the {what}")


def load_codebook(checkpoint: Checkpoint) -> mx.array:
    """The quantizer's codebook alone (text-to-image needs only this of the tokenizer)."""
    key = "quantize.embedding.weight"
    component = "tokenizer" if checkpoint.torch_layout else "codebook"
    weights = checkpoint.weights(component, keys={key})
    if key not in weights:
        raise CheckpointError(f"{checkpoint.file(component)}: missing key {key!r}")
    return weights[key].astype(mx.float32)


# ----------------------------------------------------------------------------- the model
def load(path, components: Optional[Sequence[str]] = None, vision_heads: Optional[int] = None,
         quantize: Optional[int] = None, group_size: int = 64, adapter=None):
    """Open a LaVIT checkpoint folder.

    Args:
        path: a folder in the released layout (rain1011/LaVIT-7B-v2) or the MLX folder
            format written by `lavit convert`.
        components: build these now (e.g. ["eva", "tokenizer"]); the others are built on
            first use (thread-safe). None builds nothing up front.
        vision_heads: attention heads of the ViT, merger and VQ decoders for the
            released layout (16 in the release; tensor shapes cannot reveal it).
        quantize: quantize the LLM to 4 or 8 bits when it loads (group size
            `group_size`; embeddings and lm_head too).
        adapter: a LoRA/DoRA adapter folder (`lavit finetune`, mlx-lm's adapter files) applied
            to the LLM, and to the understanding path if it holds one, as they load.

    Returns:
        A `LaVIT` (an `nn.Module` whose children are the built components).

    Raises:
        CheckpointError: the folder is missing, is not a LaVIT checkpoint, or a component
            does not match its config.
    """
    from .lavit import LaVIT

    if quantize not in (None, *QUANTIZE_BITS):
        raise LaVITError(f"--quantize {quantize}: expected 4 or 8")
    checkpoint = Checkpoint.open(path)
    if checkpoint.kind == "mlx" and vision_heads is not None:
        stored = {c.num_heads for c in (checkpoint.config().vision, checkpoint.config().tokenizer,
                                        checkpoint.config().highres_decoder) if c is not None}
        if stored and stored != {vision_heads}:
            raise CheckpointError(
                f"{checkpoint.path} was converted with vision heads {sorted(stored)[0]}; "
                f"--vision-heads {vision_heads} contradicts it")
    config = checkpoint.config(vision_heads)
    if adapter is not None:
        from .training.lora import read_adapter_config

        read_adapter_config(adapter, config.token_ids)  # a wrong folder fails before anything loads
    model = LaVIT(config, checkpoint, quantize=quantize, group_size=group_size, vision_heads=vision_heads,
                  adapter=adapter)
    for name in components or ():
        model.component(name)
    return model
