"""The evaluations `lavit eval` runs: a model on a data set, to a report.

Each function returns (report, predictions): the report carries the metrics, the model
and its config hash, the data file's hash, the settings and the seed (see `report.py`),
so that two runs can be compared; the predictions are written next to it by the caller.

- `caption`: BLEU-1..4, METEOR, ROUGE-L, CIDEr with the COCO caption code;
- `vqa`: VQAv2 accuracy (10-annotator rule) or exact match;
- `t2i`: images from captions, FID against references (with Inception weights), and the
  shapes world's checker when the captions are the world's;
- `tokens`: the dynamic token count, kept fraction against rho, codebook usage, by label;
- `shapes`: the bundled model's quality gates on fresh scenes.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from ..errors import LaVITError
from .report import build_report

Progress = Optional[Callable[[str, int, int], None]]


def _model_identity(model) -> dict:
    return {"model": str(model.checkpoint.path), "config": model.config.to_dict()}


def _tick(progress: Progress, stage: str, done: int, total: int) -> None:
    if progress:
        progress(stage, done, total)


def caption(model, records, data_files: Sequence, batch_size: int = 8, seed: int = 0, progress: Progress = None,
            use_java: Optional[bool] = None, **decoding) -> tuple:
    """Caption every record's image (the release's settings unless `decoding` says otherwise)."""
    from ..understanding import caption as run
    from .caption_metrics import caption_scores

    predictions = []
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        answers = run(model, [str(r.image) for r in chunk], seed=seed + start, batch_size=batch_size, **decoding)
        predictions += [{"id": r.id, "image": str(r.image), "caption": a.text} for r, a in zip(chunk, answers)]
        _tick(progress, "captioning", len(predictions), len(records))
    scores = caption_scores({r.id: r.captions for r in records}, {p["id"]: [p["caption"]] for p in predictions},
                            use_java=use_java)
    metrics = dict(scores["scores"])
    settings = {"batch_size": batch_size, **decoding, "tokenizer": scores["tokenizer"], "notes": scores.get("notes")}
    report = build_report("caption", metrics, seed=seed, data_files=data_files, settings=settings,
                          **_model_identity(model))
    return report, predictions


def vqa(model, records, data_files: Sequence, batch_size: int = 8, seed: int = 0, progress: Progress = None,
        **decoding) -> tuple:
    """Answer every record's question ("Question: {} Answer:", 5 beams by default)."""
    from ..sampling import TextDecoding
    from ..understanding import VQA_PROMPT, clean_answer, describe
    from .vqa_metrics import vqa_scores

    settings = TextDecoding.vqa(early_stopping=True, **decoding)
    predictions = []
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        answers = describe(model, [str(r.image) for r in chunk], [VQA_PROMPT.format(r.question) for r in chunk],
                           settings, clean_answer, seed=seed + start, batch_size=batch_size)
        predictions += [{"question_id": r.question_id, "image": str(r.image), "question": r.question,
                         "answer": a.text} for r, a in zip(chunk, answers)]
        _tick(progress, "answering", len(predictions), len(records))
    scores = vqa_scores({p["question_id"]: p["answer"] for p in predictions},
                        {r.question_id: r.answers for r in records},
                        {r.question_id: r.answer_type for r in records if r.answer_type})
    metrics = {"accuracy": scores["overall"], **{f"accuracy_{k}": v for k, v in scores["per_answer_type"].items()}}
    for p in predictions:
        p["accuracy"] = scores["per_question"][p["question_id"]]
    report = build_report("vqa", metrics, seed=seed, data_files=data_files, settings={"batch_size": batch_size,
                          **decoding}, **_model_identity(model))
    return report, predictions


def generate_images(model, prompts: Sequence[str], settings, batch_size: int = 8, progress: Progress = None) -> list:
    """One image per prompt (prompt i with seed + i), in batches."""
    from ..generation import Done, generate_stages

    settings = settings.resolved()
    images = []
    for start in range(0, len(prompts), batch_size):
        batch = settings.resolved()
        batch.seed = settings.seed + start
        for event in generate_stages(model, batch, prompts=list(prompts[start:start + batch_size])):
            if isinstance(event, Done):
                images += event.images
        _tick(progress, "generating", len(images), len(prompts))
    return images


def t2i(model, records, data_files: Sequence, out_dir: Path, settings, batch_size: int = 8,
        inception_weights: Optional[Path] = None, progress: Progress = None) -> tuple:
    """Generate from each record's first caption; FID against the record images when
    `inception_weights` is given; the shapes checker when every caption is the world's."""
    from PIL import Image

    from ..pictures import contact_sheet
    from ..shapes.checker import score_image
    from ..shapes.world import scene_from_prompt

    settings = settings.resolved()  # one seed for the whole run
    prompts = [r.captions[0] for r in records]
    images = generate_images(model, prompts, settings, batch_size, progress)
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    predictions, paths = [], []
    for i, (record, image) in enumerate(zip(records, images)):
        path = out_dir / "images" / f"{i:05d}.png"
        Image.fromarray(image).save(path)
        paths.append(path)
        predictions.append({"id": record.id, "prompt": prompts[i], "image": str(path)})
    sheet = contact_sheet([Image.fromarray(im) for im in images[:32]], prompts[:32])
    sheet.save(out_dir / "contact_sheet.png")
    metrics: Dict[str, float] = {}
    try:
        scenes = [scene_from_prompt(p) for p in prompts]
    except LaVITError:
        scenes = None
    if scenes is not None:
        scores = [score_image(Image.fromarray(im), scene) for im, scene in zip(images, scenes)]
        for p, score in zip(predictions, scores):
            p.update(colour_cell_right=score.found == score.objects, shapes_right=score.shapes_right == score.objects)
        metrics["shapes_colour_and_cell"] = float(np.mean([s.found == s.objects for s in scores]))
        metrics["shapes_shape"] = float(np.mean([s.shapes_right == s.objects for s in scores]))
    if inception_weights is not None:
        from .fid import frechet_inception_distance

        metrics["fid"] = frechet_inception_distance([r.image for r in records], paths, inception_weights)
    report = build_report("t2i", metrics, seed=settings.seed, data_files=data_files,
                          settings={"batch_size": batch_size, **{k: v for k, v in vars(settings).items()
                                                                 if k not in ("prompt", "images")}},
                          **_model_identity(model))
    return report, predictions


def tokens(model, records, data_files: Sequence, out_dir: Optional[Path], rho: Optional[float] = None,
           batch_size: int = 8, progress: Progress = None) -> tuple:
    """Token counts, kept fraction and codebook usage over the images, split by label columns."""
    from .token_stats import token_stats

    results = []
    for start in range(0, len(records), batch_size):
        results += model.tokenize([str(r.image) for r in records[start:start + batch_size]], batch_size=batch_size)
        _tick(progress, "tokenizing", len(results), len(records))
    counts = [t.num_tokens for t in results]
    codes = [t.codes.tolist() for t in results]
    names = sorted({k for r in records for k in r.labels})
    labels = {name: [str(r.labels.get(name)) for r in records] for name in names}
    patches = model.config.vision.num_patches
    rho = rho if rho is not None else 1 / 3
    histogram = Path(out_dir) / "tokens_histogram.png" if out_dir else None
    stats = token_stats(counts, codes, labels=labels, num_patches=patches, rho=rho,
                        codebook_size=model.config.tokenizer.codebook_size, histogram=histogram, force=True)
    predictions = [{"image": str(r.image), "num_tokens": n, **r.labels} for r, n in zip(records, counts)]
    report = build_report("tokens", stats, data_files=data_files, settings={"rho": rho}, seed=None,
                          **_model_identity(model))
    return report, predictions


# ----------------------------------------------------------------------------- the shapes world's gates
GATES = {
    "caption_all_right": 0.80, "caption_colour": 0.95, "caption_shape": 0.95, "caption_place": 0.95,
    "vqa": 0.90, "t2i_colour_and_cell": 0.80, "t2i_shape": 0.70, "reconstruction_colour_and_cell": 0.90,
}


def exactness(kind: str, scores) -> Dict[str, float]:
    """Beside the gates (every requested object found; detections that realise none are not
    counted against them): the share of pictures that are exactly the scene (every object
    with its colour, shape and cell, nothing extra) and the mean count of extra detections.
    A picture of noise blobs can pass the gate by chance; it cannot be exact."""
    return {f"{kind}_exact": float(np.mean([s.correct for s in scores])),
            f"{kind}_extra_objects": float(np.mean([s.extra for s in scores]))}


def image_record(kind: str, caption: str, score) -> dict:
    return {"kind": kind, "truth": caption, "objects": score.objects, "found": score.found,
            "shapes_right": score.shapes_right, "extra": score.extra, "correct": bool(score.correct),
            "detected": [f"{d.colour} {d.shape} at the {d.place}" for d in score.detected]}


def shapes(model, seed: int = 10_000, scenes: int = 200, prompts: int = 100, reconstructions: int = 50,
           batch_size: int = 16, progress: Progress = None, settings=None) -> tuple:
    """The bundled model's quality gates on fresh scenes (seed never used in training).

    A model folder without the pixel decoder (an LLM stage's export, say) is measured on
    everything else; the text-to-image and reconstruction gates are reported as skipped.

    Returns the report (metrics, gates passed) and the per-item predictions.
    """
    from PIL import Image

    from ..generation import GenerationSettings, pixel_component, reconstruct_stages, run_stages
    from ..sampling import TextDecoding
    from ..shapes.checker import score_answer, score_caption, score_image
    from ..shapes.world import caption as caption_of
    from ..shapes.world import questions, render
    from ..shapes.world import scenes as make_scenes
    from ..understanding import VQA_PROMPT, caption as run_caption, clean_answer, describe

    started = time.perf_counter()
    settings = settings or GenerationSettings(seed=seed)
    decoder = pixel_component(settings.decoder)
    draws = model.config.component(decoder) is not None
    # one draw of the world: the first `scenes` are captioned and questioned, the first
    # `prompts` drawn from their captions, the first `reconstructions` reconstructed
    drawn = list(make_scenes(seed, max(scenes, prompts, reconstructions)))
    world = drawn[:scenes]
    rendered = [render(scene) for scene in drawn[:max(scenes, reconstructions if draws else 0)]]
    pictures = rendered[:scenes]
    metrics: Dict[str, float] = {}
    predictions: List[dict] = []

    # captions
    texts = []
    for start in range(0, len(world), batch_size):
        texts += [a.text for a in run_caption(model, pictures[start:start + batch_size], batch_size=batch_size)]
        _tick(progress, "captions", len(texts), len(world))
    scores = [score_caption(t, s) for t, s in zip(texts, world)]
    metrics["caption_all_right"] = float(np.mean([s.correct for s in scores]))
    for attribute in ("colour", "shape", "place"):
        metrics[f"caption_{attribute}"] = float(np.mean([getattr(s, attribute) for s in scores]))
    predictions += [{"kind": "caption", "truth": caption_of(s), "prediction": t, "correct": c.correct}
                    for s, t, c in zip(world, texts, scores)]

    # questions: every kind for every scene
    rng = np.random.default_rng(seed)
    asked = [(i, q, a) for i, scene in enumerate(world) for q, a in questions(scene, rng)]
    answers = []
    decoding = TextDecoding.vqa(early_stopping=True)
    for start in range(0, len(asked), batch_size):
        chunk = asked[start:start + batch_size]
        answers += [a.text for a in describe(model, [pictures[i] for i, _, _ in chunk],
                                             [VQA_PROMPT.format(q) for _, q, _ in chunk], decoding, clean_answer,
                                             batch_size=batch_size)]
        _tick(progress, "questions", len(answers), len(asked))
    right = [score_answer(p, a).correct for (_, _, a), p in zip(asked, answers)]
    metrics["vqa"] = float(np.mean(right))
    predictions += [{"kind": "vqa", "question": q, "truth": a, "prediction": p, "correct": r}
                    for (_, q, a), p, r in zip(asked, answers, right)]

    if draws:
        # text to image
        prompt_scenes = drawn[:prompts]
        images = generate_images(model, [caption_of(s) for s in prompt_scenes], settings, batch_size, progress)
        image_scores = [score_image(Image.fromarray(im), s) for im, s in zip(images, prompt_scenes)]
        metrics["t2i_colour_and_cell"] = float(np.mean([s.found == s.objects for s in image_scores]))
        metrics["t2i_shape"] = float(np.mean([s.shapes_right == s.objects for s in image_scores]))
        metrics.update(exactness("t2i", image_scores))
        predictions += [image_record("t2i", caption_of(s), score) for s, score in zip(prompt_scenes, image_scores)]

        # reconstruction: image -> its own tokens -> pixels
        kept = []
        for i, scene in enumerate(drawn[:reconstructions]):
            done = run_stages(reconstruct_stages(model, rendered[i], GenerationSettings(seed=seed + i,
                                                                                        decoder=settings.decoder)))
            kept.append(score_image(Image.fromarray(done.images[0]), scene))
            _tick(progress, "reconstructions", i + 1, reconstructions)
        metrics["reconstruction_colour_and_cell"] = float(np.mean([s.found == s.objects for s in kept]))
        metrics.update(exactness("reconstruction", kept))
        predictions += [image_record("reconstruction", caption_of(s), score)
                        for s, score in zip(drawn[:reconstructions], kept)]

    # dynamic tokens
    tokenized = model.tokenize(pictures, batch_size=batch_size)
    by_count = {}
    for scene, t in zip(world, tokenized):
        by_count.setdefault(len(scene.objects), []).append(t.num_tokens)
    for count in sorted(by_count):
        metrics[f"tokens_{count}_objects"] = float(np.mean(by_count[count]))
    metrics["kept_fraction"] = float(np.mean([t.num_tokens for t in tokenized]) / model.config.vision.num_patches)
    means = [metrics[f"tokens_{c}_objects"] for c in sorted(by_count)]
    spread = [float(np.std(by_count[c]) / np.sqrt(len(by_count[c]))) for c in sorted(by_count)]
    metrics["tokens_rise_with_objects"] = float(all(b - a > 2 * (sa + sb) for a, b, sa, sb
                                                    in zip(means, means[1:], spread, spread[1:])))
    passed = {name: metrics[name] >= bound for name, bound in GATES.items() if name in metrics}
    passed["tokens_rise_with_objects"] = bool(metrics["tokens_rise_with_objects"])
    skipped = [name for name in GATES if name not in metrics]
    metrics["seconds"] = time.perf_counter() - started
    report = build_report("shapes", metrics, seed=seed, data_files=(), settings={
        "scenes": scenes, "prompts": prompts, "reconstructions": reconstructions, "gates": GATES,
        "passed": passed, "skipped": {name: f"the model holds no {decoder}" for name in skipped}},
        **_model_identity(model))
    return report, predictions


def read_records(kind: str, data: Path, images: Optional[Path] = None, annotations: Optional[Path] = None,
                 split: str = "test", limit: Optional[int] = None) -> list:
    """The records of a data file for `kind` ('caption', 'vqa', 't2i', 'tokens'): a JSONL
    manifest, a COCO caption file (+ an images folder), the Karpathy split file, or
    VQAv2's questions file (+ its annotations)."""
    from . import data as readers

    data = Path(data)
    if not data.exists():
        raise LaVITError(f"{data}: no such data file")
    if data.is_dir():
        if kind != "tokens":
            raise LaVITError(f"{data}: a folder is only read by `eval tokens` (give a manifest for {kind})")
        found = sorted(p for p in data.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".bmp"))
        if not found:
            raise LaVITError(f"{data}: no images in this folder")
        records = [readers.ImageRecord(id=p.name, image=p) for p in found]
    elif data.suffix == ".jsonl":
        reader = {"caption": readers.read_caption_manifest, "t2i": readers.read_caption_manifest,
                  "vqa": readers.read_vqa_manifest, "tokens": readers.read_image_manifest}[kind]
        records = reader(data)
    else:
        import json

        try:
            content = json.loads(data.read_text())
        except (OSError, ValueError) as exc:
            raise LaVITError(f"{data}: not a JSON or JSONL data file ({exc})") from None
        if kind == "vqa":
            if images is None:
                raise LaVITError("a VQAv2 questions file needs --images (the image folder)")
            records = readers.read_vqav2(data, images, annotations)
        elif isinstance(content, dict) and "annotations" in content:
            if images is None:
                raise LaVITError("a COCO caption file needs --images (the image folder)")
            records = readers.read_coco_captions(data, images)
        elif isinstance(content, dict) and "images" in content:
            records = readers.read_karpathy(data, images or data.parent, split=split)
        else:
            raise LaVITError(f"{data}: neither a COCO caption file, the Karpathy split file nor VQAv2 questions")
    if limit is not None:
        records = records[:limit]
    if not records:
        raise LaVITError(f"{data}: no records to evaluate")
    return records
