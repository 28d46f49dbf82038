"""`lavit eval ...`, the overlay and side-by-side pictures, and `lavit plot`, on official-tiny
(random weights: the mechanics and the reports, not the scores)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

import lavit_mlx
from lavit_mlx.pictures import token_overlay

TINY = ["--vision-heads", "2"]


@pytest.fixture
def data(tmp_path, official_tiny):
    folder = tmp_path / "data"
    (folder / "images").mkdir(parents=True)
    for i in range(3):
        shutil.copy(official_tiny / "input.png", folder / "images" / f"{i}.png")
    captions = [{"image": f"images/{i}.png", "text": "a red circle at the top left", "num_objects": 1 + i % 2}
                for i in range(3)]
    (folder / "captions.jsonl").write_text("".join(json.dumps(c) + "\n" for c in captions))
    vqa = [{"image": "images/0.png", "question": "what color is the circle?", "answers": ["red"] * 10},
           {"image": "images/1.png", "question": "how many shapes are there?", "answer": "one"}]
    (folder / "vqa.jsonl").write_text("".join(json.dumps(q) + "\n" for q in vqa))
    return folder


def report_of(out, task):
    report = json.loads((out / f"{task}_report.json").read_text())
    assert {"task", "metrics", "model", "config_sha256", "data", "settings", "seed", "lavit_mlx_version"} <= set(report)
    predictions = [json.loads(line) for line in (out / f"{task}_predictions.jsonl").read_text().splitlines()]
    return report, predictions


def test_eval_caption_vqa_tokens(cli, official_checkpoint, data, tmp_path):
    model = ["-m", official_checkpoint, *TINY]
    out = tmp_path / "eval"
    code, stdout, err = cli("eval", "caption", "--data", data / "captions.jsonl", *model, "--out", out, "--limit", "2")
    assert code == 0, err
    report, predictions = report_of(out, "caption")
    assert {"BLEU-4", "CIDEr", "ROUGE-L", "METEOR"} <= set(report["metrics"]) and len(predictions) == 2
    assert report["data"][0]["sha256"] and "CIDEr" in stdout  # a table on stdout
    code, stdout, err = cli("eval", "vqa", "--data", data / "vqa.jsonl", *model, "--out", out, "--json")
    assert code == 0, err
    assert json.loads(stdout)["task"] == "vqa" and "accuracy" in json.loads(stdout)["metrics"]
    code, stdout, err = cli("eval", "tokens", "--images", data / "captions.jsonl", *model, "--out", out)
    assert code == 0, err
    report, predictions = report_of(out, "tokens")
    assert report["metrics"]["all"]["images"] == 3 and set(report["metrics"]["by_label"]["num_objects"]) == {"1", "2"}
    assert "all.kept_fraction" in stdout
    assert (out / "tokens_histogram.png").stat().st_size > 1000
    code, _, err = cli("eval", "tokens", "--images", data / "images", *model, "--out", out)
    assert code == 0, err


def test_eval_t2i_writes_images_and_a_contact_sheet(cli, official_checkpoint, data, tmp_path):
    out = tmp_path / "t2i"
    code, _, err = cli("eval", "t2i", "--data", data / "captions.jsonl", "-m", official_checkpoint, *TINY,
                       "--width", "32", "--height", "32", "--steps", "1", "--out", out, "--limit", "2")
    assert code == 0, err
    report, predictions = report_of(out, "t2i")
    assert len(list((out / "images").glob("*.png"))) == 2 and (out / "contact_sheet.png").is_file()
    assert "shapes_colour_and_cell" in report["metrics"]  # the captions are the shapes world's


def test_bad_eval_inputs(cli, tmp_path, data):
    code, _, err = cli("eval", "caption", "--data", tmp_path / "missing.jsonl", "-m", tmp_path)
    assert code == 1 and "no such" in err and "Traceback" not in err
    (tmp_path / "bad.jsonl").write_text('{"image": "x.png"}\nnot json\n')
    code, _, err = cli("eval", "caption", "--data", tmp_path / "bad.jsonl", "-m", tmp_path)
    assert code == 1 and "bad.jsonl" in err and "Traceback" not in err
    code, _, err = cli("eval", "t2i", "--data", data / "captions.jsonl", "--inception-weights", tmp_path / "none.pt")
    assert code == 1 and "no such Inception weights file" in err


def test_overlay_marks_exactly_the_kept_patches(official_checkpoint, official_tiny, cli, tmp_path):
    model = lavit_mlx.load(official_checkpoint, vision_heads=2)
    image = official_tiny / "input.png"
    tokens = model.tokenize([str(image)])[0]
    overlay = token_overlay(model, image)
    assert overlay.num_tokens == tokens.num_tokens == int(overlay.keep_mask.sum())
    grid = overlay.keep_mask.shape[0]
    assert overlay.image.size == (grid * 14 * 2, grid * 14 * 2)
    kept = set(np.flatnonzero(overlay.keep_mask))
    assert set(np.unique(overlay.absorbed_by)) <= kept  # every patch belongs to a kept token
    code, stdout, err = cli("tokenize", image, "-m", official_checkpoint, *TINY, "--overlay", tmp_path / "o.png")
    assert code == 0, err
    assert f"({tokens.num_tokens} tokens)" in err and Image.open(tmp_path / "o.png").size == overlay.image.size
    code, _, err = cli("reconstruct", image, "-m", official_checkpoint, *TINY, "--width", "32", "--height", "32",
                       "--steps", "1", "--out", tmp_path / "r.png", "--side-by-side", tmp_path / "s.png")
    assert code == 0, err
    assert Image.open(tmp_path / "s.png").width > 3 * 32


def test_plot_a_training_run(cli, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lines = [{"step": i, "loss": 1.0 / i, "learning_rate": 1e-3, "kept_tokens": 20 + i} for i in range(1, 20)]
    lines.append({"step": 19, "split": "eval", "loss": 0.06})
    (run / "log.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    code, stdout, err = cli("plot", run)
    assert code == 0, err
    assert (run / "curves.png").stat().st_size > 5000
    code, _, err = cli("plot", tmp_path / "nothing")
    assert code == 1 and "no log.jsonl" in err


def test_eval_shapes_without_a_pixel_decoder_measures_the_rest(cli, tmp_path):
    """An LLM stage's export has no pixel decoder: the image gates are skipped, the rest reported."""
    from lavit_mlx.export import write_manifest
    from lavit_mlx.zoo import BUNDLED_MODEL

    folder = tmp_path / "no-pixels"
    shutil.copytree(BUNDLED_MODEL, folder)
    shutil.rmtree(folder / "highres_pixel_decoding")
    config = json.loads((folder / "config.json").read_text())
    config.pop("highres_pixel")
    config["components"] = [c for c in config["components"] if c != "highres_pixel"]
    (folder / "config.json").write_text(json.dumps(config))
    write_manifest(folder)
    code, out, err = cli("eval", "shapes", "--model", folder, "--scenes", "2", "--prompts", "1",
                         "--reconstructions", "1", "--out", tmp_path / "eval")
    assert code == 0, err[-2000:]
    assert "skipped (the model holds no highres_pixel)" in out
    report, predictions = report_of(tmp_path / "eval", "shapes")
    assert {"caption_all_right", "vqa", "tokens_1_objects", "kept_fraction"} <= set(report["metrics"])
    assert "t2i_shape" not in report["metrics"] and "reconstruction_colour_and_cell" not in report["metrics"]
    assert set(report["settings"]["skipped"]) == {"t2i_colour_and_cell", "t2i_shape", "reconstruction_colour_and_cell"}
    assert {p["kind"] for p in predictions} == {"caption", "vqa"}


def test_eval_shapes_draws_as_many_prompts_and_reconstructions_as_asked(cli, tmp_path):
    """More prompts or reconstructions than captioned scenes: the world is drawn far enough
    for each (it used to stop at --scenes, silently)."""
    code, out, err = cli("eval", "shapes", "--scenes", "2", "--prompts", "3", "--reconstructions", "3",
                         "--out", tmp_path / "eval")
    assert code == 0, err[-2000:]
    report, predictions = report_of(tmp_path / "eval", "shapes")
    kinds = [p["kind"] for p in predictions]
    assert kinds.count("caption") == 2 and kinds.count("t2i") == 3 and kinds.count("reconstruction") == 3
    assert report["metrics"]["t2i_colour_and_cell"] in (0.0, 1 / 3, 2 / 3, 1.0)
