"""A shapes-world training set on disk: PNGs and one JSONL manifest.

Each manifest line names a picture by its path relative to the manifest's folder, and is
either a caption example or a VQA example (the keys the streaming loader reads):

    {"image": "images/000000.png", "text": "a red circle at the top", "num_objects": 1}
    {"image": "images/000000.png", "question": "how many shapes are there?", "answer": "one",
     "num_objects": 1}

Every file is written atomically (a temporary file renamed into place) and the manifest
last, so an interrupted run never leaves a manifest that names a missing picture.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import LaVITError
from .world import QUESTION_KINDS, caption, questions, render, scenes

MANIFEST_FILE = "manifest.jsonl"
IMAGE_FOLDER = "images"
KINDS = ("caption", "vqa")


def write_manifest(out_dir, seed: int, n: int, kinds: Sequence[str] = KINDS,
                   question_kinds: Sequence[str] = QUESTION_KINDS) -> Path:
    """Render `n` scenes under `seed` and write their examples.

    Args:
        out_dir: the folder of the manifest; pictures go to `out_dir/images/`.
        seed: the world seed (the same seed writes the same bytes).
        n: number of scenes (pictures).
        kinds: "caption" (one line per picture) and/or "vqa" (one line per question).
        question_kinds: the question kinds asked of each picture (`world.QUESTION_KINDS`).
    Returns:
        The path of the manifest.
    """
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise LaVITError(f"example kinds must be among {', '.join(KINDS)}, not {', '.join(unknown) or 'none'}")
    out_dir = Path(out_dir)
    (out_dir / IMAGE_FOLDER).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 1])  # questions draw from their own stream
    lines = []
    for index, scene in enumerate(scenes(seed, n)):
        image = f"{IMAGE_FOLDER}/{index:06d}.png"
        png = io.BytesIO()
        render(scene).save(png, format="PNG")
        write_atomic(out_dir / image, png.getvalue())
        count = len(scene.objects)
        if "caption" in kinds:
            lines.append({"image": image, "text": caption(scene), "num_objects": count})
        if "vqa" in kinds:
            for question, answer in questions(scene, rng, question_kinds):
                lines.append({"image": image, "question": question, "answer": answer, "num_objects": count})
    manifest = out_dir / MANIFEST_FILE
    write_atomic(manifest, "".join(json.dumps(line) + "\n" for line in lines).encode())
    return manifest


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder, renamed into place."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp files are private; a data set is not
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
