"""Text (or text + image) -> image, end to end: prompt ids -> guided image tokens on the
LLM -> VQ decoder -> guided UNet denoising -> VAE -> pixels. Also reconstruction
(image -> its own tokens -> pixels), which shows what the tokenizer keeps.

Follows the official `lavit_for_generation.py` (`generate_image`, `multimodal_synthesis`)
and `image_detokenize.py`; settings and their defaults are LAVIT_REFERENCE.md section 4.
A multimodal prompt is a sequence of text pieces and images in the user's order; an
image enters as its *discrete* visual ids without `[IMG]`/`[/IMG]`. Components load only
when a stage needs them (no EVA for a text-only prompt) and `low_memory` frees the LLM
before the UNet runs. Before anything loads, a size whose pixel decoding cannot fit in
memory is refused in one line (`check_generation_memory`, estimated from the config).

`generate_stages` is a generator of progress events; the CLI owns the progress bars.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import mlx.core as mx
import numpy as np
from PIL import Image, PngImagePlugin

from .errors import LaVITError
from .image_tokens import ImageTokenDecoding, stream_image_tokens, visual_codes
from .pixel_decoder import ASPECT_RATIOS, HIGHRES_DEFAULTS, LOWRES_DEFAULTS, DecodingDefaults
from .sampling import check_common
from .schedulers import SCHEDULERS
from .seeding import MAX_SEED, key, resolve_seed

# The release's LLM guidance: 4.0 for text prompts, 5.0 when the prompt holds an image.
TEXT_LLM_GUIDANCE = 4.0
MULTIMODAL_LLM_GUIDANCE = 5.0
IMAGE_PLACEHOLDER = "<image>"
DECODERS = ("highres", "lowres")
SIZE_STEP = 8  # one latent pixel of the release's VAEs; the model's own factor is checked once loaded
MAX_SIDE = 4096
MAX_IMAGES = 64
MAX_STEPS = 1000


@dataclass
class GenerationSettings:
    """Everything that decides an image; stored in the PNG's text metadata.

    `seed` is the first image's seed; image i of a batch uses seed + i, so that any image
    can be made again alone (`--seed <its seed> -n 1`).
    """

    prompt: str = ""
    images: List[str] = field(default_factory=list)  # prompt images, for <image> placeholders
    negative_prompt: Optional[str] = None
    seed: Optional[int] = None
    num_images: int = 1
    decoder: str = "highres"  # or "lowres"
    height: Optional[int] = None
    width: Optional[int] = None
    ratio: Optional[str] = None
    steps: Optional[int] = None
    guidance: Optional[float] = None  # UNet guidance
    llm_guidance: Optional[float] = None
    scheduler: str = "ddim"
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    max_new_tokens: int = 200
    min_new_tokens: int = 20
    low_memory: bool = False
    # Which of "size", "steps", "guidance" were filled from a decoder's defaults (not given),
    # so that resolving again with the model's own defaults replaces them.
    defaulted: List[str] = field(default_factory=list)

    def resolved(self, defaults: Optional[DecodingDefaults] = None) -> "GenerationSettings":
        """A checked copy with every default filled in (idempotent): from `defaults` (the
        model's own, `model_defaults`) or else the release's.

        Raises a one-line LaVITError naming the option for any value that cannot work, so
        that callers can validate before loading anything.
        """
        if self.decoder not in DECODERS:
            raise LaVITError(f"--decoder {self.decoder!r}: expected one of {', '.join(DECODERS)}")
        if self.scheduler not in SCHEDULERS:
            raise LaVITError(f"--scheduler {self.scheduler!r}: expected one of {', '.join(SCHEDULERS)}")
        highres = self.decoder == "highres"
        defaults = defaults or (HIGHRES_DEFAULTS if highres else LOWRES_DEFAULTS)
        out = GenerationSettings(**asdict(self))
        if "size" in out.defaulted:
            out.height = out.width = None
        if "steps" in out.defaulted:
            out.steps = None
        if "guidance" in out.defaulted:
            out.guidance = None
        chosen = {"size": out.height is not None or out.ratio is not None, "steps": out.steps is not None,
                  "guidance": out.guidance is not None}
        out.defaulted = [name for name, by_user in chosen.items() if not by_user]
        if self.ratio is not None:
            if self.ratio not in ASPECT_RATIOS:
                raise LaVITError(f"--ratio {self.ratio!r}: choose one of {', '.join(ASPECT_RATIOS)}")
            if not highres:
                raise LaVITError("--ratio applies to the high-res decoder; use --width/--height with lowres")
            size = ASPECT_RATIOS[self.ratio]
            if (self.height, self.width) not in ((None, None), size):
                raise LaVITError("give either --ratio or --width/--height, not both")
            out.height, out.width = size
        elif (self.height is None) != (self.width is None):
            given = "--width" if self.height is None else "--height"
            missing = "--height" if self.height is None else "--width"
            raise LaVITError(f"{given} needs {missing} too (or use --ratio)")
        if out.height is None:
            out.height, out.width = defaults.size
        for flag, value in (("--height", out.height), ("--width", out.width)):
            if not (SIZE_STEP <= value <= MAX_SIDE and value % SIZE_STEP == 0):
                raise LaVITError(f"{flag} {value}: expected a multiple of {SIZE_STEP} from {SIZE_STEP} to {MAX_SIDE}")
        if out.steps is None:
            out.steps = defaults.steps
        if not 1 <= out.steps <= MAX_STEPS:
            raise LaVITError(f"--steps {out.steps}: expected 1 to {MAX_STEPS}")
        out.guidance = defaults.guidance if out.guidance is None else float(out.guidance)
        if out.llm_guidance is None:
            out.llm_guidance = MULTIMODAL_LLM_GUIDANCE if self.images else TEXT_LLM_GUIDANCE
        for flag, value in (("--guidance", out.guidance), ("--llm-guidance", out.llm_guidance)):
            if not (value >= 0 and value < float("inf")):
                raise LaVITError(f"{flag} {value}: expected a finite number >= 0")
        if not 1 <= out.num_images <= MAX_IMAGES:
            raise LaVITError(f"-n {out.num_images}: expected 1 to {MAX_IMAGES}")
        if out.min_new_tokens > out.max_new_tokens:
            raise LaVITError(f"min_new_tokens {out.min_new_tokens} exceeds max_new_tokens {out.max_new_tokens}")
        check_common(out.max_new_tokens, out.min_new_tokens, out.temperature, out.top_k, out.top_p)
        out.seed = resolve_seed(out.seed)
        if out.seed + out.num_images - 1 > MAX_SEED:
            raise LaVITError(f"--seed {out.seed}: image {out.num_images} would need seed {out.seed + out.num_images - 1}, "
                             f"past {MAX_SEED}")
        return out

    def image_seed(self, index: int) -> int:
        return self.seed + index


@dataclass
class Progress:
    """A progress event: `stage` is 'tokens', 'decode', 'denoise' or 'vae'."""

    stage: str
    done: int
    total: int


Event = Progress  # the name earlier versions used


@dataclass
class Done:
    """The last event of a pipeline: the images and the settings that made them."""

    images: List[np.ndarray]  # uint8 (H, W, 3)
    settings: GenerationSettings
    seconds: float = 0.0


def prompt_pieces(prompt: str, images: Sequence[str]) -> List[Tuple[str, str]]:
    """[(kind, value)] in order: `<image>` placeholders in the prompt take the images in
    order; images without a placeholder come first (as the official image+text demo)."""
    parts = prompt.split(IMAGE_PLACEHOLDER)
    slots = len(parts) - 1
    if slots > len(images):
        raise LaVITError(f"the prompt has {slots} {IMAGE_PLACEHOLDER} placeholders but {len(images)} --image")
    leading = list(images[: len(images) - slots])
    placed = list(images[len(images) - slots:])
    pieces = [("image", image) for image in leading]
    for i, text in enumerate(parts):
        if text.strip():
            pieces.append(("text", text))
        if i < slots:
            pieces.append(("image", placed[i]))
    if not pieces:
        raise LaVITError("empty prompt: give --prompt text and/or --image")
    return pieces


def prompt_ids(model, pieces: Sequence[Tuple[str, str]], low_memory: bool = False) -> List[int]:
    """Token ids of a multimodal prompt: text ids, and each image's discrete visual ids
    (with `low_memory` the image encoder is freed afterwards)."""
    ids: List[int] = []
    images = [value for kind, value in pieces if kind == "image"]
    tokens = iter(model.tokenize(images) if images else [])
    for kind, value in pieces:
        if kind == "text":
            ids.extend(model.text_tokenizer.encode(value))
        else:
            ids.extend(next(tokens).llm_ids(model.token_ids, special=False))
    if images and low_memory:
        model.unload("eva", "tokenizer")
    return ids


def generate_stages(model, settings: GenerationSettings, prompts: Optional[Sequence[str]] = None,
                    check_memory: bool = True) -> Iterator[Union[Progress, Done]]:
    """Run the pipeline; yields `Progress` events, then one `Done` with the images.

    Args:
        model: a `LaVIT`.
        settings: resolved or not (`resolved()` is applied).
        prompts: several text prompts at once, one image each (image i with seed + i;
            `settings.prompt`, `images` and `num_images` are then not used).
        check_memory: refuse, before anything loads or runs, a size whose pixel
            decoding cannot fit in memory (`check_generation_memory`; also off with
            `LAVIT_MEMORY_LIMIT_GB=off`).
    """
    start = time.perf_counter()
    s = settings.resolved()
    s = s.resolved(model_defaults(model, s.decoder))
    highres = s.decoder == "highres"
    if prompts is not None and not prompts:
        raise LaVITError("no prompt to generate from")
    if check_memory:
        check_generation_memory(model, s, len(prompts) if prompts is not None else s.num_images)
    decoder = model.pixel_decoder(highres)
    decoder.check_size(s.height, s.width)
    if prompts is not None:
        rows = [prompt_ids(model, prompt_pieces(p, [])) for p in prompts]
        s.num_images = len(rows)
        s.resolved()  # the seeds of every image must be valid
    else:
        rows = [prompt_ids(model, prompt_pieces(s.prompt, s.images), s.low_memory)] * s.num_images
    negative = None
    if s.negative_prompt:
        negative = model.text_tokenizer.encode(s.negative_prompt) + [model.token_ids.image_start]
    # An image has at most num_patches visual tokens (+ [/IMG]): the VQ decoder has that many
    # positions. The release's cap (200 < 256) never binds; a small model's may.
    vq = model.config.highres_decoder if highres else model.config.lowres_decoder
    patches = vq.num_patches if vq is not None else s.max_new_tokens
    max_new = min(s.max_new_tokens, patches + 1)
    decoding = ImageTokenDecoding(
        guidance_scale=s.llm_guidance, min_new_tokens=min(s.min_new_tokens, max_new), max_new_tokens=max_new,
        temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
    )
    generated = [[] for _ in range(s.num_images)]
    steps = 0
    for steps, tokens in enumerate(stream_image_tokens(model.llm, rows, decoding, negative, s.seed), 1):
        for row, token in enumerate(tokens):
            if token is not None:
                generated[row].append(token)
        yield Progress("tokens", steps, max_new)
    yield Progress("tokens", steps, steps)  # every image ended: the stage is complete
    codes = [np.array(visual_codes(row, model.token_ids)[:patches], dtype=np.int64) for row in generated]
    empty = [i for i, c in enumerate(codes) if len(c) == 0]
    if empty:
        raise LaVITError(
            f"the LLM generated no visual tokens for image {empty[0] + 1} (it ended the image at once); "
            "try another --seed or a different prompt"
        )
    if s.low_memory:
        model.unload("llm")
    yield Progress("decode", 0, 1)
    conditioning = model.decode_codes(codes, highres=highres)
    mx.eval(conditioning)
    if s.low_memory:
        model.unload("highres_decoder" if highres else "lowres_decoder")
    yield Progress("decode", 1, 1)
    images = yield from _denoise_and_decode(decoder, conditioning, s)
    yield Done(images, s, time.perf_counter() - start)


def pixel_component(decoder: str) -> str:
    """The model component of the pixel decoder named by `--decoder` (highres | lowres)."""
    return "highres_pixel" if decoder == "highres" else "lowres_pixel"


def model_defaults(model, decoder: str = "highres") -> Optional[DecodingDefaults]:
    """The model's own size, steps and guidance for a pixel decoder (`PixelConfig.defaults`,
    written by `lavit train pixel`), over the release's for any it does not set; None when
    the model sets none (the release)."""
    part = model.config.component(pixel_component(decoder))
    own = (part.defaults if part is not None else None) or {}
    if not own:
        return None
    base = HIGHRES_DEFAULTS if decoder == "highres" else LOWRES_DEFAULTS
    return DecodingDefaults(size=(int(own.get("height", base.size[0])), int(own.get("width", base.size[1]))),
                            steps=int(own.get("steps", base.steps)), guidance=float(own.get("guidance", base.guidance)))


# ------------------------------------------------------------------ memory, before any work
UNCOND_TOKENS = 77
_SAFETENSORS_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}


def _stored_itemsize(folder: Path, default: int = 4) -> int:
    """Bytes per float of the first floating tensor in a folder's safetensors header
    (the header alone is read); `default` without one."""
    import struct

    for path in sorted(Path(folder).glob("*.safetensors")):
        try:
            with open(path, "rb") as stream:
                (length,) = struct.unpack("<Q", stream.read(8))
                header = json.loads(stream.read(min(length, 1 << 26)))
        except (OSError, ValueError, struct.error):
            continue
        for name, entry in header.items():
            if name != "__metadata__" and isinstance(entry, dict) and entry.get("dtype") in _SAFETENSORS_ITEMSIZE:
                return _SAFETENSORS_ITEMSIZE[entry["dtype"]]
    return default


def _on_cpu() -> bool:
    return mx.default_device() == mx.cpu


def pixel_memory_estimate(model, s: GenerationSettings, num_images: Optional[int] = None):
    """(MemoryEstimate of denoising + VAE decoding at the settings' size, bytes of it
    already resident) for `model`'s pixel decoder of `s.decoder`.

    A loaded decoder is measured (its weights are resident); otherwise everything comes
    from the config: the UNet and VAE are built unloaded (MLX arrays are lazy: nothing
    is allocated) to count their parameters, in the dtype `loading` would give them
    (float32 on the CPU, the stored dtype on a GPU). Nothing is read but config.json and
    safetensors headers. None when the size is not one the decoder takes (its own check
    then names the problem) or the checkpoint holds no such decoder.
    """
    from .memory import estimate_pixel_decoding, parameter_bytes
    from .models.unet import UNet2DConditionModel, UNetConfig
    from .models.vae import AutoencoderKL, VAEConfig

    n = s.num_images if num_images is None else num_images
    name = pixel_component(s.decoder)
    if name in model:
        decoder = model[name]
        if s.height % decoder.vae_scale_factor or s.width % decoder.vae_scale_factor:
            return None
        estimate = decoder.memory_estimate(s.height, s.width, n)
        return estimate, estimate.breakdown["weights"]
    part = model.config.component(name)
    if part is None or not part.unet or not part.vae:
        return None
    unet_config, vae_config = UNetConfig.from_dict(part.unet), VAEConfig.from_dict(part.vae)
    scale = 2 ** (len(vae_config.block_out_channels) - 1)
    if s.height % scale or s.width % scale:
        return None
    cpu = _on_cpu()
    quantization = model.checkpoint.quantization(name) or {}
    unet_itemsize = 4 if cpu else _stored_itemsize(model.checkpoint.folder(name) / "unet")
    bits, group = quantization.get("bits"), quantization.get("group_size", 64)
    weights = (parameter_bytes(UNet2DConditionModel(unet_config), unet_itemsize, bits, group)
               + parameter_bytes(AutoencoderKL(vae_config), 4, bits, group))
    if name == "lowres_pixel":  # its unconditional embedding: CLIP's 77 tokens, float32
        dim = unet_config.cross_attention_dim
        weights += UNCOND_TOKENS * (dim if isinstance(dim, int) else max(dim)) * 4
    estimate = estimate_pixel_decoding(unet_config, vae_config, s.height, s.width, n, unet_itemsize, weights,
                                       cpu=cpu)
    return estimate, 0


def llm_weight_bytes(model) -> int:
    """Bytes the LLM's weights will take once loaded (0 when it is loaded already or the
    checkpoint has none), from its config: float32 on the CPU, the stored dtype on a GPU,
    quantized as `load(quantize=...)` or the MLX folder says."""
    from .memory import parameter_bytes
    from .models.llm import build_llama

    if "llm" in model or model.config.llm is None:
        return 0
    config = model.config.llm
    itemsize = 4
    if not _on_cpu():
        itemsize = {"float16": 2, "bfloat16": 2}.get(str(config.extra.get("torch_dtype", "")), 4)
    stored = model.checkpoint.quantization("llm") or {}
    bits = stored.get("bits") or model.quantize
    group = stored.get("group_size") or model.group_size
    try:
        return parameter_bytes(build_llama(config), itemsize, bits, group)
    except (LaVITError, TypeError, ValueError):  # a config mlx-lm cannot build: loading will say why
        return 0


def check_generation_memory(model, s: GenerationSettings, num_images: Optional[int] = None, uses_llm: bool = True,
                            available: Optional[int] = None) -> None:
    """Refuse, in one LaVITError line, a generation whose pixel decoding cannot fit in
    memory, before anything heavy loads or runs (`generate_stages` and
    `reconstruct_stages` call it first).

    The need is the pixel decoder's peak (`lavit_mlx.memory`: denoising, then the VAE,
    weights included) plus, for text-to-image without `low_memory`, the LLM's weights,
    which stay loaded meanwhile; with `low_memory` the LLM is freed first, and its
    weights with the pixel decoder's must fit while the tokens are generated. What is
    loaded already is not counted again. `available` defaults to
    `memory.available_memory()` (at most `LAVIT_MEMORY_LIMIT_GB`); `LAVIT_MEMORY_LIMIT_GB=off`
    skips the check.
    """
    from .memory import available_memory, check_pixel_memory, gib, memory_check_enabled

    if not memory_check_enabled():
        return
    found = pixel_memory_estimate(model, s, num_images)
    if found is None:
        return
    estimate, resident = found
    available = available_memory() if available is None else available
    advice = ["a smaller --width/--height"]
    if s.decoder == "highres":
        advice[0] += " or --ratio"
    advice.append("fewer -n")
    llm = llm_weight_bytes(model) if uses_llm else 0
    kept = []
    if llm and not s.low_memory:
        kept.append(("the LLM's weights, loaded meanwhile", llm))
        advice.append("--low-memory")
    if s.decoder == "highres":
        advice.append("--decoder lowres")
    check_pixel_memory(estimate, available, resident, kept,
                       "use " + ", ".join(advice[:-1]) + (", or " if len(advice) > 1 else "") + advice[-1])
    if llm and s.low_memory:
        pixel_weights = estimate.breakdown["weights"] - resident
        if llm + pixel_weights > available:
            raise LaVITError(f"the LLM's weights ({gib(llm)}) and the pixel decoder's ({gib(pixel_weights)}) are "
                             f"loaded together while the image tokens are generated, but {gib(available)} is "
                             "available: use --quantize 8 or 4")


def initial_latents(decoder, s: GenerationSettings, count: int) -> mx.array:
    """N(0, 1) * init_noise_sigma latents; image i draws its noise from seed + i."""
    sampler = decoder.scheduler(s.scheduler)
    sampler.set_timesteps(s.steps)
    shape = (decoder.latent_channels, s.height // decoder.vae_scale_factor, s.width // decoder.vae_scale_factor)
    noise = [mx.random.normal(shape, key=key(s.image_seed(i))) for i in range(count)]
    return mx.stack(noise) * sampler.init_noise_sigma


def _denoise_and_decode(decoder, conditioning, s: GenerationSettings):
    latents = initial_latents(decoder, s, s.num_images)
    for step, total, latents in decoder.denoise(conditioning, s.height, s.width, s.steps, s.guidance,
                                                s.scheduler, latents=latents):
        yield Progress("denoise", step, total)
    yield Progress("vae", 0, 1)
    images = decoder.to_images(latents)
    yield Progress("vae", 1, 1)
    return list(images)


def reconstruct_stages(model, image, settings: GenerationSettings,
                       check_memory: bool = True) -> Iterator[Union[Progress, Done]]:
    """Image -> discrete tokens -> pixels (the official `LaVITDetokenizer`); yields `Progress`,
    then `Done`. `check_memory` as in `generate_stages`."""
    start = time.perf_counter()
    s = settings.resolved()
    s = s.resolved(model_defaults(model, s.decoder))
    highres = s.decoder == "highres"
    if check_memory:
        check_generation_memory(model, s, s.num_images, uses_llm=False)
    decoder = model.pixel_decoder(highres)
    decoder.check_size(s.height, s.width)
    tokens = model.tokenize([image])[0]
    if s.low_memory:
        model.unload("eva", "tokenizer")
    if tokens.num_tokens == 0:
        raise LaVITError(f"{image}: the tokenizer kept no patch of this image; nothing to decode")
    yield Progress("decode", 0, 1)
    conditioning = model.decode_codes([tokens.codes] * s.num_images, highres=highres)
    yield Progress("decode", 1, 1)
    images = yield from _denoise_and_decode(decoder, conditioning, s)
    yield Done(images, s, time.perf_counter() - start)


def run_stages(stages: Iterator[Union[Progress, Done]]) -> Done:
    """Drive a pipeline to its end without progress reporting; returns the `Done` event."""
    for event in stages:
        if isinstance(event, Done):
            return event
    raise LaVITError("the pipeline ended without a result")


# Settings that a reconstruction does not use (no LLM): kept out of its PNG metadata.
LLM_SETTINGS = ("prompt", "negative_prompt", "llm_guidance", "temperature", "top_k", "top_p", "max_new_tokens",
                "min_new_tokens")


# ------------------------------------------------------------------ output files
def output_paths(out: Path, count: int) -> List[Path]:
    """`out` for one image; out-1.png, out-2.png, ... for several."""
    out = Path(out)
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(1, count + 1)]


def check_outputs(paths: Sequence[Path], force: bool) -> None:
    """Fail before any work when an output cannot be written or would overwrite a file."""
    for path in paths:
        if path.suffix.lower() != ".png":
            raise LaVITError(f"{path}: the output must be a .png file (it carries the settings as metadata)")
        parent = path.parent
        if not parent.is_dir():
            raise LaVITError(f"cannot write {path}: folder {parent} does not exist")
        if not os.access(parent, os.W_OK):
            raise LaVITError(f"cannot write {path}: no write permission in {parent}")
        if path.exists() and not force:
            raise LaVITError(f"{path} already exists (use --force to replace it)")


def png_record(settings: GenerationSettings, index: int, model: Optional[str] = None,
               reconstruction: bool = False) -> dict:
    """The PNG's `lavit` metadata: every setting, this image's own seed, the model and version."""
    from . import __version__

    record = {k: v for k, v in asdict(settings).items() if not (reconstruction and k in LLM_SETTINGS)}
    record.update(seed=settings.image_seed(index), batch_seed=settings.seed, image_index=index,
                  model=model, lavit_version=__version__)
    if reconstruction:
        record["task"] = "reconstruction"
    return record


def atomic_png(image, path: Path, pnginfo=None) -> None:
    """Write a PIL image or uint8 array as PNG atomically (temporary file + rename)."""
    path = Path(path)
    picture = image if isinstance(image, Image.Image) else Image.fromarray(image)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            picture.save(stream, format="PNG", pnginfo=pnginfo)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp files are private; an image is not
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def save_png(image: np.ndarray, path: Path, settings: GenerationSettings, index: int = 0,
             model: Optional[str] = None, reconstruction: bool = False) -> None:
    """Write atomically (temporary file + rename) with the settings as PNG text chunks.

    The `seed` chunk is this image's own seed: `--seed <it> -n 1` makes the image again.
    """
    info = PngImagePlugin.PngInfo()
    record = png_record(settings, index, model, reconstruction)
    if not reconstruction:
        info.add_text("prompt", settings.prompt)
    info.add_text("seed", str(record["seed"]))
    info.add_text("lavit", json.dumps(record))
    atomic_png(image, path, info)
