"""Request bodies (pydantic) and response bodies of the OpenAI-compatible API.

Requests follow OpenAI's chat completions and image generations; unknown fields are
ignored, as clients send many. LaVIT's own options (`num_beams`, `sample_tokens`,
`steps`, `guidance`, `scheduler`, prompt `images`, ...) are extra body fields
(`extra_body=` in the openai package). Responses are plain dicts in OpenAI's shapes,
with LaVIT's facts under a `lavit` key that clients ignore.
"""

from __future__ import annotations

import time
import uuid
from typing import List, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from .. import __version__

FINGERPRINT = f"lavit-mlx-{__version__}"


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ImageURL(_Body):
    url: str
    detail: Optional[str] = None


class ContentPart(_Body):
    type: str
    text: Optional[str] = None
    image_url: Optional[Union[ImageURL, str]] = None


class Message(_Body):
    role: str
    content: Optional[Union[str, List[ContentPart]]] = None


class StreamOptions(_Body):
    include_usage: bool = False


class ChatRequest(_Body):
    messages: List[Message] = Field(min_length=1)
    model: Optional[str] = None
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    seed: Optional[int] = None
    n: Optional[int] = 1
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    # LaVIT extras
    num_beams: Optional[int] = None  # default: the release's (2 for captions, 5 for answers)
    min_tokens: Optional[int] = None  # default: the release's (8 / 2), at most max_tokens
    sample_tokens: Optional[bool] = False  # sample the visual token selection, as the release does


class ImageRequest(_Body):
    prompt: str = ""
    model: Optional[str] = None
    n: Optional[int] = 1
    size: Optional[str] = None  # "WxH" (multiples of 8) or "auto"
    response_format: Optional[str] = None  # only "b64_json"
    stream: Optional[bool] = False
    # LaVIT extras
    images: List[str] = Field(default_factory=list)  # data URLs; "<image>" in the prompt marks each
    negative_prompt: Optional[str] = None
    seed: Optional[int] = None
    steps: Optional[int] = None
    guidance: Optional[float] = None
    llm_guidance: Optional[float] = None
    scheduler: Optional[str] = None
    decoder: Optional[str] = None
    temperature: Optional[float] = None
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    max_new_tokens: Optional[int] = None  # image tokens
    min_new_tokens: Optional[int] = None


class OverlayBody(_Body):
    image: str  # a data URL
    sample: Optional[bool] = False
    seed: Optional[int] = None


# ----------------------------------------------------------------------------- responses
def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_completion(ident: str, model: str, text: str, finish_reason: str, counts: dict, lavit: dict) -> dict:
    return {
        "id": ident, "object": "chat.completion", "created": int(time.time()), "model": model,
        "system_fingerprint": FINGERPRINT,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                     "finish_reason": finish_reason}],
        "usage": counts, "lavit": lavit,
    }


def chat_chunk(ident: str, model: str, delta: Optional[dict], finish_reason: Optional[str] = None,
               counts: Optional[dict] = None) -> dict:
    """A `chat.completion.chunk`; with `counts` the usage chunk (no choices)."""
    chunk = {"id": ident, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
             "system_fingerprint": FINGERPRINT, "choices": []}
    if delta is not None:
        chunk["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
    if counts is not None:
        chunk["usage"] = counts
    return chunk


def images_response(pictures: List[str], lavit: dict) -> dict:
    return {"created": int(time.time()), "data": [{"b64_json": b64, "revised_prompt": None} for b64 in pictures],
            "lavit": lavit}


def model_card(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "lavit-mlx"}
