"""The report every `lavit eval` writes, and the plain-text table it prints.

A report is one JSON file: the task, its metrics, the model path, a config hash (sha256
of the config dict as canonical JSON: sorted keys, no spaces, UTF-8), the sha256 of each
data file, the settings and the seed. It is written atomically (temporary file in the
same folder, then rename), so a crash never leaves half a report.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

from ..errors import LaVITError

PathLike = Union[str, Path]


def _jsonable(value: Any) -> Any:
    """Plain JSON values: paths as strings, numpy scalars/arrays as numbers/lists, NaN as null."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, (set, frozenset)):
        return sorted(_jsonable(item) for item in value)
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist") and callable(value.tolist):  # numpy scalars and arrays
        return _jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise LaVITError(f"cannot write a {type(value).__name__} into a report: {value!r}")


def canonical_json(value: Any) -> str:
    """The canonical JSON text of `value`: sorted keys, no whitespace, non-ASCII kept."""
    return json.dumps(_jsonable(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False)


def config_hash(config: Mapping[str, Any]) -> str:
    """sha256 (hex) of the config's canonical JSON: equal configs hash equal, whatever the key order."""
    return hashlib.sha256(canonical_json(config).encode("utf-8")).hexdigest()


def file_sha256(path: PathLike) -> str:
    """sha256 (hex) of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:
        raise LaVITError(f"cannot read data file {path}: {exc.strerror or exc}") from None
    return digest.hexdigest()


def build_report(task: str, metrics: Mapping[str, Any], model: Optional[PathLike],
                 config: Mapping[str, Any], data_files: Union[PathLike, Sequence[PathLike]],
                 settings: Mapping[str, Any], seed: Optional[int]) -> Dict[str, Any]:
    """The report of one evaluation run.

    Args:
        task: "caption", "vqa", "t2i", "tokens", ...
        metrics: the scores (any JSON-able nesting).
        model: the model folder (None for model-free checks).
        config: the model's config dict (hashed, not stored).
        data_files: the data file(s) evaluated on (their sha256 is stored).
        settings: the evaluation settings (beams, prompt, split, ...).
        seed: the random seed, or None.

    Returns:
        A JSON-able dict: task, metrics, model, config_sha256, data [{path, sha256}],
        settings, seed, lavit_mlx_version, created (UTC, ISO 8601).
    """
    from .. import __version__

    files = [data_files] if isinstance(data_files, (str, Path)) else list(data_files)
    return {
        "task": task,
        "metrics": _jsonable(metrics),
        "model": None if model is None else str(model),
        "config_sha256": config_hash(config),
        "data": [{"path": str(path), "sha256": file_sha256(path)} for path in files],
        "settings": _jsonable(settings),
        "seed": seed,
        "lavit_mlx_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def write_atomic(path: PathLike, data: bytes, force: bool = False) -> Path:
    """Write bytes to `path` through a temporary file in the same folder and a rename.

    Raises:
        LaVITError: the folder is missing, or the file exists and `force` is False.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise LaVITError(f"cannot write {path}: folder {path.parent} does not exist")
    if path.exists() and not force:
        raise LaVITError(f"{path} already exists (use --force to replace it)")
    try:
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise LaVITError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp files are private; a report is not
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def write_report(report: Mapping[str, Any], path: PathLike, force: bool = False) -> Path:
    """Write a report as indented JSON, atomically; returns the path."""
    text = json.dumps(_jsonable(report), indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    return write_atomic(path, text.encode("utf-8"), force=force)


def _cell(value: Any, float_format: str) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return float_format.format(value)
    return str(value)


def format_table(rows: Sequence[Union[Mapping[str, Any], Sequence[Any]]],
                 headers: Optional[Sequence[str]] = None, float_format: str = "{:.4f}") -> str:
    """A plain-text table: a header, a rule, one line per row; numbers right-aligned.

    Args:
        rows: dicts (columns: their keys in first-seen order, unless `headers` is given)
            or sequences (with `headers`).
        headers: the column names.
        float_format: how floats are written.

    Returns:
        The table, lines joined by newlines (no trailing newline).
    """
    if headers is None:
        headers = []
        for row in rows:
            if not isinstance(row, Mapping):
                raise LaVITError("format_table: rows that are not dicts need headers")
            headers += [key for key in row if key not in headers]
    headers = [str(name) for name in headers]
    values: List[List[Any]] = []
    for row in rows:
        if isinstance(row, Mapping):
            values.append([row.get(name) for name in headers])
        else:
            row = list(row)
            if len(row) != len(headers):
                raise LaVITError(f"format_table: a row has {len(row)} cells for {len(headers)} columns")
            values.append(row)
    cells = [[_cell(value, float_format) for value in row] for row in values]
    numeric = [all(isinstance(row[i], (int, float)) and not isinstance(row[i], bool)
                   for row in values if row[i] is not None) and any(row[i] is not None for row in values)
               for i in range(len(headers))]
    widths = [max([len(headers[i])] + [len(row[i]) for row in cells]) for i in range(len(headers))]

    def line(items: Sequence[str]) -> str:
        return "  ".join(item.rjust(widths[i]) if numeric[i] else item.ljust(widths[i])
                         for i, item in enumerate(items)).rstrip()

    return "\n".join([line(headers), "  ".join("-" * width for width in widths)] + [line(row) for row in cells])
