"""Image loading and the LaVIT image processor (official `models/transform.py`).

Processing matches `LaVITImageProcessor`: PIL bicubic resize to 224x224 (aspect ratio
not kept), scale to [0, 1], CLIP mean/std normalisation, NCHW float32.

Loading goes further than the official `Image.open(path).convert("RGB")` so that every
image a user may hand in gives the picture they see:
- EXIF orientation is applied (a phone photo shot in portrait is read upright);
- transparency (RGBA, LA, P with a transparent colour) is composited on white;
- 16-bit images are scaled to 8 bits instead of being clipped;
- CMYK, greyscale and palette images are converted to RGB;
- animated images (GIF, APNG, WebP) give their first frame.
Oversized images are refused from their header, before any pixel is decoded.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# 100 megapixels: larger than any camera a user owns, far below what would exhaust memory.
MAX_IMAGE_PIXELS = 100_000_000

ImageInput = Union[str, os.PathLike, Image.Image]


def _check_size(width: int, height: int, name: str) -> None:
    if width <= 0 or height <= 0:
        raise ImageError(f"{name}: image has no pixels ({width}x{height})")
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageError(
            f"{name}: image is too large ({width}x{height} = {width * height / 1e6:.0f} MP; "
            f"the limit is {MAX_IMAGE_PIXELS / 1e6:.0f} MP), resize it first"
        )


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        # 16-bit data spans 0..65535; 32-bit "I"/"F" images are scaled by their own range.
        top = 65535.0 if mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        if mode == "F" or (mode == "I" and values.max(initial=0) > 65535):
            top = max(float(values.max(initial=0)), 1e-12)
        values = np.clip(np.round(values / top * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(values, mode="L").convert("RGB")
    if mode == "P":
        image = image.convert("RGBA") if "transparency" in image.info else image.convert("RGB")
        mode = image.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode != "RGB":
        return image.convert("RGB")
    return image


def load_image(source: ImageInput) -> Image.Image:
    """Open an image file (or take a PIL image) and return it as an upright 8-bit RGB image.

    Args:
        source: a path or a `PIL.Image.Image`.

    Returns:
        An RGB `PIL.Image.Image` with pixels loaded.

    Raises:
        ImageError: the file is missing, empty, truncated, not an image, or too large.
    """
    if isinstance(source, Image.Image):
        _check_size(*source.size, name="image")
        return _to_rgb(ImageOps.exif_transpose(source) or source)

    path = Path(source)
    name = str(path)
    if not path.exists():
        raise ImageError(f"{name}: no such file")
    if path.is_dir():
        raise ImageError(f"{name}: is a folder, not an image file")
    if path.stat().st_size == 0:
        raise ImageError(f"{name}: file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            # PIL warns (and above 2x its own limit raises) on huge headers; we check ourselves.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                image = Image.open(path)
            finally:
                Image.MAX_IMAGE_PIXELS = previous
        with image:
            _check_size(*image.size, name=name)
            image.seek(0)  # animated images: the first frame
            image.load()
            upright = ImageOps.exif_transpose(image) or image
            return _to_rgb(upright).copy()
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image, or a format PIL cannot read") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"{name}: truncated or corrupt image ({exc})") from None


def preprocess(images: Sequence[Image.Image], image_size: int = 224) -> np.ndarray:
    """The LaVIT processor on RGB images: bicubic resize, [0, 1], CLIP normalisation.

    Returns:
        float32 array (B, 3, image_size, image_size), NCHW as the official code.
    """
    mean = np.asarray(CLIP_MEAN, dtype=np.float32)[:, None, None]
    std = np.asarray(CLIP_STD, dtype=np.float32)[:, None, None]
    batch = []
    for image in images:
        resized = image.resize((image_size, image_size), resample=Image.BICUBIC)
        pixels = np.asarray(resized, dtype=np.float32).transpose(2, 0, 1) / np.float32(255.0)
        batch.append((pixels - mean) / std)
    return np.stack(batch).astype(np.float32)


def load_images(sources: Iterable[ImageInput], image_size: int = 224) -> np.ndarray:
    """`load_image` then `preprocess` on each source: (B, 3, H, W) float32."""
    return preprocess([load_image(s) for s in sources], image_size)


def source_name(source: ImageInput) -> Optional[str]:
    """The path of an image given by path, None for an in-memory image."""
    return None if isinstance(source, Image.Image) else str(source)


def load_or_error(source: ImageInput, skip_bad: bool):
    """(image, None), or (None, message) for an image that cannot be read when `skip_bad`."""
    try:
        return load_image(source), None
    except ImageError as exc:
        if not skip_bad:
            raise
        return None, str(exc)
