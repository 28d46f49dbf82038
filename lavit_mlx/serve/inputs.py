"""Request bodies -> checked tasks (`tasks.Understanding`, `tasks.Generation`, `tasks.OverlayRequest`).

Everything a request can get wrong is found here, before it is queued, and raised as a
400 `APIError` naming the field: images (data URLs only: the model runs offline; decoded
with `image_processing.load_image`, so every format, EXIF orientation, transparency and
the CLI's pixel limit behave as in the CLI), part types, decoding options, sizes, step
counts and prompts longer than the LLM's context. These functions read files and run
sentencepiece, never MLX: they run on a thread pool, off the event loop and off the
MLX worker.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import re
import tempfile
from pathlib import Path
from typing import List, Optional, Tuple

from PIL import Image

from ..errors import LaVITError
from ..generation import MAX_SIDE, MAX_STEPS, SIZE_STEP, GenerationSettings, prompt_pieces
from ..image_processing import ImageError, load_image
from ..pixel_decoder import ASPECT_RATIOS
from ..sampling import TextDecoding
from ..schedulers import SCHEDULERS
from ..seeding import MAX_SEED
from ..understanding import VQA_PROMPT
from .errors import APIError, invalid
from .schemas import ChatRequest, ImageRequest, OverlayBody
from .tasks import Generation, OverlayRequest, Understanding

# The release's six sizes, as OpenAI writes them: "WxH".
RELEASE_SIZES = tuple(f"{w}x{h}" for h, w in ASPECT_RATIOS.values())
MAX_IMAGES_PER_REQUEST = 10  # OpenAI's bound on n
MAX_PROMPT_IMAGES = 8
_DATA_URL = re.compile(r"^data:(?P<type>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,",
                       re.IGNORECASE)
_SIZE = re.compile(r"^(\d+)x(\d+)$")
# CLI flags in the library's messages -> the request fields that set them.
_FIELDS = {"--height": "size", "--width": "size", "--steps": "steps", "--guidance": "guidance",
           "--llm-guidance": "llm_guidance", "-n": "n", "--seed": "seed", "--decoder": "decoder",
           "--scheduler": "scheduler", "--image": "images", "--prompt": "prompt"}


def check_model(requested: Optional[str], served: str) -> None:
    if requested not in (None, "", served):
        raise APIError(404, f"model {requested!r} is not served here; this server has {served!r} (GET /v1/models)",
                       param="model", code="model_not_found")


# ----------------------------------------------------------------------------- images
def data_url_bytes(url: str, param: str) -> bytes:
    """The bytes of a base64 data URL; remote URLs are refused (nothing is downloaded)."""
    if re.match(r"^https?://", url, re.IGNORECASE):
        raise invalid("remote image URLs are not fetched (the model runs offline): send the image inline as a "
                      "data URL, data:image/png;base64,...", param, code="unsupported_image_url")
    match = _DATA_URL.match(url)
    if not match:
        shown = url[:40] + ("..." if len(url) > 40 else "")
        raise invalid(f"{param} must be a data URL (data:image/png;base64,...), got {shown!r}", param,
                      code="invalid_image_url")
    if not match.group("b64"):
        raise invalid(f"{param}: the data URL must be base64-encoded (data:image/png;base64,...)", param,
                      code="invalid_image_url")
    try:
        data = base64.b64decode("".join(url[match.end():].split()), validate=True)  # line breaks are allowed
    except (binascii.Error, ValueError):
        raise invalid(f"{param}: the data URL's base64 does not decode", param, code="invalid_image") from None
    if not data:
        raise invalid(f"{param}: the data URL holds no bytes", param, code="invalid_image")
    return data


def read_image(data: bytes, param: str, folder: Optional[Path] = None):
    """The uploaded image as `load_image` reads it (the CLI's checks and messages, named by
    `param`); with `folder`, the file is kept there and its path is returned too."""
    if folder is None:
        with tempfile.NamedTemporaryFile(prefix="lavit-upload-") as handle:
            handle.write(data)
            handle.flush()
            return _load(handle.name, param), None
    path = Path(folder) / f"{hashlib.sha256(data).hexdigest()}.img"
    path.write_bytes(data)
    return _load(str(path), param), path


def _load(path: str, param: str):
    try:
        return load_image(path)
    except ImageError as exc:
        raise invalid(str(exc).replace(path, param), param, code="invalid_image") from None


def image_part_url(part, param: str) -> str:
    url = part.image_url.url if hasattr(part.image_url, "url") else part.image_url
    if not url:
        raise invalid(f"{param} has no url", param)
    return url


# ----------------------------------------------------------------------------- chat
def _conversation(body: ChatRequest) -> Tuple[str, str, str]:
    """(image data URL, its param, question) from the messages: exactly one image in the
    user messages; the question is the text of the last user message."""
    images: List[Tuple[str, str]] = []
    question, seen_user = "", False
    for i, message in enumerate(body.messages):
        where = f"messages[{i}]"
        if message.role not in ("system", "developer", "user", "assistant"):
            raise invalid(f"{where}.role {message.role!r}: expected system, developer, user or assistant",
                          f"{where}.role")
        content = message.content
        parts = content if isinstance(content, list) else []
        texts = [content] if isinstance(content, str) else []
        for j, part in enumerate(parts):
            place = f"{where}.content[{j}]"
            if part.type == "text":
                texts.append(part.text or "")
            elif part.type == "image_url":
                if message.role != "user":
                    raise invalid(f"{place}: images go in user messages, not in {message.role} ones", place)
                images.append((image_part_url(part, f"{place}.image_url"), f"{place}.image_url"))
            else:
                raise invalid(f"{place}.type {part.type!r} is not supported: LaVIT reads 'text' and 'image_url' "
                              "parts", f"{place}.type", code="unsupported_content_type")
        if message.role == "user":
            seen_user = True
            question = " ".join(t.strip() for t in texts if t.strip())
    if not seen_user:
        raise invalid("no user message: send the image (and a question) in a user message", "messages")
    if not images:
        raise invalid("no image: LaVIT answers about an image; add an image_url part with a data URL", "messages",
                      code="image_required")
    if len(images) > 1:
        raise invalid(f"{len(images)} images: LaVIT answers about one image per request", images[1][1],
                      code="too_many_images")
    return images[0][0], images[0][1], question


def _decoding(body: ChatRequest, task: str) -> TextDecoding:
    release = TextDecoding.caption() if task == "caption" else TextDecoding.vqa(early_stopping=True)
    options = {}
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    if max_tokens is not None:
        if max_tokens < 1:
            raise invalid(f"{field} {max_tokens}: expected at least 1", field)
        options.update(max_new_tokens=max_tokens, min_new_tokens=min(release.min_new_tokens, max_tokens))
    if body.min_tokens is not None:
        if body.min_tokens < 0 or body.min_tokens > options.get("max_new_tokens", release.max_new_tokens):
            raise invalid(f"min_tokens {body.min_tokens}: expected 0 to max_tokens "
                          f"({options.get('max_new_tokens', release.max_new_tokens)})", "min_tokens")
        options["min_new_tokens"] = body.min_tokens
    if body.temperature is not None and not 0 <= body.temperature <= 2:
        raise invalid(f"temperature {body.temperature}: expected 0 to 2", "temperature")
    if body.top_p is not None and not 0 < body.top_p <= 1:
        raise invalid(f"top_p {body.top_p}: expected a number in (0, 1]", "top_p")
    if body.temperature:  # > 0 samples; absent or 0 keeps the release's deterministic beams
        options.update(do_sample=True, num_beams=1, temperature=body.temperature)
        if body.top_p is not None:
            options["top_p"] = body.top_p
    if body.num_beams is not None:
        if body.num_beams < 1:
            raise invalid(f"num_beams {body.num_beams}: expected at least 1", "num_beams")
        if body.num_beams > 1 and options.get("do_sample"):
            raise invalid("num_beams > 1 with temperature > 0: sampling draws one sequence; use one or the other",
                          "num_beams")
        options["num_beams"] = body.num_beams
    try:
        return dataclasses.replace(release, **options)  # __post_init__ checks the values again
    except LaVITError as exc:
        raise invalid(str(exc)) from None


def understanding(model, body: ChatRequest) -> Understanding:
    """A chat request -> the checked understanding task (decoded image, prompt, decoding)."""
    config = model.config
    if config.vision is None or config.llm is None:
        raise invalid("this checkpoint cannot answer about images (it was converted without the image encoder "
                      "or the LLM)", "model", code="model_not_capable")
    if body.n not in (None, 1):
        raise invalid(f"n {body.n}: LaVIT gives one answer per request", "n")
    if body.seed is not None and not 0 <= body.seed <= MAX_SEED:
        raise invalid(f"seed {body.seed}: expected 0 to {MAX_SEED}", "seed")
    url, param, question = _conversation(body)
    task = "vqa" if question else "caption"
    prompt = VQA_PROMPT.format(question) if question else ""
    decoding = _decoding(body, task)
    picture, _ = read_image(data_url_bytes(url, param + ".url"), param)
    size = config.vision.image_size
    # The processor's own resize (preprocess: bicubic to image_size), done now so that a
    # queued request holds a 224 x 224 picture instead of the upload.
    picture = picture.resize((size, size), resample=Image.BICUBIC)
    # [IMG] visual [/IMG] prompt, then the new tokens, must fit the context; the visual
    # count is known only after the selector (at most every patch).
    context = config.llm.max_position_embeddings
    fixed = 2 + (len(model.text_tokenizer.encode(prompt)) if prompt else 0)
    if fixed > context:
        raise invalid(f"the prompt is {fixed - 2} tokens: with the image it is longer than the LLM's context "
                      f"of {context} tokens", "messages", code="context_length_exceeded")
    if fixed + decoding.max_new_tokens > context:
        raise invalid(f"the prompt ({fixed - 2} tokens) + the image + max_tokens {decoding.max_new_tokens} "
                      f"exceed the LLM's context of {context} tokens", "max_tokens",
                      code="context_length_exceeded")
    batchable = fixed + config.vision.num_patches + decoding.max_new_tokens <= context
    return Understanding(picture, prompt, task, decoding, bool(body.sample_tokens), body.seed, batchable)


# ----------------------------------------------------------------------------- images
def parse_size(size: Optional[str], decoder: str) -> Tuple[Optional[int], Optional[int]]:
    """(width, height) of "WxH", or (None, None) for the decoder's default ("auto")."""
    if size in (None, "", "auto"):
        return None, None
    match = _SIZE.match(size.strip().lower())
    if not match:
        raise invalid(f"size {size!r}: expected WIDTHxHEIGHT such as {', '.join(RELEASE_SIZES)}", "size",
                      code="invalid_size")
    width, height = int(match.group(1)), int(match.group(2))
    for side, value in (("width", width), ("height", height)):
        if value % SIZE_STEP:
            raise invalid(f"size {size!r}: the {side} {value} is not a multiple of {SIZE_STEP}", "size",
                          code="invalid_size")
        if not SIZE_STEP <= value <= MAX_SIDE:
            raise invalid(f"size {size!r}: the {side} {value} is outside {SIZE_STEP}..{MAX_SIDE}", "size",
                          code="invalid_size")
    return width, height


def _api_message(exc: LaVITError) -> APIError:
    """A library message about CLI flags, in the request's field names (the first one named is the param)."""
    message, found = str(exc), []
    for flag, name in _FIELDS.items():
        pattern = re.compile(rf"(?<![\w-]){re.escape(flag)}(?![\w-])")
        match = pattern.search(message)
        if match:
            found.append((match.start(), name))
            message = pattern.sub(name, message)
    return invalid(message, min(found)[1] if found else None)


def generation(model, body: ImageRequest, folder: Path) -> Generation:
    """An image request -> checked, resolved settings; prompt images are written to `folder`
    (removed by the caller once the job is over)."""
    config = model.config
    if body.response_format not in (None, "b64_json"):
        raise invalid(f"response_format {body.response_format!r}: this server keeps no files, so images come "
                      "back in the body; use 'b64_json'", "response_format")
    if body.stream:
        raise invalid("stream: for progress events use POST /v1/lavit/generate/stream", "stream")
    n = 1 if body.n is None else body.n
    if not 1 <= n <= MAX_IMAGES_PER_REQUEST:
        raise invalid(f"n {n}: expected 1 to {MAX_IMAGES_PER_REQUEST}", "n")
    decoder = body.decoder or "highres"
    if decoder not in ("highres", "lowres"):
        raise invalid(f"decoder {decoder!r}: expected highres or lowres", "decoder")
    pixel = config.highres_pixel if decoder == "highres" else config.lowres_pixel
    if config.llm is None or pixel is None:
        raise invalid(f"this checkpoint cannot generate images with the {decoder} decoder (not converted)",
                      "decoder", code="model_not_capable")
    scheduler = body.scheduler or "ddim"
    if scheduler not in SCHEDULERS:
        raise invalid(f"scheduler {scheduler!r}: expected one of {', '.join(SCHEDULERS)}", "scheduler")
    if body.steps is not None and not 1 <= body.steps <= MAX_STEPS:
        raise invalid(f"steps {body.steps}: expected 1 to {MAX_STEPS}", "steps")
    if body.seed is not None and not 0 <= body.seed <= MAX_SEED:
        raise invalid(f"seed {body.seed}: expected 0 to {MAX_SEED}", "seed")
    width, height = parse_size(body.size, decoder)
    if len(body.images) > MAX_PROMPT_IMAGES:
        raise invalid(f"{len(body.images)} prompt images: at most {MAX_PROMPT_IMAGES}", "images")
    if body.images and config.vision is None:
        raise invalid("this checkpoint has no image encoder: prompt images cannot be read", "images",
                      code="model_not_capable")
    paths, names = [], []
    for i, url in enumerate(body.images):
        data = data_url_bytes(url, f"images[{i}]")
        _, path = read_image(data, f"images[{i}]", folder)
        paths.append(str(path))
        names.append(f"sha256:{path.stem}")
    given = {k: getattr(body, k) for k in ("temperature", "top_k", "top_p", "max_new_tokens", "min_new_tokens")
             if getattr(body, k) is not None}
    try:
        settings = GenerationSettings(
            prompt=body.prompt, images=paths, negative_prompt=body.negative_prompt or None, seed=body.seed,
            num_images=n, decoder=decoder, height=height, width=width, steps=body.steps, guidance=body.guidance,
            llm_guidance=body.llm_guidance, scheduler=scheduler, **given,
        ).resolved()
        prompt_pieces(settings.prompt, settings.images)
    except LaVITError as exc:
        raise _api_message(exc) from None
    # The images' visual tokens are counted by the worker, once the selector has run.
    context = config.llm.max_position_embeddings
    text_tokens = sum(len(model.text_tokenizer.encode(value))
                      for kind, value in prompt_pieces(settings.prompt, settings.images) if kind == "text")
    if text_tokens + 1 + settings.max_new_tokens > context:
        raise invalid(f"the prompt ({text_tokens} tokens) + {settings.max_new_tokens} image tokens exceed the "
                      f"LLM's context of {context} tokens", "prompt", code="context_length_exceeded")
    return Generation(settings, names)


def overlay(body: OverlayBody) -> OverlayRequest:
    if body.seed is not None and not 0 <= body.seed <= MAX_SEED:
        raise invalid(f"seed {body.seed}: expected 0 to {MAX_SEED}", "seed")
    picture, _ = read_image(data_url_bytes(body.image, "image"), "image")
    return OverlayRequest(picture, bool(body.sample), body.seed)
