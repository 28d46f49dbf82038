"""The checker reads every rendered scene back, survives mild damage, and scores fairly."""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from lavit_mlx.errors import LaVITError
from lavit_mlx.shapes import Scene, ShapeObject, caption, render, scene_from_prompt, scenes
from lavit_mlx.shapes.checker import read_scene, scene_matches, score_answer, score_caption, score_image

CLEAN_SCENES = 500
DAMAGED_SCENES = 200


@pytest.fixture(scope="module")
def rendered():
    world = list(scenes(11, CLEAN_SCENES))
    return world, [render(scene) for scene in world]


def _pixels(array) -> Image.Image:
    return Image.fromarray(np.clip(np.round(array), 0, 255).astype(np.uint8))


def _noise(image, rng):
    return _pixels(np.asarray(image, np.float32) + rng.normal(0, 10, (224, 224, 3)))


def _jpeg(image, rng):
    data = io.BytesIO()
    image.save(data, format="JPEG", quality=70)
    return Image.open(io.BytesIO(data.getvalue())).convert("RGB")


DAMAGE = {
    "noise": _noise,
    "blur": lambda image, rng: image.filter(ImageFilter.GaussianBlur(1.5)),
    "jpeg": _jpeg,
    "brighter": lambda image, rng: _pixels(np.asarray(image, np.float32) + 10),
    "darker": lambda image, rng: _pixels(np.asarray(image, np.float32) - 10),
    "off-white": lambda image, rng: _pixels(np.asarray(image, np.float32) * np.array([0.94, 0.91, 0.86])),
}


def test_every_rendered_scene_reads_back(rendered):
    world, images = rendered
    for scene, image in zip(world, images):
        detected = read_scene(image)
        assert scene_matches(detected, scene), caption(scene)
        for o, d in zip(scene.objects, detected):
            # the apex of a triangle is thinner than half a pixel for its first ~2 rows
            assert np.abs(np.array(d.bbox) - np.array(o.box)).max() <= 2


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_mildly_damaged_scenes_read_back(rendered, damage):
    world, images = rendered
    rng = np.random.default_rng(0)
    right = sum(scene_matches(read_scene(DAMAGE[damage](image, rng)), scene)
                for scene, image in zip(world[:DAMAGED_SCENES], images[:DAMAGED_SCENES]))
    assert right / DAMAGED_SCENES >= 0.99


def test_speckles_are_not_objects():
    rng = np.random.default_rng(1)
    scene = next(scenes(3, 1))
    image = render(scene)
    draw = ImageDraw.Draw(image)
    blank = Image.new("RGB", (224, 224), (255, 255, 255))
    blank_draw = ImageDraw.Draw(blank)
    for _ in range(60):
        x, y = (int(v) for v in rng.integers(0, 224, 2))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        for canvas in (draw, blank_draw):
            canvas.rectangle((x, y, x + 1, y + 1), fill=colour)
    assert read_scene(blank) == []
    assert scene_matches(read_scene(image), scene)


def test_touching_objects_of_two_colours_are_both_read():
    left = ShapeObject("square", "yellow", 0, 0, 50.0, 50.0, 60.0)
    right = ShapeObject("circle", "green", 0, 1, 98.0, 50.0, 50.0)  # overlaps the square's edge
    image = render(Scene((left, right))).filter(ImageFilter.GaussianBlur(2))
    assert [(d.colour, d.shape, d.place) for d in read_scene(image)] == [
        ("yellow", "square", "top left"), ("green", "circle", "top")]


def test_other_sizes_and_arrays_are_read_on_the_canvas_grid():
    scene = next(scenes(4, 1))
    large = render(scene).resize((512, 512), Image.BICUBIC)
    assert scene_matches(read_scene(large), scene)
    assert scene_matches(read_scene(np.asarray(render(scene))), scene)
    with pytest.raises(LaVITError):
        read_scene(np.zeros((8, 8)))
    with pytest.raises(LaVITError):
        read_scene("picture.png")


def test_score_caption_counts_each_attribute():
    scene = scene_from_prompt("a red circle at the top left, a blue square in the center and "
                              "a green triangle at the bottom right")
    exact = score_caption(caption(scene), scene)
    assert exact.correct and (exact.colour, exact.shape, exact.place) == (1, 1, 1)
    wrong_colour = score_caption(caption(scene).replace("blue", "purple"), scene)
    assert not wrong_colour.correct and wrong_colour.colour == pytest.approx(2 / 3)
    assert (wrong_colour.shape, wrong_colour.place) == (1, 1)
    # order does not matter; the matching pairs mentions with objects one to one
    reordered = "a green triangle at the bottom right and a red circle at the top left"
    partial = score_caption(reordered, scene)
    assert not partial.correct and partial.place == pytest.approx(2 / 3) and partial.mentions == 2
    extra = score_caption(caption(scene) + " and a red circle at the top", scene)
    assert not extra.correct and (extra.colour, extra.shape, extra.place) == (1, 1, 1)
    rambling = score_caption(" and ".join(["a red square at the bottom"] * 500), scene)
    assert rambling.mentions == 500 and (rambling.colour, rambling.shape, rambling.place) == (1 / 3, 1 / 3, 0)
    nothing = score_caption("a picture", scene)
    assert not nothing.correct and (nothing.colour, nothing.shape, nothing.place) == (0, 0, 0)


def test_score_answer_normalises_surface_form():
    assert score_answer(" Yes.", "yes").correct
    assert score_answer("3", "three").correct
    assert score_answer("the circle", "circle").correct
    assert not score_answer("no", "yes").correct
    assert not score_answer("red circle", "red").correct


def test_score_image_separates_missing_wrong_and_extra_objects():
    scene = scene_from_prompt("a red circle at the top left and a blue square in the center")
    red, blue = scene.objects
    wrong_shape = render(Scene((red, replace(blue, shape="triangle"))))
    score = score_image(wrong_shape, scene)
    assert not score.correct and (score.found, score.shapes_right, score.extra) == (2, 1, 0)
    moved = render(Scene((red, replace(blue, row=2, col=2, cx=186.0, cy=186.0))))
    score = score_image(moved, scene)
    assert not score.correct and (score.found, score.extra) == (1, 1)
    extra = render(Scene((red, blue, ShapeObject("circle", "green", 0, 2, 187.0, 37.0, 50.0))))
    score = score_image(extra, scene)
    assert not score.correct and (score.found, score.shapes_right, score.extra) == (2, 2, 1)
    assert score_image(render(scene), scene).correct
    blank = score_image(Image.new("RGB", (224, 224), "white"), scene)
    assert not blank.correct and blank.found_fraction == 0 and blank.detected == ()
