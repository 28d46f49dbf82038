"""Evaluation data readers: JSONL manifests, COCO caption files, the Karpathy split, VQAv2.

Formats:
- JSONL manifest, one object per line; image paths relative to the manifest's folder:
  captions `{"image": path, "text": caption}` or `{"image", "captions": [...]}`;
  VQA `{"image", "question", "answer": str}` or `{"image", "question", "answers": [...]}`
  (optional "question_id", "answer_type", "question_type"); images only `{"image"}`.
  Any other key (e.g. "num_objects") is kept in the record's `labels`.
- COCO caption annotations (`captions_val2014.json`: "images" [{id, file_name}] and
  "annotations" [{image_id, caption}]) with the folder that holds the images.
- The Karpathy split (`dataset_coco.json`: "images" [{split, filepath, filename,
  sentences: [{raw}], cocoid}]), one split ("test" by default).
- VQAv2's official pair: the questions file ("questions" [{question_id, image_id,
  question}], "data_subtype" e.g. "val2014") and, except for test sets, the annotations
  file ("annotations" [{question_id, answers: [{answer}], answer_type, question_type}]).

Every problem is a one-line `LaVITError` that names the file and the line or entry.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

from ..errors import LaVITError

PathLike = Union[str, Path]

CAPTION_KEYS = frozenset({"image", "id", "text", "captions"})
VQA_KEYS = frozenset({"image", "question_id", "question", "answer", "answers", "answer_type", "question_type"})


@dataclass(frozen=True)
class ImageRecord:
    """An image and its label columns (e.g. num_objects), for token statistics."""

    id: Any
    image: Path
    labels: Dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CaptionRecord:
    """An image with its reference captions."""

    id: Any
    image: Path
    captions: List[str]
    labels: Dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class VQARecord:
    """A question about an image with its ground-truth answers (empty for test sets)."""

    question_id: Any
    image: Path
    question: str
    answers: List[str]
    answer_type: Optional[str] = None
    question_type: Optional[str] = None
    labels: Dict[str, Any] = field(default_factory=dict)


def _read_jsonl(path: PathLike) -> Iterator[Tuple[int, str, Dict[str, Any]]]:
    """(line number, where, object) per non-blank line; where is "file:line"."""
    path = Path(path)
    if not path.is_file():
        raise LaVITError(f"{path}: no such file" if not path.exists() else f"{path}: is not a file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise LaVITError(f"{path}: cannot read as UTF-8 text ({exc})") from None
    count = 0
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LaVITError(f"{where}: not valid JSON ({exc.msg}); a manifest has one JSON object per line") from None
        if not isinstance(item, dict):
            raise LaVITError(f"{where}: expected a JSON object, got {type(item).__name__}")
        count += 1
        yield number, where, item
    if count == 0:
        raise LaVITError(f"{path}: no records (the file is empty)")


def _read_json(path: PathLike, what: str) -> Dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise LaVITError(f"{what} {path}: no such file" if not path.exists() else f"{what} {path}: is not a file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise LaVITError(f"{path}: cannot read as UTF-8 text ({exc})") from None
    except json.JSONDecodeError as exc:
        raise LaVITError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    if not isinstance(data, dict):
        raise LaVITError(f"{path}: expected a JSON object at the top level, got {type(data).__name__}")
    return data


def _require(item: Dict[str, Any], key: str, where: str, kind: type = str) -> Any:
    if key not in item:
        raise LaVITError(f"{where}: missing key {key!r}")
    value = item[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise LaVITError(f"{where}: {key!r} must be {_kind_name(kind)}, got {type(value).__name__}")
    return value


def _kind_name(kind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {str: "a string", int: "an integer", list: "a list", dict: "an object"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _string_list(item: Dict[str, Any], key: str, where: str) -> List[str]:
    values = _require(item, key, where, list)
    if not values or not all(isinstance(value, str) for value in values):
        raise LaVITError(f"{where}: {key!r} must be a non-empty list of strings")
    return list(values)


def _image_path(value: str, folder: Path, where: str, check_images: bool) -> Path:
    image = Path(value).expanduser()
    if not image.is_absolute():
        image = folder / image
    if check_images and not image.is_file():
        raise LaVITError(f"{where}: image not found: {image}")
    return image


def _images_folder(images: PathLike) -> Path:
    folder = Path(images).expanduser()
    if not folder.is_dir():
        raise LaVITError(f"images folder {folder}: no such folder")
    return folder


def _check_unique(ids: Dict[Any, str], key: Any, where: str, name: str) -> None:
    if key in ids:
        raise LaVITError(f"{where}: duplicate {name} {key!r} (first at {ids[key]})")
    ids[key] = where


def read_image_manifest(path: PathLike, check_images: bool = True) -> List[ImageRecord]:
    """Images (and label columns) from a JSONL manifest of `{"image": path, ...}` lines.

    Args:
        path: the manifest; relative image paths are relative to its folder.
        check_images: fail on a line whose image file does not exist.

    Returns:
        One `ImageRecord` per line; id is the line's "id", else its line number.
    """
    folder = Path(path).parent
    records: List[ImageRecord] = []
    ids: Dict[Any, str] = {}
    for number, where, item in _read_jsonl(path):
        image = _image_path(_require(item, "image", where), folder, where, check_images)
        labels = {key: value for key, value in item.items() if key not in ("image", "id")}
        records.append(ImageRecord(id=item.get("id", number), image=image, labels=labels))
        _check_unique(ids, records[-1].id, where, "id")
    return records


def read_caption_manifest(path: PathLike, check_images: bool = True) -> List[CaptionRecord]:
    """Captioned images from a JSONL manifest: `{"image", "text"}` or `{"image", "captions": [...]}`.

    Args:
        path: the manifest; relative image paths are relative to its folder.
        check_images: fail on a line whose image file does not exist.

    Returns:
        One `CaptionRecord` per line; id is the line's "id", else its line number.
    """
    folder = Path(path).parent
    records: List[CaptionRecord] = []
    ids: Dict[Any, str] = {}
    for number, where, item in _read_jsonl(path):
        image = _image_path(_require(item, "image", where), folder, where, check_images)
        if "captions" in item:
            captions = _string_list(item, "captions", where)
        elif "text" in item:
            captions = [_require(item, "text", where)]
        else:
            raise LaVITError(f"{where}: missing key 'text' (or 'captions')")
        labels = {key: value for key, value in item.items() if key not in CAPTION_KEYS}
        records.append(CaptionRecord(id=item.get("id", number), image=image,
                                     captions=captions, labels=labels))
        _check_unique(ids, records[-1].id, where, "id")
    return records


def read_vqa_manifest(path: PathLike, check_images: bool = True) -> List[VQARecord]:
    """Questions from a JSONL manifest: `{"image", "question", "answer"}` or `"answers": [...]`.

    Args:
        path: the manifest; relative image paths are relative to its folder.
        check_images: fail on a line whose image file does not exist.

    Returns:
        One `VQARecord` per line; question_id is the line's "question_id", else its line number.
    """
    folder = Path(path).parent
    records: List[VQARecord] = []
    ids: Dict[Any, str] = {}
    for number, where, item in _read_jsonl(path):
        image = _image_path(_require(item, "image", where), folder, where, check_images)
        question = _require(item, "question", where)
        if "answers" in item:
            answers = _string_list(item, "answers", where)
        elif "answer" in item:
            answers = [_require(item, "answer", where)]
        else:
            raise LaVITError(f"{where}: missing key 'answer' (or 'answers')")
        labels = {key: value for key, value in item.items() if key not in VQA_KEYS}
        records.append(VQARecord(question_id=item.get("question_id", number), image=image,
                                 question=question, answers=answers, answer_type=item.get("answer_type"),
                                 question_type=item.get("question_type"), labels=labels))
        _check_unique(ids, records[-1].question_id, where, "question_id")
    return records


def _entries(data: Dict[str, Any], key: str, path: PathLike) -> List[Tuple[str, Dict[str, Any]]]:
    """(where, object) for each element of the top-level list `key`; where is "file: key[i]"."""
    entries = _require(data, key, str(path), list)
    out = []
    for index, entry in enumerate(entries):
        where = f"{path}: {key}[{index}]"
        if not isinstance(entry, dict):
            raise LaVITError(f"{where}: expected a JSON object, got {type(entry).__name__}")
        out.append((where, entry))
    return out


def read_coco_captions(annotations: PathLike, images: PathLike, check_images: bool = True) -> List[CaptionRecord]:
    """Captioned images from a COCO caption annotation file (`images` + `annotations`).

    Args:
        annotations: e.g. `captions_val2014.json`.
        images: the folder with the images' `file_name`s (e.g. `val2014/`).
        check_images: fail when an image file does not exist.

    Returns:
        One `CaptionRecord` per image that has captions, in the file's image order; id is
        the COCO image id.
    """
    data = _read_json(annotations, "caption annotations")
    folder = _images_folder(images)
    files: Dict[Any, str] = {}
    for where, entry in _entries(data, "images", annotations):
        files[_require(entry, "id", where, (int, str))] = _require(entry, "file_name", where)
    captions: Dict[Any, List[str]] = {}
    for where, entry in _entries(data, "annotations", annotations):
        image_id = _require(entry, "image_id", where, (int, str))
        if image_id not in files:
            raise LaVITError(f"{where}: image_id {image_id!r} is not in 'images'")
        captions.setdefault(image_id, []).append(_require(entry, "caption", where))
    if not captions:
        raise LaVITError(f"{annotations}: no captions in 'annotations'")
    return [CaptionRecord(id=image_id, captions=captions[image_id],
                          image=_image_path(files[image_id], folder, f"{annotations}: image {image_id}", check_images))
            for image_id in files if image_id in captions]


def read_karpathy(path: PathLike, images: PathLike, split: str = "test",
                  check_images: bool = True) -> List[CaptionRecord]:
    """One split of the Karpathy captions file (`dataset_coco.json`).

    Args:
        path: the Karpathy file.
        images: the COCO folder that holds `filepath/filename` (e.g. `val2014/x.jpg`).
        split: "test" (default), "val", "train" or "restval".
        check_images: fail when an image file does not exist.

    Returns:
        One `CaptionRecord` per image of the split; id is its "cocoid" (else "imgid").
    """
    data = _read_json(path, "Karpathy split file")
    folder = _images_folder(images)
    records = []
    splits = set()
    for where, entry in _entries(data, "images", path):
        entry_split = _require(entry, "split", where)
        splits.add(entry_split)
        if entry_split != split:
            continue
        relative = Path(_require(entry, "filename", where))
        if "filepath" in entry:
            relative = Path(_require(entry, "filepath", where)) / relative
        sentences = _require(entry, "sentences", where, list)
        captions = []
        for index, sentence in enumerate(sentences):
            if not isinstance(sentence, dict):
                raise LaVITError(f"{where}: sentences[{index}] must be an object with 'raw'")
            captions.append(_require(sentence, "raw", f"{where}: sentences[{index}]"))
        if not captions:
            raise LaVITError(f"{where}: 'sentences' is empty")
        image_id = entry.get("cocoid", entry.get("imgid", len(records)))
        records.append(CaptionRecord(id=image_id, image=_image_path(str(relative), folder, where, check_images),
                                     captions=captions))
    if not records:
        found = ", ".join(sorted(splits)) or "none"
        raise LaVITError(f"{path}: no images in split {split!r} (splits in the file: {found})")
    return records


def read_vqav2(questions: PathLike, images: PathLike, annotations: Optional[PathLike] = None,
               image_name: str = "COCO_{subtype}_{image_id:012d}.jpg",
               check_images: bool = True) -> List[VQARecord]:
    """Questions (and answers) from VQAv2's official question and annotation files.

    Args:
        questions: e.g. `v2_OpenEnded_mscoco_val2014_questions.json`.
        images: the folder with the COCO images (e.g. `val2014/`).
        annotations: e.g. `v2_mscoco_val2014_annotations.json`; None for test sets
            (answers are then empty).
        image_name: image file name pattern; {subtype} is the questions file's
            "data_subtype" (e.g. val2014), {image_id} the COCO image id.
        check_images: fail when an image file does not exist.

    Returns:
        One `VQARecord` per question, in the questions file's order.
    """
    data = _read_json(questions, "VQA questions")
    folder = _images_folder(images)
    subtype = data.get("data_subtype", "")
    if "{subtype}" in image_name and not subtype:
        raise LaVITError(f"{questions}: missing key 'data_subtype' (needed for image names like {image_name})")
    answered: Dict[Any, Dict[str, Any]] = {}
    if annotations is not None:
        for where, entry in _entries(_read_json(annotations, "VQA annotations"), "annotations", annotations):
            question_id = _require(entry, "question_id", where, (int, str))
            items = _require(entry, "answers", where, list)
            texts = []
            for index, answer in enumerate(items):
                if not isinstance(answer, dict):
                    raise LaVITError(f"{where}: answers[{index}] must be an object with 'answer'")
                texts.append(_require(answer, "answer", f"{where}: answers[{index}]"))
            if not texts:
                raise LaVITError(f"{where}: 'answers' is empty")
            answered[question_id] = {"answers": texts, "answer_type": entry.get("answer_type"),
                                     "question_type": entry.get("question_type")}
    records = []
    for where, entry in _entries(data, "questions", questions):
        question_id = _require(entry, "question_id", where, (int, str))
        image_id = _require(entry, "image_id", where, (int, str))
        if annotations is not None and question_id not in answered:
            raise LaVITError(f"{where}: question_id {question_id!r} has no entry in {annotations}")
        try:
            name = image_name.format(subtype=subtype, image_id=image_id)
        except (KeyError, ValueError, IndexError) as exc:
            raise LaVITError(f"image name pattern {image_name!r} does not fit image_id {image_id!r} ({exc})") from None
        truth = answered.get(question_id, {})
        records.append(VQARecord(question_id=question_id, image=_image_path(name, folder, where, check_images),
                                 question=_require(entry, "question", where), answers=truth.get("answers", []),
                                 answer_type=truth.get("answer_type"), question_type=truth.get("question_type")))
    return records
