"""The synthetic shapes world: scenes, renders, captions, questions; a checker; a text tokenizer.

A tiny LaVIT is trained on this world and judged by `checker` (see `world` for the spec).
Pure numpy, Pillow and sentencepiece: nothing here imports mlx or torch.
"""

from .world import (
    CANVAS,
    COLOURS,
    COUNT_WORDS,
    GRID,
    NOTHING,
    PLACES,
    QUESTION_KINDS,
    SHAPES,
    Scene,
    ShapeObject,
    answer_question,
    caption,
    parse_caption,
    questions,
    render,
    sample_scene,
    scene_from_prompt,
    scenes,
)

__all__ = [
    "CANVAS", "COLOURS", "COUNT_WORDS", "GRID", "NOTHING", "PLACES", "QUESTION_KINDS", "SHAPES",
    "Scene", "ShapeObject", "answer_question", "caption", "parse_caption", "questions", "render",
    "sample_scene", "scene_from_prompt", "scenes",
]
