"""The shapes world follows its spec: layout, pixels, caption grammar, questions, parsing."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from lavit_mlx.errors import LaVITError
from lavit_mlx.shapes import (COLOURS, PLACES, SHAPES, Scene, ShapeObject, answer_question, caption,
                              parse_caption, questions, render, scene_from_prompt, scenes)
from lavit_mlx.shapes.world import CELL, cell_centre, colour_question, exists_question, place_question

EXAMPLE = "a red circle at the top left, a blue square in the center and a green triangle at the bottom right"


def obj(shape, colour, place, size=50.0, dx=0.0, dy=0.0):
    row, col = divmod(PLACES.index(place), 3)
    x, y = cell_centre(row, col)
    return ShapeObject(shape, colour, row, col, x + dx, y + dy, size)


def test_same_seed_same_scenes_and_pixels():
    first, again, other = list(scenes(5, 50)), list(scenes(5, 50)), list(scenes(6, 50))
    assert first == again and first != other
    assert render(first[0]).tobytes() == render(again[0]).tobytes()


def test_scenes_keep_the_layout_of_the_spec():
    counts = Counter()
    for scene in scenes(0, 2000):
        counts[len(scene.objects)] += 1
        cells = [o.cell for o in scene.objects]
        assert cells == sorted(set(cells))  # distinct cells, row-major order
        for o in scene.objects:
            x, y = (o.col + 0.5) * CELL, (o.row + 0.5) * CELL
            assert abs(o.cx - x) <= 6 and abs(o.cy - y) <= 6 and 40 <= o.size <= 60
            x0, y0, x1, y1 = o.box
            # the box stays inside its cell, so objects never touch
            assert o.col * CELL < x0 and x1 < (o.col + 1) * CELL
            assert o.row * CELL < y0 and y1 < (o.row + 1) * CELL
    assert set(counts) == {1, 2, 3} and min(counts.values()) > 550


def test_render_draws_each_shape_as_specified():
    scene = Scene((obj("circle", "red", "top left", 60), obj("square", "yellow", "center", 40),
                   obj("triangle", "purple", "bottom right", 60)))
    image = render(scene)
    assert image.size == (224, 224) and image.mode == "RGB"
    pixels = np.asarray(image)
    assert tuple(pixels[0, 0]) == tuple(pixels[223, 223]) == (255, 255, 255)
    for o in scene.objects:
        x0, y0, x1, y1 = (int(round(v)) for v in o.box)
        cx, cy = int(o.cx), int(o.cy)
        assert tuple(pixels[cy + 5, cx]) == COLOURS[o.colour]
        corners = {"top": (y0 + 1, x0 + 1), "bottom": (y1 - 2, x0 + 1)}
        if o.shape == "circle":  # inscribed: the box's corners are background
            assert tuple(pixels[corners["top"]]) == (255, 255, 255)
            assert tuple(pixels[corners["bottom"]]) == (255, 255, 255)
        elif o.shape == "square":
            assert tuple(pixels[corners["top"]]) == tuple(pixels[corners["bottom"]]) == COLOURS[o.colour]
        else:  # apex at the top middle, base along the bottom edge
            assert tuple(pixels[corners["top"]]) == (255, 255, 255)
            assert tuple(pixels[corners["bottom"]]) == COLOURS[o.colour]
            assert tuple(pixels[y0 + 3, cx]) == COLOURS[o.colour]


def test_caption_grammar():
    scene = Scene((obj("triangle", "green", "bottom right"), obj("circle", "red", "top left"),
                   obj("square", "blue", "center")))
    assert caption(scene) == EXAMPLE  # objects are listed in row-major order, whatever order given
    assert caption(Scene((obj("square", "blue", "center"),))) == "a blue square in the center"
    two = Scene((obj("circle", "orange", "left"), obj("square", "yellow", "top")))
    assert caption(two) == "a yellow square at the top and a orange circle at the left"


def test_parse_caption_reads_every_caption_back_and_tolerates_mess():
    for scene in scenes(1, 1000):
        assert parse_caption(caption(scene)) == [(o.colour, o.shape, o.place) for o in scene.objects]
    messy = "  A Red   circle at the\ttop left,a blue square in  the center and an orange blob at the top"
    assert parse_caption(messy) == [("red", "circle", "top left"), ("blue", "square", "center")]
    assert parse_caption("a red circle at the topmost corner") == []
    assert parse_caption("") == []


def test_scene_from_prompt_gives_the_requested_objects():
    scene = scene_from_prompt(EXAMPLE + ".")
    assert caption(scene) == EXAMPLE
    assert all((o.cx, o.cy) == cell_centre(o.row, o.col) for o in scene.objects)
    for prompt in ["a cat on a mat", "a red circle at the top and a blue square at the top",
                   ", ".join(f"a red circle at the {p}" for p in PLACES[:4])]:
        with pytest.raises(LaVITError):
            scene_from_prompt(prompt)


def test_questions_cover_every_kind_with_true_and_balanced_answers():
    rng = np.random.default_rng(0)
    ask = {"colour": colour_question, "place": place_question, "exists": exists_question,
           "count": lambda scene, rng: questions(scene, rng, ["count"])[0]}
    answers = {kind: Counter() for kind in ask}
    for scene in scenes(2, 2000):
        for kind, question_of in ask.items():
            pair = question_of(scene, rng)
            if pair is None:  # only a colour question, and only when no shape is unique
                assert kind == "colour" and min(Counter(o.shape for o in scene.objects).values()) > 1
                continue
            question, answer = pair
            assert answer_question(scene, question) == answer
            answers[kind][answer] += 1
        asked = [question for question, _ in questions(scene, rng)]
        assert len(asked) >= 3 and "how many shapes are there?" in asked
    assert abs(answers["exists"]["yes"] / answers["exists"].total() - 0.5) < 0.04
    assert set(answers["place"]) == {*SHAPES, "nothing"}
    assert 0.2 < answers["place"]["nothing"] / answers["place"].total() < 0.3
    assert set(answers["count"]) == {"one", "two", "three"}
    assert set(answers["colour"]) == set(COLOURS)
    # a shape is unique in all but ~15% of scenes (two or three objects of one shape)
    assert answers["colour"].total() > 0.8 * 2000


def test_question_wording():
    scene = Scene((obj("circle", "red", "center"),))
    rng = np.random.default_rng(0)
    places = {place_question(scene, rng)[0] for _ in range(200)}
    assert "what shape is in the center?" in places and "what shape is at the top left?" in places
    assert colour_question(scene, rng) == ("what color is the circle?", "red")
    assert answer_question(scene, "Is there a red circle?") == "yes"
    assert answer_question(scene, "what is the meaning of life?") is None
    with pytest.raises(LaVITError):
        questions(scene, rng, ["colour", "weather"])


def test_package_imports_without_mlx_or_torch():
    code = ("import sys; import lavit_mlx.shapes, lavit_mlx.shapes.checker, lavit_mlx.shapes.dataset, "
            "lavit_mlx.shapes.text_tokenizer; "
            "bad = [m for m in ('mlx', 'mlx.core', 'torch') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
