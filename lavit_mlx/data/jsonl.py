"""JSONL manifests: one JSON object per line, read as virtual shards of N lines.

Caption lines are ``{"image": path, "text": caption}``, VQA lines
``{"image": path, "question": q, "answer": a}``; image paths are relative to the
manifest's folder; every other key goes to `Sample.meta`. Blank lines are ignored and do
not count as samples.

The index pass parses every line once, so a file that is not JSONL fails at the start of
training with its line number rather than hours in; it records the byte offset where each
virtual shard starts, so that reading a shard seeks straight to it.
"""

from __future__ import annotations

import json
import os
from typing import Iterator, Union

from ..errors import LaVITError
from .samples import TEXT_FIELDS, Record, record_from_fields

_NOT_META = ("image", "key", *TEXT_FIELDS)


def _parse(raw: bytes, where: str) -> dict:
    """One manifest line as a dict; `where` ("file, line 3") starts the error message."""
    try:
        value = json.loads(raw)
    except UnicodeDecodeError:
        raise LaVITError(f"{where}: not UTF-8 text; a manifest is JSONL") from None
    except json.JSONDecodeError as exc:
        raise LaVITError(
            f"{where}: not JSON ({exc.msg}); a manifest has one JSON object per line"
        ) from None
    if not isinstance(value, dict):
        raise LaVITError(
            f"{where}: a JSON {type(value).__name__}, not an object; "
            "a manifest has one JSON object per line"
        )
    return value


def index_jsonl(path: str, lines_per_shard: int) -> list[tuple[int, int, int]]:
    """Validate a manifest and cut it into shards: [(first sample, byte offset, length)]."""
    shards: list[list[int]] = []
    offset, count = 0, 0
    try:
        with open(path, "rb") as lines:
            for line_no, raw in enumerate(lines, start=1):
                if raw.strip():
                    _parse(raw, f"{path}, line {line_no}")
                    if count % lines_per_shard == 0:
                        shards.append([count, offset, 0])
                    shards[-1][2] += 1
                    count += 1
                offset += len(raw)
    except OSError as exc:
        raise LaVITError(f"{path}: cannot read the manifest ({exc.strerror or exc})") from None
    return [tuple(s) for s in shards]


def read_jsonl(path: str, offset: int, length: int, wanted: Iterator[int],
               shard_id: str) -> Iterator[tuple[int, Union[Record, str]]]:
    """The records of one virtual shard at the indices `wanted` (increasing), streamed."""
    folder = os.path.dirname(os.path.abspath(path))
    target = next(wanted, None)
    if target is None:
        return
    index = 0
    with open(path, "rb") as lines:
        lines.seek(offset)
        for raw in lines:
            if not raw.strip():
                continue
            if index == target:
                # The line number is unknown after a seek; the index pass checked the line.
                fields = _parse(raw, f"{path}, sample {index} of shard {shard_id}")
                yield index, _record(fields, folder, shard_id, index)
                target = next(wanted, None)
                if target is None:
                    return
            index += 1
            if index >= length:
                return


def _record(fields: dict, folder: str, shard_id: str, index: int) -> Union[Record, str]:
    image = fields.get("image")
    if isinstance(image, str) and image:
        image = os.path.join(folder, image)  # absolute paths stay as they are
    elif image is not None:
        image = ""  # a number or a list is not a path
    key = fields.get("key")
    key = str(key) if key is not None else f"{shard_id}/{index}"
    meta = {k: v for k, v in fields.items() if k not in _NOT_META}
    return record_from_fields(fields, key, image, str(image), meta)
