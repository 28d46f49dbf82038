"""The bundled model's quality gates on fresh scenes (a seed the training never used).

The full gates (200 scenes, 100 prompts, 50 reconstructions) are `lavit eval shapes`, whose
figures are in the README and the model card; here a smaller draw of the same gates runs
in the suite's budget, with each bound lowered by two standard errors of that draw so that
a model at the bound passes and one clearly below it fails. Gates the model is known to
miss are marked xfail (strict: when it starts to meet one, the mark must go).
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from lavit_mlx.zoo import BUNDLED_MODEL, BUNDLED_NAME

pytestmark = pytest.mark.slow

SEED = 31_337  # neither the build's (0, 1) nor lavit eval shapes' default (10000)
SCENES, PROMPTS, RECONSTRUCTIONS = 60, 24, 12
# Measured with `lavit eval shapes` (README): the bundled model misses these quality gates in
# the budget it was trained with; each is expected to fail until a better-trained model ships.
_SHORT = "missed by the bundled model (measured {}%; README, 'The bundled model')"
MISSED: dict = {"caption_all_right": _SHORT.format(62.5), "caption_shape": _SHORT.format(90.8),
                "vqa": _SHORT.format(67.8), "t2i_colour_and_cell": _SHORT.format(2.0),
                "t2i_shape": _SHORT.format(1.0), "reconstruction_colour_and_cell": _SHORT.format(6.0)}
# caption_colour (95.1% on 200 scenes) is met; caption_place (94.75% there, the bound 95%) is
# within noise of it and passes here (96.7%). caption_shape is the closest miss: this draw of 60
# measured 88.6% against the bound less two standard errors, 89.4%, one object short; another
# CPU's rounding may give that object, so its mark is not strict.
NOT_STRICT = {"caption_shape"}


@pytest.fixture(scope="module")
def evaluated():
    import lavit_mlx
    from lavit_mlx.eval import run

    model = lavit_mlx.load()
    return run.shapes(model, SEED, SCENES, PROMPTS, RECONSTRUCTIONS, batch_size=12)


@pytest.fixture(scope="module")
def report(evaluated):
    return evaluated[0]


def _size(gate: str) -> int:
    return {"t2i": PROMPTS, "reconstruction": RECONSTRUCTIONS}.get(gate.split("_")[0], SCENES)


@pytest.mark.parametrize("gate", ["caption_all_right", "caption_colour", "caption_shape", "caption_place", "vqa",
                                  "t2i_colour_and_cell", "t2i_shape", "reconstruction_colour_and_cell"])
def test_gate(report, gate, request):
    from lavit_mlx.eval.run import GATES

    if gate in MISSED:
        request.applymarker(pytest.mark.xfail(reason=MISSED[gate], strict=gate not in NOT_STRICT))
    bound = GATES[gate]
    margin = 2 * math.sqrt(bound * (1 - bound) / _size(gate))
    assert report["metrics"][gate] >= bound - margin, (gate, report["metrics"][gate], bound)


def test_picture_gates_come_with_exact_scenes_and_extra_objects(evaluated):
    """The picture gates count a requested object found whatever else the checker reads;
    `*_exact` (nothing extra) and `*_extra_objects` say how much else there was, and every
    picture's reading is in the predictions."""
    report, predictions = evaluated
    metrics = report["metrics"]
    for kind, count in (("t2i", PROMPTS), ("reconstruction", RECONSTRUCTIONS)):
        assert 0 <= metrics[f"{kind}_exact"] <= metrics[f"{kind}_colour_and_cell"]
        records = [p for p in predictions if p["kind"] == kind]
        assert len(records) == count
        assert metrics[f"{kind}_extra_objects"] == pytest.approx(sum(r["extra"] for r in records) / count)
        assert metrics[f"{kind}_exact"] == pytest.approx(sum(r["correct"] for r in records) / count)
        assert all(len(r["detected"]) >= r["found"] for r in records)


def test_dynamic_tokens_follow_the_content(report):
    metrics = report["metrics"]
    # measured on 200 scenes: 13.7 / 21.6 / 28.5 tokens
    assert metrics["tokens_1_objects"] + 4 < metrics["tokens_2_objects"]
    assert metrics["tokens_2_objects"] + 3 < metrics["tokens_3_objects"]
    assert abs(metrics["kept_fraction"] - 1 / 3) < 0.08


def test_the_bundled_model_is_package_data_and_the_default():
    files = [p for p in BUNDLED_MODEL.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 25 * 10**6
    proc = subprocess.run([sys.executable, "-m", "lavit_cli.cli", "info"], capture_output=True, text=True)
    assert proc.returncode == 0 and BUNDLED_NAME in proc.stdout and "[missing]" not in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "lavit_cli.cli", "info", "--model", str(BUNDLED_MODEL), "--verify"],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and "all files match" in proc.stdout, proc.stderr[-2000:]
