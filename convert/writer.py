"""Writing checkpoint folders safely: a temporary sibling folder renamed when complete,
sharded safetensors, and a checksummed manifest.

The output path only ever appears complete. An interrupted conversion (an error,
Ctrl-C, SIGTERM) removes its temporary folder. A conversion killed outright (SIGKILL,
power loss) cannot clean up: its folder `.lavit-partial-OUT-PID-*` stays beside OUT,
named with the process id, and the next conversion into the same parent folder removes
every such folder whose process is gone. `--force` replaces an existing output only
after the new one is complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator

import mlx.core as mx

from lavit_mlx.checkpoint import sha256
from lavit_mlx.errors import LaVITError
from lavit_mlx.layout import MAX_SHARD_BYTES

PARTIAL_PREFIX = ".lavit-partial-"


def check_destination(out: Path, force: bool) -> None:
    """Refuse to overwrite without --force, and fail before any work on a bad path."""
    out = Path(out)
    if out.exists() and not force:
        raise LaVITError(f"{out} already exists (use --force to replace it)")
    parent = out.parent if str(out.parent) else Path(".")
    existing = parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent  # missing folders above `out` are created when writing
    if not existing.is_dir():
        raise LaVITError(f"cannot write {out}: {existing} is not a folder")
    if not os.access(existing, os.W_OK):
        raise LaVITError(f"cannot write {out}: no write permission in {existing}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def remove_stale_partials(parent: Path) -> list:
    """Remove `.lavit-partial-*-PID-*` folders in `parent` whose process has ended
    (left by a conversion that was killed); returns the removed paths."""
    removed = []
    for stale in Path(parent).glob(f"{PARTIAL_PREFIX}*"):
        found = re.search(r"-(\d+)-[^-]+$", stale.name)
        if stale.is_dir() and found and not _alive(int(found.group(1))):
            shutil.rmtree(stale, ignore_errors=True)
            removed.append(stale)
    return removed


@contextmanager
def interruptible():
    """Turn SIGTERM into KeyboardInterrupt for the duration, so that `kill` cleans up as
    Ctrl-C does (the temporary folder is removed) instead of leaving it behind."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum, frame):
        raise KeyboardInterrupt("terminated")

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def staged_folder(out: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary folder next to `out`; on success it becomes `out`."""
    out = Path(out)
    check_destination(out, force)
    parent = out.parent if str(out.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(parent)
    staging = Path(tempfile.mkdtemp(prefix=f"{PARTIAL_PREFIX}{out.name}-{os.getpid()}-", dir=parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary folder
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f"{PARTIAL_PREFIX}{out.name}-old-{os.getpid()}-", dir=parent))
        os.rename(out, old / out.name)
        os.rename(staging, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(staging, out)


def nbytes(array: mx.array) -> int:
    return array.size * array.dtype.size


class ShardWriter:
    """Accumulate tensors and write `stem.safetensors`, or `stem-0000i-of-0000n.safetensors`
    plus `stem.safetensors.index.json` once the total passes the shard size."""

    def __init__(self, folder: Path, stem: str, max_bytes: int = MAX_SHARD_BYTES, metadata: dict | None = None):
        self.folder, self.stem, self.max_bytes = Path(folder), stem, max_bytes
        self.metadata = metadata or {"format": "mlx"}
        self.buffer: Dict[str, mx.array] = {}
        self.buffer_bytes = 0
        self.parts: list = []  # (temporary file, keys)
        self.total = 0

    def add(self, key: str, array: mx.array) -> None:
        self.add_group({key: array})

    def add_group(self, arrays: Dict[str, mx.array]) -> None:
        """Add tensors that must land in the same shard (a quantized layer's parts)."""
        size = sum(nbytes(a) for a in arrays.values())
        if self.buffer and self.buffer_bytes + size > self.max_bytes:
            self.flush()
        self.buffer.update(arrays)
        self.buffer_bytes += size
        self.total += size

    def flush(self) -> None:
        if not self.buffer:
            return
        path = self.folder / f"{self.stem}.part{len(self.parts)}.safetensors"
        mx.save_safetensors(str(path), self.buffer, metadata=self.metadata)
        self.parts.append((path, list(self.buffer)))
        self.buffer, self.buffer_bytes = {}, 0

    def close(self) -> list:
        """Write out everything; returns the file names written."""
        self.flush()
        if len(self.parts) <= 1:
            name = f"{self.stem}.safetensors"
            if self.parts:
                os.rename(self.parts[0][0], self.folder / name)
            else:
                mx.save_safetensors(str(self.folder / name), {}, metadata=self.metadata)
            return [name]
        count = len(self.parts)
        weight_map, names = {}, []
        for i, (path, keys) in enumerate(self.parts, start=1):
            name = f"{self.stem}-{i:05d}-of-{count:05d}.safetensors"
            os.rename(path, self.folder / name)
            names.append(name)
            weight_map.update({k: name for k in keys})
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        index_name = f"{self.stem}.safetensors.index.json"
        (self.folder / index_name).write_text(json.dumps(index, indent=2, sort_keys=True))
        return names + [index_name]


def write_manifest(folder: Path, name: str = "manifest.json") -> Path:
    """A sha256 and size of every file in `folder` (except the manifest itself)."""
    folder = Path(folder)
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != name):
        files[str(path.relative_to(folder))] = {"bytes": path.stat().st_size, "sha256": sha256(path)}
    manifest = folder / name
    manifest.write_text(json.dumps({"files": files}, indent=2))
    return manifest


def copy_files(src: Path, dst: Path) -> None:
    """Copy a folder's files (contents only: no permissions, which may be read-only)."""
    for path in Path(src).rglob("*"):
        target = Path(dst) / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
