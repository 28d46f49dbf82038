"""Text (or text + image) -> image, end to end: prompt ids -> guided image tokens on the
LLM -> VQ decoder -> guided UNet denoising -> VAE -> pixels. Also reconstruction
(image -> its own tokens -> pixels), which shows what the tokenizer keeps.

Follows the official `lavit_for_generation.py` (`generate_image`, `multimodal_synthesis`)
and `image_detokenize.py`; settings and their defaults are LAVIT_REFERENCE.md section 4.
A multimodal prompt is a sequence of text pieces and images in the user's order; an
image enters as its *discrete* visual ids without `[IMG]`/`[/IMG]`. Components load only
when a stage needs them (no EVA for a text-only prompt) and `low_memory` frees the LLM
before the UNet runs.

`generate_stages` is a generator of progress events; the CLI owns the progress bars.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import mlx.core as mx
import numpy as np
from PIL import Image, PngImagePlugin

from .errors import LaVITError
from .pixel_decoder import ASPECT_RATIOS, HIGHRES_DEFAULTS, LOWRES_DEFAULTS
from .image_tokens import ImageTokenDecoding, stream_image_tokens, visual_codes

# The release's LLM guidance: 4.0 for text prompts, 5.0 when the prompt holds an image.
TEXT_LLM_GUIDANCE = 4.0
MULTIMODAL_LLM_GUIDANCE = 5.0
IMAGE_PLACEHOLDER = "<image>"


@dataclass
class GenerationSettings:
    """Everything that decides an image; stored in the PNG's text metadata."""

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

    def resolved(self) -> "GenerationSettings":
        """A copy with every default filled in as the release would."""
        highres = self.decoder == "highres"
        if self.decoder not in ("highres", "lowres"):
            raise LaVITError(f"--decoder {self.decoder!r}: expected highres or lowres")
        defaults = HIGHRES_DEFAULTS if highres else LOWRES_DEFAULTS
        out = GenerationSettings(**asdict(self))
        if self.ratio is not None:
            if self.ratio not in ASPECT_RATIOS:
                raise LaVITError(f"--ratio {self.ratio!r}: choose one of {', '.join(ASPECT_RATIOS)}")
            if self.height or self.width:
                raise LaVITError("give either --ratio or --width/--height, not both")
            if not highres:
                raise LaVITError("--ratio applies to the high-res decoder; use --width/--height with lowres")
            out.height, out.width = ASPECT_RATIOS[self.ratio]
        out.height = out.height or defaults.size[0]
        out.width = out.width or defaults.size[1]
        out.steps = out.steps or defaults.steps
        out.guidance = defaults.guidance if out.guidance is None else out.guidance
        if out.llm_guidance is None:
            out.llm_guidance = MULTIMODAL_LLM_GUIDANCE if self.images else TEXT_LLM_GUIDANCE
        if out.seed is None:
            out.seed = int.from_bytes(os.urandom(4), "little") >> 1
        if out.num_images < 1:
            raise LaVITError(f"-n {out.num_images}: expected at least 1")
        return out


@dataclass
class Event:
    """A progress event: `stage` is 'tokens', 'decode', 'denoise' or 'vae'."""

    stage: str
    done: int
    total: int


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


def prompt_ids(model, pieces: Sequence[Tuple[str, str]]) -> List[int]:
    """Token ids of a multimodal prompt: text ids, and each image's discrete visual ids."""
    ids: List[int] = []
    images = [value for kind, value in pieces if kind == "image"]
    tokens = iter(model.tokenize(images) if images else [])
    for kind, value in pieces:
        if kind == "text":
            ids.extend(model.text_tokenizer.encode(value))
        else:
            ids.extend(next(tokens).llm_ids(model.token_ids, special=False))
    if images:
        model.unload("eva", "tokenizer")
    return ids


def generate_stages(model, settings: GenerationSettings) -> Iterator[Union[Event, List[np.ndarray]]]:
    """Run the pipeline; yields `Event`s, then finally the list of uint8 images (H, W, 3).

    Args:
        model: a `LaVIT`.
        settings: resolved or not (`resolved()` is applied).
    """
    s = settings.resolved()
    highres = s.decoder == "highres"
    decoder = model.pixel_decoder(highres)
    decoder.check_size(s.height, s.width)
    ids = prompt_ids(model, prompt_pieces(s.prompt, s.images))
    negative = None
    if s.negative_prompt:
        negative = model.text_tokenizer.encode(s.negative_prompt) + [model.token_ids.image_start]
    decoding = ImageTokenDecoding(
        guidance_scale=s.llm_guidance, min_new_tokens=s.min_new_tokens, max_new_tokens=s.max_new_tokens,
        temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
    )
    generated = [[] for _ in range(s.num_images)]
    for step, tokens in enumerate(stream_image_tokens(model.llm, [ids] * s.num_images, decoding, negative, s.seed)):
        for row, token in enumerate(tokens):
            if token is not None:
                generated[row].append(token)
        yield Event("tokens", step + 1, s.max_new_tokens)
    codes = [np.array(visual_codes(row, model.token_ids), dtype=np.int64) for row in generated]
    empty = [i for i, c in enumerate(codes) if len(c) == 0]
    if empty:
        raise LaVITError(
            f"the LLM generated no visual tokens for image {empty[0] + 1} (it ended the image at once); "
            "try another --seed or a different prompt"
        )
    if s.low_memory:
        model.unload("llm")
    yield Event("decode", 0, 1)
    conditioning = model.decode_codes(codes, highres=highres)
    mx.eval(conditioning)
    model.unload("highres_decoder" if highres else "lowres_decoder")
    yield Event("decode", 1, 1)
    yield from _denoise_and_decode(decoder, conditioning, s)


def _denoise_and_decode(decoder, conditioning, s: GenerationSettings):
    latents = None
    for step, total, latents in decoder.denoise(conditioning, s.height, s.width, s.steps, s.guidance,
                                                s.scheduler, seed=s.seed):
        yield Event("denoise", step, total)
    yield Event("vae", 0, 1)
    images = decoder.to_images(latents)
    yield Event("vae", 1, 1)
    yield list(images)


def reconstruct_stages(model, image, settings: GenerationSettings) -> Iterator[Union[Event, List[np.ndarray]]]:
    """Image -> discrete tokens -> pixels (the official `LaVITDetokenizer`)."""
    s = settings.resolved()
    highres = s.decoder == "highres"
    decoder = model.pixel_decoder(highres)
    decoder.check_size(s.height, s.width)
    tokens = model.tokenize([image])[0]
    model.unload("eva", "tokenizer")
    if tokens.num_tokens == 0:
        raise LaVITError(f"{image}: the tokenizer kept no patch of this image; nothing to decode")
    yield Event("decode", 0, 1)
    conditioning = model.decode_codes([tokens.codes] * s.num_images, highres=highres)
    yield Event("decode", 1, 1)
    yield from _denoise_and_decode(decoder, conditioning, s)


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


def save_png(image: np.ndarray, path: Path, settings: GenerationSettings, index: int = 0, **extra) -> None:
    """Write atomically (temporary file + rename) with the settings as PNG text chunks."""
    info = PngImagePlugin.PngInfo()
    record = {**asdict(settings), "image_index": index, **extra}
    info.add_text("prompt", settings.prompt)
    info.add_text("seed", str(settings.seed))
    info.add_text("lavit", json.dumps(record))
    path = Path(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            Image.fromarray(image).save(stream, format="PNG", pnginfo=info)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp files are private; an image is not
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
