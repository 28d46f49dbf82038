"""The shapes world: scenes, their pictures, captions and questions.

Spec (the contract the tiny default LaVIT is trained and judged on):

- a 224x224 RGB canvas on white, cut into a 3x3 grid of equal cells, each cell a place
  ("top left", "top", ..., "center", ..., "bottom right");
- 1 to 3 objects, each in its own cell, its box centred in the cell +-6 px, 40 to 60 px a
  side; a circle is inscribed in its box, a square is the box, a triangle has its apex at
  the top middle of the box and its base along the bottom edge;
- six colours (`COLOURS`), three shapes (`SHAPES`);
- the caption lists the objects in row-major cell order, "a red circle at the top left, a
  blue square in the center and a green triangle at the bottom right";
- four kinds of question: "what color is the SHAPE?" (asked only when the shape is unique),
  "what shape is at the PLACE?" (a shape or "nothing"), "how many shapes are there?"
  ("one", "two", "three"), "is there a COLOUR SHAPE?" ("yes" / "no", balanced).

Everything is deterministic under a numpy Generator: the same seed gives the same scenes,
pixels and questions. Pure numpy + Pillow (no mlx, no torch).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import product
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

from ..errors import LaVITError

CANVAS = 224
GRID = 3
CELL = CANVAS / GRID
BACKGROUND = (255, 255, 255)
MIN_SIZE, MAX_SIZE = 40, 60
MAX_OFFSET = 6  # how far an object's box centre may sit from its cell's centre
MAX_OBJECTS = 3

SHAPES = ("circle", "square", "triangle")
COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "green": (30, 170, 50),
    "blue": (30, 60, 230),
    "yellow": (245, 205, 20),
    "purple": (140, 50, 190),
    "orange": (250, 130, 20),
}
# Place names in row-major cell order: PLACES[row * GRID + col].
PLACES = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
COUNT_WORDS = ("one", "two", "three")
NOTHING = "nothing"
QUESTION_KINDS = ("colour", "place", "count", "exists")

# Supersampling factor of `render`: shapes are drawn 4x larger and box-filtered down, so
# edges are anti-aliased and the pixels depend only on the scene.
_SUPERSAMPLE = 4
# Longest place names first, so "top left" is not read as "top" followed by junk.
_PLACE_PATTERN = "|".join(sorted(PLACES, key=len, reverse=True))
_MENTION = re.compile(
    rf"\ban?\s+({'|'.join(COLOURS)})\s+({'|'.join(SHAPES)})\s+(?:at|in)\s+the\s+({_PLACE_PATTERN})(?![a-z])"
)


def place_phrase(place: str) -> str:
    """'at the top left', 'in the center': the words a caption or question puts before a place."""
    return f"in the {place}" if place == "center" else f"at the {place}"


@dataclass(frozen=True)
class ShapeObject:
    """One object: its shape and colour names, its cell, its box centre and side in pixels."""

    shape: str
    colour: str
    row: int
    col: int
    cx: float
    cy: float
    size: float

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise LaVITError(f"unknown shape {self.shape!r} (one of {', '.join(SHAPES)})")
        if self.colour not in COLOURS:
            raise LaVITError(f"unknown colour {self.colour!r} (one of {', '.join(COLOURS)})")
        if not (0 <= self.row < GRID and 0 <= self.col < GRID):
            raise LaVITError(f"cell ({self.row}, {self.col}) is outside the {GRID}x{GRID} grid")

    @property
    def cell(self) -> Tuple[int, int]:
        return (self.row, self.col)

    @property
    def place(self) -> str:
        return PLACES[self.row * GRID + self.col]

    @property
    def box(self) -> Tuple[float, float, float, float]:
        """(x0, y0, x1, y1): the bounding box, x1/y1 exclusive."""
        half = self.size / 2
        return (self.cx - half, self.cy - half, self.cx + half, self.cy + half)

    def phrase(self) -> str:
        return f"a {self.colour} {self.shape} {place_phrase(self.place)}"


@dataclass(frozen=True)
class Scene:
    """A picture's objects, in row-major cell order, at most one per cell."""

    objects: Tuple[ShapeObject, ...]

    def __post_init__(self):
        ordered = tuple(sorted(self.objects, key=lambda o: o.cell))
        object.__setattr__(self, "objects", ordered)
        if not 1 <= len(ordered) <= MAX_OBJECTS:
            raise LaVITError(f"a scene holds 1 to {MAX_OBJECTS} objects, not {len(ordered)}")
        for first, second in zip(ordered, ordered[1:]):
            if first.cell == second.cell:
                raise LaVITError(f"two objects {place_phrase(first.place)}")

    def at(self, place: str) -> Optional[ShapeObject]:
        return next((o for o in self.objects if o.place == place), None)


def cell_centre(row: int, col: int) -> Tuple[float, float]:
    """The centre (x, y) of a cell in pixels (a third of 224 is not whole: 37.33, 112, 186.67)."""
    return ((col + 0.5) * CELL, (row + 0.5) * CELL)


def sample_scene(rng: np.random.Generator) -> Scene:
    """A random scene: 1-3 objects in distinct cells, uniform shapes, colours, sizes, offsets."""
    count = int(rng.integers(1, MAX_OBJECTS + 1))
    cells = sorted(int(c) for c in rng.choice(GRID * GRID, size=count, replace=False))
    objects = []
    for cell in cells:
        row, col = divmod(cell, GRID)
        x, y = cell_centre(row, col)
        dx, dy = rng.integers(-MAX_OFFSET, MAX_OFFSET + 1, size=2)
        objects.append(ShapeObject(
            shape=SHAPES[int(rng.integers(len(SHAPES)))],
            colour=list(COLOURS)[int(rng.integers(len(COLOURS)))],
            row=row, col=col, cx=x + float(dx), cy=y + float(dy),
            size=float(rng.integers(MIN_SIZE, MAX_SIZE + 1)),
        ))
    return Scene(tuple(objects))


def scenes(seed: int, n: int) -> Iterator[Scene]:
    """The first `n` scenes of the world under `seed` (the same seed, the same scenes)."""
    if n < 0:
        raise LaVITError(f"number of scenes must be >= 0, not {n}")
    rng = np.random.default_rng(seed)
    for _ in range(n):
        yield sample_scene(rng)


def render(scene: Scene) -> Image.Image:
    """The scene's picture: a 224x224 RGB image, anti-aliased, identical for identical scenes."""
    scale = _SUPERSAMPLE
    canvas = Image.new("RGB", (CANVAS * scale, CANVAS * scale), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        # Boxes snap to the supersampled grid (within 1/8 px); Pillow fills both end pixels
        # of a box, and the box's far edge is exclusive here.
        x0, y0, x1, y1 = (round(v * scale) for v in obj.box)
        x1, y1 = x1 - 1, y1 - 1
        colour = COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        elif obj.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=colour)
    return canvas.reduce(scale)


def caption(scene: Scene) -> str:
    """'a red circle at the top left, a blue square in the center and a green triangle at ...'."""
    phrases = [o.phrase() for o in scene.objects]
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def parse_caption(text: str) -> List[Tuple[str, str, str]]:
    """(colour, shape, place) of every "a COLOUR SHAPE at/in the PLACE" in `text`, in order.

    Case, extra whitespace, "an" for "a" and "at"/"in" before any place are tolerated;
    whatever does not read as an object mention is skipped.
    """
    normal = " ".join(text.lower().split())
    return [match.groups() for match in _MENTION.finditer(normal)]


PATCH_CLASSES = (1 + len(COLOURS), 1 + len(SHAPES), 1 + GRID * GRID)  # `patch_objects`' classes, 0: none
INK_LEVEL = 200  # a pixel whose darkest channel is below this is part of an object (the canvas is white)
INK_FRACTION = 0.02  # a patch with more of its pixels inked than this holds part of an object


def patch_objects(image, caption_text: str, patch: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per patch of `image` (raster order), the object it shows, as class indices with 0 for
    none: colour (1 + index in `COLOURS`), shape (1 + index in `SHAPES`), cell (1 + row * 3 + col).

    The object is the caption's object in the cell that holds most of the patch's inked
    pixels; a patch with at most `INK_FRACTION` inked, or whose cell the caption leaves
    empty, shows none. `image` is a PIL image or an (H, W, 3) uint8 array (any size: cells
    are thirds of it). Raises when the caption names no object of this world.
    """
    objects = {place: (colour, shape) for colour, shape, place in parse_caption(caption_text)}
    if not objects:
        raise LaVITError(f"the caption {caption_text!r} names no object of the shapes world")
    pixels = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    H, W = pixels.shape[:2]
    if H % patch or W % patch:
        raise LaVITError(f"a {W}x{H} picture is not a whole number of {patch}-pixel patches")
    ink = pixels.min(axis=2) < INK_LEVEL
    cells = (np.arange(H)[:, None] * GRID // H) * GRID + (np.arange(W)[None, :] * GRID // W)  # (H, W)
    colours, shapes = list(COLOURS), list(SHAPES)
    rows, cols = H // patch, W // patch
    out = np.zeros((3, rows * cols), np.int32)
    for index in range(rows * cols):
        r, c = divmod(index, cols)
        window = (slice(r * patch, (r + 1) * patch), slice(c * patch, (c + 1) * patch))
        inked = ink[window]
        if inked.mean() <= INK_FRACTION:
            continue
        cell = int(np.bincount(cells[window][inked], minlength=GRID * GRID).argmax())
        found = objects.get(PLACES[cell])
        if found is not None:
            out[:, index] = (1 + colours.index(found[0]), 1 + shapes.index(found[1]), 1 + cell)
    return out[0], out[1], out[2]


def scene_from_prompt(text: str) -> Scene:
    """The scene a text-to-image prompt (a caption) asks for: each object centred in its cell.

    Raises:
        LaVITError: no object is named, two objects share a place, or more than three.
    """
    mentions = parse_caption(text)
    if not mentions:
        raise LaVITError(f"no 'a COLOUR SHAPE at the PLACE' in the prompt {text!r}")
    size = (MIN_SIZE + MAX_SIZE) / 2
    objects = []
    for colour, shape, place in mentions:
        row, col = divmod(PLACES.index(place), GRID)
        x, y = cell_centre(row, col)
        objects.append(ShapeObject(shape, colour, row, col, x, y, size))
    return Scene(tuple(objects))


# Questions. Each kind has its own function; `questions` asks one of every kind it can.

def colour_question(scene: Scene, rng: np.random.Generator) -> Optional[Tuple[str, str]]:
    """'what color is the SHAPE?' about a shape that occurs once; None when none does."""
    unique = [o for o in scene.objects if sum(p.shape == o.shape for p in scene.objects) == 1]
    if not unique:
        return None
    obj = unique[int(rng.integers(len(unique)))]
    return f"what color is the {obj.shape}?", obj.colour


def place_question(scene: Scene, rng: np.random.Generator) -> Tuple[str, str]:
    """'what shape is at the PLACE?'; an empty place 1 time in 4, so "nothing" is as common as a shape."""
    empty = [p for p in PLACES if scene.at(p) is None]
    if rng.random() < 0.25:
        place = empty[int(rng.integers(len(empty)))]
    else:
        place = scene.objects[int(rng.integers(len(scene.objects)))].place
    obj = scene.at(place)
    return f"what shape is {place_phrase(place)}?", obj.shape if obj else NOTHING


def count_question(scene: Scene) -> Tuple[str, str]:
    return "how many shapes are there?", COUNT_WORDS[len(scene.objects) - 1]


def exists_question(scene: Scene, rng: np.random.Generator) -> Tuple[str, str]:
    """'is there a COLOUR SHAPE?', "yes" half the time.

    Half of the "no" questions change one attribute of an object in the scene, so that
    answering needs colour and shape bound together, not either alone.
    """
    present = {(o.colour, o.shape) for o in scene.objects}
    if rng.random() < 0.5:
        obj = scene.objects[int(rng.integers(len(scene.objects)))]
        return f"is there a {obj.colour} {obj.shape}?", "yes"
    absent = [pair for pair in product(COLOURS, SHAPES) if pair not in present]
    if rng.random() < 0.5:
        obj = scene.objects[int(rng.integers(len(scene.objects)))]
        absent = [pair for pair in absent if pair[0] == obj.colour or pair[1] == obj.shape]
    colour, shape = absent[int(rng.integers(len(absent)))]
    return f"is there a {colour} {shape}?", "no"


def questions(scene: Scene, rng: np.random.Generator,
              kinds: Sequence[str] = QUESTION_KINDS) -> List[Tuple[str, str]]:
    """One (question, answer) of each kind in `kinds` (a colour question only when one can be asked).

    Args:
        scene: the scene asked about.
        rng: the generator choosing what is asked.
        kinds: a subset of `QUESTION_KINDS` ("colour", "place", "count", "exists").
    Returns:
        (question, answer) pairs in the order of `kinds`.
    """
    unknown = [k for k in kinds if k not in QUESTION_KINDS]
    if unknown:
        raise LaVITError(f"unknown question kind {unknown[0]!r} (one of {', '.join(QUESTION_KINDS)})")
    pairs = []
    for kind in kinds:
        if kind == "colour":
            pair = colour_question(scene, rng)
        elif kind == "place":
            pair = place_question(scene, rng)
        elif kind == "count":
            pair = count_question(scene)
        else:
            pair = exists_question(scene, rng)
        if pair is not None:
            pairs.append(pair)
    return pairs


_COLOUR_Q = re.compile(rf"what colou?r is the ({'|'.join(SHAPES)})\??")
_PLACE_Q = re.compile(rf"what shape is (?:at|in) the ({_PLACE_PATTERN})\??")
_COUNT_Q = re.compile(r"how many shapes are there\??")
_EXISTS_Q = re.compile(rf"is there an? ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})\??")


def answer_question(scene: Scene, question: str) -> Optional[str]:
    """The true answer to a world question about `scene`; None when the scene does not settle it
    (a colour question about a shape that is absent or not unique) or the question is not one of
    the world's four kinds."""
    normal = " ".join(question.lower().split())
    if match := _COLOUR_Q.fullmatch(normal):
        same = [o for o in scene.objects if o.shape == match.group(1)]
        return same[0].colour if len(same) == 1 else None
    if match := _PLACE_Q.fullmatch(normal):
        obj = scene.at(match.group(1))
        return obj.shape if obj else NOTHING
    if _COUNT_Q.fullmatch(normal):
        return COUNT_WORDS[len(scene.objects) - 1]
    if match := _EXISTS_Q.fullmatch(normal):
        pair = match.groups()
        return "yes" if any((o.colour, o.shape) == pair for o in scene.objects) else "no"
    return None
