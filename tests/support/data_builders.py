"""Small data sets written by the data tests: JSONL manifests and img2dataset-style tar shards."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from PIL import Image


def image_bytes(seed: int, fmt: str = "PNG", size: tuple[int, int] = (8, 6)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (seed * 37 % 256, seed * 91 % 256, 50)).save(buffer, format=fmt)
    return buffer.getvalue()


def write_manifest(folder: Path, lines: list, name: str = "train.jsonl") -> Path:
    """A manifest of `lines` (dicts are dumped as JSON, strings written as they are)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    with open(path, "w") as out:
        for line in lines:
            out.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
    return path


def caption_manifest(folder: Path, count: int, name: str = "train.jsonl",
                     shared_image: bool = False) -> Path:
    """`count` caption lines, each with its own 8x6 PNG (or all one PNG)."""
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(count):
        image = "images/shared.png" if shared_image else f"images/{i:05d}.png"
        if not (folder / image).exists():
            (folder / image).write_bytes(image_bytes(i))
        lines.append({"image": image, "text": f"caption {i}", "num_objects": i % 3})
    return write_manifest(folder, lines, name)


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def img2dataset_shard(folder: Path, shard: int, count: int, extra: list | None = None) -> Path:
    """A shard as img2dataset writes it: KEY.jpg, KEY.txt, KEY.json, plus a .parquet beside."""
    members = []
    for i in range(count):
        key = f"{shard:05d}{i:04d}"
        meta = {"key": key, "url": f"http://x/{key}.jpg", "status": "success",
                "caption": f"shard {shard} image {i}", "width": 8, "height": 6}
        members += [(f"{key}.jpg", image_bytes(shard * 100 + i, "JPEG")),
                    (f"{key}.txt", f"shard {shard} image {i}".encode()),
                    (f"{key}.json", json.dumps(meta).encode())]
    members += extra or []
    path = write_tar(folder / f"{shard:05d}.tar", members)
    (folder / f"{shard:05d}.parquet").write_bytes(b"PAR1 not read")
    (folder / f"{shard:05d}_stats.json").write_text("{}")
    return path


def ids(samples) -> list[tuple[str, int]]:
    return [(s.shard, s.index) for s in samples]
