"""Reading manifests and tar shards: fields, skipped samples and one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from support.data_builders import (caption_manifest, image_bytes, img2dataset_shard, write_manifest,
                           write_tar)

from lavit_mlx.data import DataStream, expand_braces
from lavit_mlx.errors import LaVITError


def one_line_error(excinfo, *parts: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, message


def in_order(source, **options):
    """Every sample of one epoch in file order (no shuffling)."""
    stream = DataStream(source, shuffle_buffer=1, shuffle_shards=False, epochs=1, **options)
    return list(stream), stream


def test_brace_patterns():
    assert expand_braces("d/{00000..00002}.tar") == ["d/00000.tar", "d/00001.tar", "d/00002.tar"]
    assert expand_braces("{8..10}") == ["8", "9", "10"]
    assert expand_braces("{a,b}-{1..2}.jsonl") == [
        "a-1.jsonl", "a-2.jsonl", "b-1.jsonl", "b-2.jsonl"]
    assert expand_braces("odd{name}.tar") == ["odd{name}.tar"]


def test_caption_and_vqa_manifest_fields(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(image_bytes(1, size=(5, 3)))
    absolute = tmp_path / "img" / "b.png"
    absolute.write_bytes(image_bytes(2))
    manifest = write_manifest(tmp_path / "sub", [
        {"image": "../img/a.png", "text": " a red square ", "num_objects": 2, "key": "k1"},
        "",  # blank lines are not samples
        {"image": str(absolute), "question": "What colour?", "answer": "blue", "split": "val"},
        {"image": "../img/a.png", "question": "Shape?", "answer": "square", "text": "a caption"},
    ])
    samples, stream = in_order(manifest)
    assert stream.epoch_length() == 3
    caption, vqa, both = samples
    assert (caption.key, caption.text, caption.meta) == ("k1", "a red square", {"num_objects": 2})
    assert caption.image.size == (5, 3) and caption.image.mode == "RGB"
    assert (caption.question, caption.answer) == (None, None)
    assert (vqa.question, vqa.answer, vqa.text, vqa.meta) == ("What colour?", "blue", None,
                                                              {"split": "val"})
    assert vqa.key == "train.jsonl@0/1" and (vqa.shard, vqa.index) == ("train.jsonl@0", 1)
    assert (both.question, both.answer, both.text) == ("Shape?", "square", "a caption")


def test_tar_shards_in_img2dataset_layout(tar_shards):
    samples, stream = in_order(tar_shards)
    assert stream.shard_ids == ["00000.tar", "00001.tar"]
    assert stream.epoch_length() == 19  # 9 + 9 + the stray member
    assert len(samples) == 18 and stream.stats == {"samples": 18, "no_image": 1}
    first = samples[0]
    assert first.key == "000000000" and first.text == "shard 0 image 0"
    assert first.meta["url"] == "http://x/000000000.jpg" and first.image.size == (8, 6)
    assert [s.key for s in samples[9:11]] == ["000010000", "000010001"]


def test_tar_vqa_from_json_and_caption_fallback(tmp_path):
    path = write_tar(tmp_path / "vqa.tar", [
        ("q1.png", image_bytes(1)), ("q1.json", b'{"question": "How many?", "answer": "2"}'),
        ("c1.webp", image_bytes(2, "WEBP")), ("c1.json", b'{"caption": "from json"}'),
        ("dir/x.jpeg", image_bytes(3, "JPEG")), ("dir/x.txt", b"in a folder"),
    ])
    samples, _ = in_order(path)
    assert [(s.key, s.question, s.answer, s.text) for s in samples] == [
        ("q1", "How many?", "2", None), ("c1", None, None, "from json"),
        ("dir/x", None, None, "in a folder")]


def test_bad_samples_are_skipped_and_counted(tmp_path):
    folder = tmp_path / "m"
    (folder / "img").mkdir(parents=True)
    (folder / "img" / "ok.png").write_bytes(image_bytes(0))
    (folder / "img" / "corrupt.png").write_bytes(image_bytes(0)[:40])  # a cut-off PNG
    (folder / "img" / "empty.png").write_bytes(b"")
    manifest = write_manifest(folder, [
        {"image": "img/ok.png", "text": "good 1"},
        {"image": "img/corrupt.png", "text": "corrupt"},
        {"image": "img/empty.png", "text": "empty file"},
        {"image": "img/gone.png", "text": "missing file"},
        {"image": "img/ok.png", "text": "   "},
        {"image": "img/ok.png", "question": "q?", "answer": ""},
        {"image": "img/ok.png"},
        {"text": "no image key"},
        {"image": "img/ok.png", "text": "good 2"},
    ])
    shard = write_tar(tmp_path / "t" / "00000.tar", [
        ("a.jpg", image_bytes(1, "JPEG")), ("a.txt", b"good 3"),
        ("stray.txt", b"a caption without its image"),
        ("b.png", b"\x89PNG\r\n\x1a\n garbage"), ("b.txt", b"bad png"),
        ("c.jpg", image_bytes(2, "JPEG")), ("c.json", b"{not json"),
        ("d.jpg", image_bytes(3, "JPEG")), ("d.txt", b""),
        ("e.jpg", image_bytes(4, "JPEG")), ("e.txt", b"good 4"),
    ])
    samples, stream = in_order([manifest, shard])
    assert [s.text for s in samples] == ["good 1", "good 2", "good 3", "good 4"]
    assert stream.stats == {"samples": 4, "bad_image": 3, "missing_image": 1, "empty_text": 3,
                            "missing_field": 2, "no_image": 1, "bad_metadata": 1}


def test_transform_result_is_yielded_and_none_filters(tmp_path):
    manifest = caption_manifest(tmp_path, 6)
    samples, stream = in_order(
        manifest, transform=lambda s: None if s.index % 2 else (s.text, s.image.size))
    assert samples == [("caption 0", (8, 6)), ("caption 2", (8, 6)), ("caption 4", (8, 6))]
    assert stream.stats == {"samples": 3, "filtered": 3}


def test_missing_and_non_jsonl_manifest_are_one_line_errors(tmp_path):
    with pytest.raises(LaVITError) as excinfo:
        DataStream(tmp_path / "nope.jsonl")
    one_line_error(excinfo, "nope.jsonl", "no such file")
    bad = write_manifest(tmp_path, [{"image": "a", "text": "b"}, {"image": "c", "text": "d"},
                                    "{'single': 'quotes'}", "[1, 2]"], name="bad.jsonl")
    with pytest.raises(LaVITError) as excinfo:
        DataStream(bad).epoch_length()
    one_line_error(excinfo, str(bad), "line 3", "not JSON")
    listed = write_manifest(tmp_path, [{"image": "a", "text": "b"}, "[1, 2]"], name="list.jsonl")
    with pytest.raises(LaVITError) as excinfo:
        next(iter(DataStream(listed)))
    one_line_error(excinfo, "list.jsonl", "line 2", "not an object")


def test_bad_source_paths_are_one_line_errors(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "notes.csv").write_text("a,b\n")
    cases = [(tmp_path / "folder", "is a folder"), (tmp_path / "notes.csv", "not a data source"),
             (str(tmp_path / "{00000..00001}.tar"), "no such file"),
             (str(tmp_path / "*.tar"), "matches no file")]
    for source, words in cases:
        with pytest.raises(LaVITError) as excinfo:
            DataStream(source)
        one_line_error(excinfo, words)


def test_non_tar_and_empty_data_are_one_line_errors(tmp_path):
    fake = tmp_path / "00000.tar"
    fake.write_bytes(image_bytes(0) * 20)
    with pytest.raises(LaVITError) as excinfo:
        DataStream(fake).epoch_length()
    one_line_error(excinfo, str(fake), "not a tar file")
    whole = img2dataset_shard(tmp_path / "cut", 0, 5).read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(LaVITError) as excinfo:
        DataStream(cut).epoch_length()
    one_line_error(excinfo, str(cut), "truncated or corrupt tar")
    empty = write_manifest(tmp_path, [], name="empty.jsonl")
    with pytest.raises(LaVITError) as excinfo:
        next(iter(DataStream(empty)))
    one_line_error(excinfo, "no samples")


def test_parquet_beside_the_tars_is_not_read(tmp_path):
    img2dataset_shard(tmp_path, 0, 3)
    samples, stream = in_order(str(tmp_path / "*.tar"))
    assert stream.shard_ids == ["00000.tar"] and len(samples) == 3


def test_package_imports_without_mlx_or_torch():
    code = ("import sys, lavit_mlx.data, lavit_mlx.data.tuner; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('mlx', 'torch')]; "
            "assert not bad, bad")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
