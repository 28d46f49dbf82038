"""WebDataset tar shards in img2dataset's layout, read with Python's `tarfile`.

A sample is the run of consecutive members that share a key (the member name up to the
first dot of its base name): ``KEY.jpg|jpeg|png|webp`` the image, ``KEY.txt`` the caption,
``KEY.json`` the metadata (img2dataset's url, size, status...; a "question" and "answer"
there make a VQA sample, and its "caption" stands in for a missing .txt). Other members
of a sample are ignored; a run without an image (a stray member) is a skipped sample.
The ``.parquet`` and ``_stats.json`` img2dataset writes beside each tar are not read.

The `webdataset` package is not used: its reader has no per-shard cursor to resume from,
and the parts needed here (brace patterns, grouping members by key) are a few lines.
"""

from __future__ import annotations

import json
import posixpath
import tarfile
from typing import Iterator, Union

from ..errors import LaVITError
from .samples import BAD_METADATA, NO_IMAGE, Record, record_from_fields

# In order of preference when a sample has several.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def _reason(exc: Exception) -> str:
    """The first line of an exception's text (tarfile's can span several)."""
    return (str(exc).splitlines() or [type(exc).__name__])[0]


def _open(path: str) -> tarfile.TarFile:
    # Seekable mode: skipping a sample seeks over its data instead of reading it.
    mode = "r:gz" if path.lower().endswith((".gz", ".tgz")) else "r:"
    try:
        return tarfile.open(path, mode=mode)
    except (tarfile.TarError, OSError) as exc:
        raise LaVITError(f"{path}: not a tar file ({_reason(exc)})") from None


def _groups(tar: tarfile.TarFile, path: str) -> Iterator[tuple[str, dict[str, tarfile.TarInfo]]]:
    """(key, {extension: member}) for each run of consecutive members sharing a key."""
    key, members = None, {}
    while True:
        try:
            info = tar.next()
        except (tarfile.TarError, OSError) as exc:
            raise LaVITError(f"{path}: truncated or corrupt tar ({_reason(exc)})") from None
        # tarfile keeps every header it has read; a shard has tens of thousands of them.
        tar.members = []
        if info is None:
            break
        if not info.isfile():
            continue
        folder, base = posixpath.split(info.name)
        if base.startswith("."):
            continue  # hidden files, e.g. the "._" resource forks macOS tar adds
        stem, _, extension = base.partition(".")
        member_key = posixpath.join(folder, stem) if folder else stem
        if member_key != key:
            if key is not None:
                yield key, members
            key, members = member_key, {}
        members[extension.lower()] = info
    if key is not None:
        yield key, members


def index_tar(path: str) -> int:
    """The number of samples (key runs, stray ones included) in a tar shard."""
    with _open(path) as tar:
        return sum(1 for _ in _groups(tar, path))


def read_tar(path: str, wanted: Iterator[int]) -> Iterator[tuple[int, Union[Record, str]]]:
    """The records of a tar shard at the indices `wanted` (increasing), streamed."""
    target = next(wanted, None)
    if target is None:
        return
    with _open(path) as tar:
        for index, (key, members) in enumerate(_groups(tar, path)):
            if index == target:
                yield index, _record(tar, path, key, members)
                target = next(wanted, None)
                if target is None:
                    return


def _read(tar: tarfile.TarFile, path: str, info: tarfile.TarInfo) -> bytes:
    try:
        return tar.extractfile(info).read()
    except (tarfile.TarError, OSError) as exc:
        raise LaVITError(
            f"{path}: truncated or corrupt tar at {info.name} ({_reason(exc)})"
        ) from None


def _record(tar: tarfile.TarFile, path: str, key: str,
            members: dict[str, tarfile.TarInfo]) -> Union[Record, str]:
    extension = next((e for e in IMAGE_EXTENSIONS if e in members), None)
    if extension is None:
        return NO_IMAGE
    meta: dict = {}
    if "json" in members:
        try:
            meta = json.loads(_read(tar, path, members["json"]))
        except ValueError:  # JSONDecodeError and UnicodeDecodeError both
            return BAD_METADATA
        if not isinstance(meta, dict):
            return BAD_METADATA
    fields = {name: meta.pop(name) for name in ("question", "answer") if name in meta}
    if "txt" in members:
        try:
            fields["text"] = _read(tar, path, members["txt"]).decode("utf-8")
        except UnicodeDecodeError:
            return BAD_METADATA
    elif "caption" in meta:
        fields["text"] = meta["caption"]
    image = _read(tar, path, members[extension])
    return record_from_fields(fields, key, image, f"{path}:{key}.{extension}", meta)
