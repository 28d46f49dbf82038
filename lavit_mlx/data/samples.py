"""What a shard yields: raw records (cheap, buffered) and decoded samples (handed out).

A `Record` holds what a manifest line or a tar sample says, with the image still a path
or encoded bytes, so the shuffle buffer costs no decoded pixels. `decode` turns it into a
`Sample` with the image opened by the project's loader (`image_processing.load_image`:
EXIF orientation, alpha on white, 16-bit scaling, size limit). Problems that make a sample
unusable are returned as a reason string instead of raised: the stream counts and skips.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from PIL import Image

from ..errors import ImageError
from ..image_processing import load_image

# Reasons a sample is skipped; the keys of `DataStream.stats` besides "samples".
MISSING_FIELD = "missing_field"  # no image, or no caption / question+answer
EMPTY_TEXT = "empty_text"  # caption, question or answer is blank
NO_IMAGE = "no_image"  # a tar sample without an image member
BAD_METADATA = "bad_metadata"  # a tar sample's .json is not JSON or its .txt not UTF-8
MISSING_IMAGE = "missing_image"  # the manifest names an image file that does not exist
BAD_IMAGE = "bad_image"  # the image does not decode (corrupt, truncated, too large)
FILTERED = "filtered"  # the transform returned None

TEXT_FIELDS = ("text", "question", "answer")


@dataclass(slots=True)
class Record:
    """A sample before decoding: `image` is a file path or the encoded bytes from a tar."""

    key: str
    image: Union[str, bytes]
    image_name: str
    text: Optional[str] = None
    question: Optional[str] = None
    answer: Optional[str] = None
    meta: dict = field(default_factory=dict)


@dataclass
class Sample:
    """One training sample.

    Attributes:
        key: the sample's key (the tar key, or a manifest line's "key", else shard/index).
        image: the RGB image (PIL), decoded when the sample is handed out.
        text: the caption (caption data), else None.
        question, answer: the VQA pair (VQA data), else None.
        meta: every other key of the manifest line or of the tar sample's .json.
        shard: the id of the shard it came from; index: its position in that shard.
    """

    key: str
    image: Optional[Image.Image]
    text: Optional[str]
    question: Optional[str]
    answer: Optional[str]
    meta: dict
    shard: str
    index: int


def record_from_fields(fields: dict[str, Any], key: str, image: Union[str, bytes, None],
                       image_name: str, meta: dict) -> Union[Record, str]:
    """A record from caption or VQA fields, or the reason it is unusable.

    VQA if a "question" or "answer" is present (both are then needed, a "text" is kept if
    there is one), else caption.
    """
    if image is None or (isinstance(image, str) and not image):
        return MISSING_FIELD
    if "question" in fields or "answer" in fields:
        wanted = ("question", "answer")
    else:
        wanted = ("text",)
    values = {}
    for name in wanted:
        value = fields.get(name)
        if not isinstance(value, str):
            return MISSING_FIELD
        if not value.strip():
            return EMPTY_TEXT
        values[name] = value.strip()
    text = fields.get("text")
    if "text" not in values and isinstance(text, str) and text.strip():
        values["text"] = text.strip()
    return Record(key=key, image=image, image_name=image_name, meta=meta, **values)


def _open_bytes(data: bytes, name: str) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # load_image checks the size from the header itself, with the project's limit.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
        image = load_image(image)
        image.load()  # decode now, so a truncated stream fails here and not in the trainer
        return image
    except Image.DecompressionBombError:
        raise ImageError(f"{name}: image is too large") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"{name}: not an image, truncated or corrupt ({exc})") from None


def decode(record: Record, shard: str, index: int, load: bool = True) -> Union[Sample, str]:
    """The `Sample` of a record with its image decoded (unless not `load`), or why it cannot be."""
    try:
        if not load:
            image = None
        elif isinstance(record.image, bytes):
            image = _open_bytes(record.image, record.image_name)
        elif not os.path.isfile(record.image):
            return MISSING_IMAGE
        else:
            image = load_image(record.image)
    except ImageError:
        return BAD_IMAGE
    return Sample(key=record.key, image=image, text=record.text, question=record.question,
                  answer=record.answer, meta=record.meta, shard=shard, index=index)
