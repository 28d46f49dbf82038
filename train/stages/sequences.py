"""Stage 2's sequences, pure Python + numpy: the MLX llm stage's layout, position for position.

    understanding [image, text]:  [IMG] e_1 .. e_T [/IMG] prompt text eos
    generation    [text, image]:  text [IMG] v_1 .. v_T [/IMG]

Inputs are tokens[:-1], targets tokens[1:]; a visual input slot takes the merger's
embedding of a kept patch, its target is the next visual id; targets are masked per
modality and arrangement (`target_masks`), the VQA prompt is input only (`mask_prompt`).
Same functions as `lavit_mlx/training/stages/llm.py` (`understanding_sequence`,
`generation_sequence`, `target_masks`, `collate`); the test suite compares them where the
MLX stage imports. They belong in one pure module both trainers import.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Dict, List, Tuple

import numpy as np

from lavit_mlx.config import TokenIds
from lavit_mlx.data import bucket_length

NONE, TEXT, IMAGE, PROMPT = 0, 1, 2, 3  # kinds of a target token
VQA_PROMPT = "Question: {} Answer:"  # lavit_mlx.understanding.VQA_PROMPT, the release's


@dataclass
class Sequence:
    """A laid-out sequence: per position its input (an id, or a visual slot) and its target."""

    ids: List[int]  # input ids (pad where a visual embedding goes)
    slots: List[int]  # visual slot per position (-1: the input is `ids`)
    targets: List[int]  # the next token's id
    kinds: List[int]  # TEXT, IMAGE, PROMPT, NONE: the kind of the target


def _shifted(tokens, pad: int) -> Sequence:
    inputs, following = tokens[:-1], tokens[1:]
    return Sequence(ids=[pad if s >= 0 else t for t, s, _ in inputs], slots=[s for _, s, _ in inputs],
                    targets=[t for t, _, _ in following], kinds=[k for _, _, k in following])


def understanding_sequence(prompt: List[int], text: List[int], codes: np.ndarray, slots: List[int],
                           ids: TokenIds) -> Sequence:
    """[IMG] e_1..e_T [/IMG] prompt text eos: visual embeddings in, visual ids as their next-token targets."""
    visual_ids = (np.asarray(codes) + ids.visual_offset).tolist()
    tokens = ([(ids.image_start, -1, IMAGE)] + [(v, s, IMAGE) for v, s in zip(visual_ids, slots)]
              + [(ids.image_end, -1, IMAGE)] + [(t, -1, PROMPT) for t in prompt]
              + [(t, -1, TEXT) for t in text] + [(ids.eos, -1, TEXT)])
    return _shifted(tokens, ids.pad)


def generation_sequence(text: List[int], codes: np.ndarray, ids: TokenIds) -> Sequence:
    """text [IMG] v_1..v_T [/IMG]: what text-to-image generation reads and writes (ids only)."""
    visual_ids = (np.asarray(codes) + ids.visual_offset).tolist()
    tokens = ([(t, -1, TEXT) for t in text] + [(ids.image_start, -1, IMAGE)]
              + [(v, -1, IMAGE) for v in visual_ids] + [(ids.image_end, -1, IMAGE)])
    return _shifted(tokens, ids.pad)


def target_masks(kinds: np.ndarray, generation: np.ndarray, loss) -> Tuple[np.ndarray, np.ndarray]:
    """(text, image) float masks of the targets that count, per arrangement's setting."""

    def wanted(setting: str, kind: int) -> bool:
        return setting == "both" or setting == {TEXT: "text", IMAGE: "image"}[kind]

    text = np.zeros(kinds.shape, np.float32)
    image = np.zeros(kinds.shape, np.float32)
    for rows, setting in ((~generation, loss.understanding_targets), (generation, loss.generation_targets)):
        if wanted(setting, TEXT):
            text[rows] = kinds[rows] == TEXT
            if not loss.mask_prompt:
                text[rows] += kinds[rows] == PROMPT
        if wanted(setting, IMAGE):
            image[rows] = kinds[rows] == IMAGE
    return text, image


def pair_rng(seed: int, epoch: int, index: int, shard: str) -> np.random.Generator:
    """The draws of one data line, from (seed, epoch, shard, index) as the MLX stage makes them, so
    a resumed run (and either framework) lays it out the same."""
    return np.random.default_rng([seed, epoch, index, zlib.crc32(shard.encode())])


def vqa_used(rng: np.random.Generator, loss) -> bool:
    """Whether a VQA line is used this epoch (`vqa_fraction` of them)."""
    return loss.vqa_fraction >= 1.0 or rng.random() < loss.vqa_fraction


def arrangement(rng: np.random.Generator, loss) -> Tuple[bool, bool]:
    """(generation order, text dropped) of a caption pair."""
    generation = bool(rng.random() < loss.generation_fraction)
    dropped = generation and bool(rng.random() < loss.drop_text)
    return generation, dropped


def layout(examples: List[dict], keep: np.ndarray, codes: np.ndarray, ids: TokenIds, loss, bucket: int,
           max_length: int, features: bool) -> Dict[str, np.ndarray]:
    """Right-padded arrays of a batch (the MLX `collate`).

    Args:
        examples: per sequence {"prompt", "text", "generation"}; row i is image i.
        keep: (B, N) bool, the understanding selector's kept patches; codes: (B, N) codes.
        features: the merger runs over all N patches (slot = patch index); otherwise the
            embeddings are the kept rows (slot = rank among them).

    Returns:
        ids, slots, targets (B, L) int; visual (B, L) bool; text_mask, image_mask (B, L).
    """
    sequences = []
    for row, e in enumerate(examples):
        kept_codes = codes[row][keep[row]]
        if e["generation"]:
            sequences.append(generation_sequence(e["text"], kept_codes, ids))
        else:
            slots = np.flatnonzero(keep[row]).tolist() if features else list(range(len(kept_codes)))
            sequences.append(understanding_sequence(e["prompt"], e["text"], kept_codes, slots, ids))
    length = bucket_length(max(len(s.ids) for s in sequences), bucket, max_length=max_length)
    B = len(sequences)
    tokens = np.full((B, length), ids.pad, np.int64)
    slots = np.zeros((B, length), np.int64)
    visual = np.zeros((B, length), bool)
    targets = np.zeros((B, length), np.int64)
    kinds = np.zeros((B, length), np.int64)
    for row, s in enumerate(sequences):
        n = min(len(s.ids), length)
        tokens[row, :n], targets[row, :n], kinds[row, :n] = s.ids[:n], s.targets[:n], s.kinds[:n]
        slot = np.asarray(s.slots[:n])
        visual[row, :n] = slot >= 0
        slots[row, :n] = np.maximum(slot, 0)
    generation = np.array([e["generation"] for e in examples])[:, None] & np.ones((1, length), bool)
    text_mask, image_mask = target_masks(kinds, generation, loss)
    return {"ids": tokens, "slots": slots, "visual": visual, "targets": targets,
            "text_mask": text_mask, "image_mask": image_mask}
