"""The on-disk training set: the manifest keys the loader reads, pictures that match, atomic writes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from lavit_mlx.errors import LaVITError
from lavit_mlx.shapes import answer_question, caption, render, scenes
from lavit_mlx.shapes.dataset import write_manifest


def read_lines(manifest):
    return [json.loads(line) for line in manifest.read_text().splitlines()]


def test_manifest_lines_name_their_pictures(tmp_path):
    manifest = write_manifest(tmp_path / "set", seed=3, n=12)
    lines = read_lines(manifest)
    world = list(scenes(3, 12))
    captions = [line for line in lines if "text" in line]
    vqa = [line for line in lines if "question" in line]
    assert len(captions) == 12 and len(vqa) >= 3 * 12
    assert {tuple(sorted(line)) for line in captions} == {("image", "num_objects", "text")}
    assert {tuple(sorted(line)) for line in vqa} == {("answer", "image", "num_objects", "question")}
    pictures = sorted({line["image"] for line in lines})
    assert len(pictures) == 12
    for path, scene, line in zip(pictures, world, captions):
        assert not path.startswith("/") and line["image"] == path
        assert line["text"] == caption(scene) and line["num_objects"] == len(scene.objects)
        stored = np.asarray(Image.open(manifest.parent / path))
        assert np.array_equal(stored, np.asarray(render(scene)))
    by_picture = dict(zip(pictures, world))
    for line in vqa:
        assert answer_question(by_picture[line["image"]], line["question"]) == line["answer"]
    assert not [p for p in manifest.parent.rglob(".*")]  # no temporary file left behind


def test_same_seed_same_files_and_kinds_select_lines(tmp_path):
    first = write_manifest(tmp_path / "a", seed=1, n=4)
    again = write_manifest(tmp_path / "b", seed=1, n=4)
    assert first.read_bytes() == again.read_bytes()
    assert (first.parent / "images/000003.png").read_bytes() == (again.parent / "images/000003.png").read_bytes()
    only_captions = read_lines(write_manifest(tmp_path / "c", seed=1, n=4, kinds=("caption",)))
    assert len(only_captions) == 4 and all("text" in line for line in only_captions)
    counts = read_lines(write_manifest(tmp_path / "d", seed=1, n=4, kinds=("vqa",), question_kinds=("count",)))
    assert [line["question"] for line in counts] == ["how many shapes are there?"] * 4
    with pytest.raises(LaVITError):
        write_manifest(tmp_path / "e", seed=1, n=4, kinds=("captions",))
