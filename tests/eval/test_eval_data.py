"""Evaluation data readers on tiny files, and every bad-input error naming file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lavit_mlx.errors import LaVITError
from lavit_mlx.eval.data import (
    read_caption_manifest,
    read_coco_captions,
    read_image_manifest,
    read_karpathy,
    read_vqa_manifest,
    read_vqav2,
)


def write_lines(path: Path, *lines) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


@pytest.fixture
def images(tmp_path) -> Path:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in ("a.jpg", "b.jpg"):
        (folder / name).write_bytes(b"not decoded by the readers")
    return folder


def test_caption_manifest_text_captions_labels_and_relative_paths(tmp_path, images):
    absolute = images / "b.jpg"
    manifest = write_lines(
        tmp_path / "captions.jsonl",
        {"image": "imgs/a.jpg", "text": "a cat", "num_objects": 2},
        "",
        {"image": str(absolute), "captions": ["a dog", "a puppy"], "id": "dog"},
    )
    first, second = read_caption_manifest(manifest)
    assert (first.id, first.image, first.captions, first.labels) == (1, images / "a.jpg", ["a cat"], {"num_objects": 2})
    assert (second.id, second.image, second.captions, second.labels) == ("dog", absolute, ["a dog", "a puppy"], {})


def test_vqa_manifest_answer_or_answers(tmp_path, images):
    manifest = write_lines(
        tmp_path / "vqa.jsonl",
        {"image": "imgs/a.jpg", "question": "What is it?", "answer": "cat"},
        {"image": "imgs/b.jpg", "question": "How many?", "answers": ["2", "two"], "question_id": 7,
         "answer_type": "number", "difficulty": "easy"},
    )
    first, second = read_vqa_manifest(manifest)
    assert (first.question_id, first.answers, first.answer_type) == (1, ["cat"], None)
    assert (second.question_id, second.answers, second.answer_type, second.labels) == \
        (7, ["2", "two"], "number", {"difficulty": "easy"})


def test_image_manifest_keeps_label_columns(tmp_path, images):
    manifest = write_lines(tmp_path / "images.jsonl", {"image": "imgs/a.jpg", "num_objects": 3, "scene": "indoor"})
    (record,) = read_image_manifest(manifest)
    assert record.labels == {"num_objects": 3, "scene": "indoor"}


@pytest.mark.parametrize("lines, message", [
    (['{"image": "imgs/a.jpg", "text": "x"}', "{not json"], r"manifest.jsonl:2: not valid JSON"),
    (['["imgs/a.jpg", "x"]'], r"manifest.jsonl:1: expected a JSON object, got list"),
    (['{"text": "x"}'], r"manifest.jsonl:1: missing key 'image'"),
    (['{"image": "imgs/a.jpg"}'], r"manifest.jsonl:1: missing key 'text' \(or 'captions'\)"),
    (['{"image": "imgs/a.jpg", "captions": []}'], r"manifest.jsonl:1: 'captions' must be a non-empty list"),
    (['{"image": 3, "text": "x"}'], r"manifest.jsonl:1: 'image' must be a string, got int"),
    (['{"image": "imgs/missing.jpg", "text": "x"}'], r"manifest.jsonl:1: image not found: .*missing.jpg"),
    (['{"image": "imgs/a.jpg", "text": "x", "id": 1}', '{"image": "imgs/b.jpg", "text": "y", "id": 1}'],
     r"manifest.jsonl:2: duplicate id 1 \(first at .*manifest.jsonl:1\)"),
    (["", "  "], r"manifest.jsonl: no records"),
])
def test_caption_manifest_errors_name_file_and_line(tmp_path, images, lines, message):
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    with pytest.raises(LaVITError, match=message):
        read_caption_manifest(manifest)


def test_vqa_manifest_errors(tmp_path, images):
    manifest = write_lines(tmp_path / "vqa.jsonl", {"image": "imgs/a.jpg", "answer": "cat"})
    with pytest.raises(LaVITError, match=r"vqa.jsonl:1: missing key 'question'"):
        read_vqa_manifest(manifest)
    write_lines(manifest, {"image": "imgs/a.jpg", "question": "q?"})
    with pytest.raises(LaVITError, match=r"vqa.jsonl:1: missing key 'answer' \(or 'answers'\)"):
        read_vqa_manifest(manifest)


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(LaVITError, match=r"nothere.jsonl: no such file"):
        read_caption_manifest(tmp_path / "nothere.jsonl")
    with pytest.raises(LaVITError, match=r"is not a file"):
        read_caption_manifest(tmp_path)
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(LaVITError, match=r"binary.jsonl: cannot read as UTF-8"):
        read_caption_manifest(binary)


def coco_file(tmp_path, data) -> Path:
    path = tmp_path / "captions_val2014.json"
    path.write_text(json.dumps(data))
    return path


def test_coco_captions(tmp_path, images):
    path = coco_file(tmp_path, {
        "images": [{"id": 5, "file_name": "a.jpg"}, {"id": 6, "file_name": "b.jpg"}, {"id": 7, "file_name": "c.jpg"}],
        "annotations": [{"image_id": 6, "caption": "a dog"}, {"image_id": 5, "caption": "a cat"},
                        {"image_id": 6, "caption": "a puppy"}],
    })
    records = read_coco_captions(path, images)
    assert [(r.id, r.image.name, r.captions) for r in records] == [(5, "a.jpg", ["a cat"]), (6, "b.jpg", ["a dog", "a puppy"])]


@pytest.mark.parametrize("data, message", [
    ({"annotations": []}, r"captions_val2014.json: missing key 'images'"),
    ({"images": {}, "annotations": []}, r"'images' must be a list, got dict"),
    ({"images": [{"id": 5}], "annotations": []}, r"images\[0\]: missing key 'file_name'"),
    ({"images": [{"id": 5, "file_name": "a.jpg"}], "annotations": [{"image_id": 9, "caption": "x"}]},
     r"annotations\[0\]: image_id 9 is not in 'images'"),
    ({"images": [{"id": 5, "file_name": "a.jpg"}], "annotations": [{"image_id": 5}]},
     r"annotations\[0\]: missing key 'caption'"),
    ({"images": [{"id": 5, "file_name": "a.jpg"}], "annotations": []}, r"no captions"),
    ({"images": [{"id": 5, "file_name": "gone.jpg"}], "annotations": [{"image_id": 5, "caption": "x"}]},
     r"image 5: image not found: .*gone.jpg"),
])
def test_coco_captions_errors(tmp_path, images, data, message):
    with pytest.raises(LaVITError, match=message):
        read_coco_captions(coco_file(tmp_path, data), images)


def test_coco_not_json_and_missing_images_folder(tmp_path, images):
    path = tmp_path / "captions.json"
    path.write_text('{"images": [')
    with pytest.raises(LaVITError, match=r"captions.json: not valid JSON \(line 1"):
        read_coco_captions(path, images)
    with pytest.raises(LaVITError, match=r"images folder .*nowhere: no such folder"):
        read_coco_captions(coco_file(tmp_path, {"images": [], "annotations": []}), tmp_path / "nowhere")
    with pytest.raises(LaVITError, match=r"caption annotations .*absent.json: no such file"):
        read_coco_captions(tmp_path / "absent.json", images)


def karpathy(tmp_path, images_list) -> Path:
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"images": images_list, "dataset": "coco"}))
    return path


def test_karpathy_split(tmp_path, images):
    path = karpathy(tmp_path, [
        {"split": "train", "filepath": "imgs", "filename": "b.jpg", "cocoid": 2, "sentences": [{"raw": "train"}]},
        {"split": "test", "filepath": "imgs", "filename": "a.jpg", "cocoid": 1,
         "sentences": [{"raw": "A cat.", "tokens": ["a", "cat"]}, {"raw": "A kitten."}]},
    ])
    (record,) = read_karpathy(path, tmp_path)
    assert (record.id, record.image, record.captions) == (1, images / "a.jpg", ["A cat.", "A kitten."])
    assert [r.id for r in read_karpathy(path, tmp_path, split="train")] == [2]
    with pytest.raises(LaVITError, match=r"no images in split 'val' \(splits in the file: test, train\)"):
        read_karpathy(path, tmp_path, split="val")


def test_karpathy_errors(tmp_path, images):
    path = karpathy(tmp_path, [{"split": "test", "filepath": "imgs", "filename": "a.jpg"}])
    with pytest.raises(LaVITError, match=r"dataset_coco.json: images\[0\]: missing key 'sentences'"):
        read_karpathy(path, tmp_path)
    path = karpathy(tmp_path, [{"split": "test", "filename": "a.jpg", "sentences": [{"tokens": []}]}])
    with pytest.raises(LaVITError, match=r"images\[0\]: sentences\[0\]: missing key 'raw'"):
        read_karpathy(path, tmp_path)


def vqa_files(tmp_path, questions, annotations=None):
    q = tmp_path / "questions.json"
    q.write_text(json.dumps(questions))
    if annotations is None:
        return q, None
    a = tmp_path / "annotations.json"
    a.write_text(json.dumps(annotations))
    return q, a


def test_vqav2_questions_and_annotations(tmp_path):
    folder = tmp_path / "val2014"
    folder.mkdir()
    (folder / "COCO_val2014_000000000042.jpg").write_bytes(b"x")
    questions, annotations = vqa_files(
        tmp_path,
        {"data_subtype": "val2014", "questions": [{"question_id": 420, "image_id": 42, "question": "Is it red?"}]},
        {"annotations": [{"question_id": 420, "image_id": 42, "answer_type": "yes/no", "question_type": "is it",
                          "answers": [{"answer": "yes", "answer_id": i} for i in range(1, 11)]}]},
    )
    (record,) = read_vqav2(questions, folder, annotations)
    assert record.image == folder / "COCO_val2014_000000000042.jpg"
    assert (record.question_id, record.question, record.answers, record.answer_type, record.question_type) == \
        (420, "Is it red?", ["yes"] * 10, "yes/no", "is it")
    (test_record,) = read_vqav2(questions, folder)  # a test split: no annotations, no answers
    assert test_record.answers == []


def test_vqav2_errors(tmp_path):
    folder = tmp_path / "val2014"
    folder.mkdir()
    (folder / "000000000042.jpg").write_bytes(b"x")
    questions, annotations = vqa_files(
        tmp_path,
        {"questions": [{"question_id": 420, "image_id": 42, "question": "Is it red?"}]},
        {"annotations": [{"question_id": 999, "answers": [{"answer": "no"}]}]},
    )
    with pytest.raises(LaVITError, match=r"questions.json: missing key 'data_subtype'"):
        read_vqav2(questions, folder, annotations)
    with pytest.raises(LaVITError, match=r"questions.json: questions\[0\]: question_id 420 has no entry in .*annotations.json"):
        read_vqav2(questions, folder, annotations, image_name="{image_id:012d}.jpg")
    annotations.write_text(json.dumps({"annotations": [{"question_id": 420, "answers": [{"text": "no"}]}]}))
    with pytest.raises(LaVITError, match=r"annotations.json: annotations\[0\]: answers\[0\]: missing key 'answer'"):
        read_vqav2(questions, folder, annotations, image_name="{image_id:012d}.jpg")
    questions.write_text(json.dumps({"questions": [{"question_id": 420, "image_id": 43, "question": "q"}]}))
    with pytest.raises(LaVITError, match=r"questions\[0\]: image not found: .*000000000043.jpg"):
        read_vqav2(questions, folder, image_name="{image_id:012d}.jpg")
