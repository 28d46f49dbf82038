"""Finding the shards of a data set and indexing them once.

Sources are JSONL manifests (``.jsonl``/``.json``, cut into virtual shards of
`lines_per_shard` samples) and tar shards (``.tar``, ``.tar.gz``, one shard each), given
as paths, brace patterns (``data/{00000..00009}.tar``, ``{train,extra}.jsonl``) or globs.
The index (every shard's length, and where a virtual shard starts in its file) is counted
once and kept in the cursor; a file whose size changed since is refused, as its cursor
would point at other samples.
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence, Union

from ..errors import LaVITError
from .jsonl import index_jsonl, read_jsonl
from .samples import Record
from .tar import index_tar, read_tar

Source = Union[str, os.PathLike]

_BRACE = re.compile(r"\{([^{}]*)\}")
_NUMERIC_RANGE = re.compile(r"(-?\d+)\.\.(-?\d+)")
_KINDS = {".jsonl": "jsonl", ".json": "jsonl", ".tar": "tar", ".tgz": "tar", ".tar.gz": "tar"}


def expand_braces(pattern: str) -> list[str]:
    """Expand ``{a..b}`` (zero-padded as written) and ``{x,y}`` parts, left to right.

    A brace pair that is neither stays as it is.
    """
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    head, body, rest = pattern[: match.start()], match.group(1), pattern[match.end():]
    numeric = _NUMERIC_RANGE.fullmatch(body)
    if numeric:
        first, last = numeric.groups()
        digits = [n.lstrip("-") for n in (first, last)]
        padded = any(len(d) > 1 and d.startswith("0") for d in digits)
        width = max(len(first), len(last)) if padded else 0
        step = 1 if int(last) >= int(first) else -1
        items = [f"{n:0{width}d}" for n in range(int(first), int(last) + step, step)]
    elif "," in body:
        items = body.split(",")
    else:
        return [head + "{" + body + "}" + tail for tail in expand_braces(rest)]
    return [head + item + tail for item in items for tail in expand_braces(rest)]


def _kind(path: str) -> str:
    name = path.lower()
    for suffix in sorted(_KINDS, key=len, reverse=True):
        if name.endswith(suffix):
            return _KINDS[suffix]
    raise LaVITError(f"{path}: not a data source (want a .jsonl manifest or .tar shards)")


@dataclass
class ShardFiles:
    """The files of a data set: absolute paths, and stable names relative to their common folder."""

    paths: list[str]
    names: list[str]
    kinds: list[str]

    def sizes(self) -> list[int]:
        return [os.path.getsize(p) for p in self.paths]


def find_files(sources: Union[Source, Sequence[Source]]) -> ShardFiles:
    """The files named by `sources`, in the order given; missing ones are a one-line error."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    paths: list[str] = []
    for source in sources:
        for pattern in expand_braces(os.fspath(source)):
            pattern = os.path.expanduser(pattern)
            if os.path.exists(pattern) or not glob.has_magic(pattern):
                matches = [pattern]
            else:
                matches = sorted(glob.glob(pattern))
                if not matches:
                    raise LaVITError(f"{pattern}: matches no file")
            for path in matches:
                if not os.path.exists(path):
                    raise LaVITError(f"{path}: no such file")
                if os.path.isdir(path):
                    raise LaVITError(
                        f"{path}: is a folder; name its files (e.g. {path}/{{00000..00009}}.tar)"
                    )
                paths.append(os.path.abspath(path))
    if not paths:
        raise LaVITError("no data sources given")
    if len(set(paths)) != len(paths):
        duplicate = next(p for p in paths if paths.count(p) > 1)
        raise LaVITError(f"{duplicate}: given twice")
    # Names relative to the common folder, so that a cursor survives moving the data set.
    root = os.path.commonpath([os.path.dirname(p) for p in paths])
    names = [Path(os.path.relpath(p, root)).as_posix() for p in paths]
    return ShardFiles(paths=paths, names=names, kinds=[_kind(p) for p in paths])


@dataclass
class DataIndex:
    """Every shard of a data set: its file, first sample, byte offset and length."""

    files: list[str]
    kinds: list[str]
    sizes: list[int]
    shard_file: list[int]
    starts: list[int]
    offsets: list[int]
    lengths: list[int]

    def shard_id(self, pos: int) -> str:
        """Tar shards by file name; manifest shards as ``name@first_sample``."""
        number = self.shard_file[pos]
        if self.kinds[number] == "tar":
            return self.files[number]
        return f"{self.files[number]}@{self.starts[pos]}"

    def to_state(self) -> dict:
        return {
            "files": [[n, k, s] for n, k, s in zip(self.files, self.kinds, self.sizes)],
            "lengths": list(self.lengths),
            "shards": [[f, s, o] for f, s, o in zip(self.shard_file, self.starts, self.offsets)],
        }

    @classmethod
    def from_state(cls, state: dict) -> "DataIndex":
        files, shards = state["files"], state["shards"]
        return cls(files=[f[0] for f in files], kinds=[f[1] for f in files],
                   sizes=[f[2] for f in files], shard_file=[s[0] for s in shards],
                   starts=[s[1] for s in shards], offsets=[s[2] for s in shards],
                   lengths=list(state["lengths"]))

    def check_files(self, files: ShardFiles) -> None:
        """Refuse to apply this (saved) index to other or changed files."""
        if files.names != self.files:
            raise LaVITError(
                f"the data sources ({len(files.names)} files, first {files.names[0]}) are not "
                f"the indexed ones ({len(self.files)} files, first {self.files[0]})"
            )
        for path, size in zip(files.paths, self.sizes):
            if os.path.getsize(path) != size:
                raise LaVITError(
                    f"{path}: changed since it was indexed or checkpointed ({size} bytes then, "
                    f"{os.path.getsize(path)} now); its index and data cursor no longer apply"
                )


def build_index(files: ShardFiles, lines_per_shard: int) -> DataIndex:
    """Count every shard (one pass over each manifest, one header scan of each tar)."""
    index = DataIndex(files=files.names, kinds=files.kinds, sizes=files.sizes(),
                      shard_file=[], starts=[], offsets=[], lengths=[])
    for number, (path, kind) in enumerate(zip(files.paths, files.kinds)):
        if kind == "jsonl":
            pieces = index_jsonl(path, lines_per_shard)
        else:
            pieces = [(0, 0, index_tar(path))]
        for start, offset, length in pieces:
            index.shard_file.append(number)
            index.starts.append(start)
            index.offsets.append(offset)
            index.lengths.append(length)
    return index


def read_shard(files: ShardFiles, index: DataIndex, pos: int,
               wanted: Iterator[int]) -> Iterator[tuple[int, Union[Record, str]]]:
    """Stream shard `pos`'s records at the increasing indices `wanted`."""
    number = index.shard_file[pos]
    path = files.paths[number]
    if index.kinds[number] == "tar":
        return read_tar(path, wanted)
    return read_jsonl(path, index.offsets[pos], index.lengths[pos], wanted, index.shard_id(pos))
