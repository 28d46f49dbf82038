"""The synthetic shapes world: scenes, pictures, captions, questions; a checker; a text tokenizer.

A tiny LaVIT is trained on this world and judged by `checker` (the spec is in `world`'s
docstring). Pure numpy, Pillow and sentencepiece: nothing here imports mlx or torch.
"""

from .checker import (AnswerScore, CaptionScore, DetectedObject, ImageScore, read_scene, score_answer,
                      score_caption, score_image)
from .dataset import write_manifest
from .text_tokenizer import VQA_PROMPT, train_text_tokenizer
from .world import (CANVAS, COLOURS, COUNT_WORDS, GRID, NOTHING, PLACES, QUESTION_KINDS, SHAPES, Scene,
                    ShapeObject, answer_question, caption, parse_caption, questions, render, sample_scene,
                    scene_from_prompt, scenes)

__all__ = [
    "CANVAS", "COLOURS", "COUNT_WORDS", "GRID", "NOTHING", "PLACES", "QUESTION_KINDS", "SHAPES", "VQA_PROMPT",
    "Scene", "ShapeObject", "answer_question", "caption", "parse_caption", "questions", "render",
    "sample_scene", "scene_from_prompt", "scenes",
    "DetectedObject", "CaptionScore", "AnswerScore", "ImageScore", "read_scene", "score_caption",
    "score_answer", "score_image", "train_text_tokenizer", "write_manifest",
]
