"""A small sentencepiece text tokenizer for the shapes world, in LaVIT's id convention.

The release's LLaMA tokenizer has 0 `<unk>`, 1 `<s>`, 2 `</s>` and no pad piece (LaVIT
pads with `</s>`, `config.TokenIds`), and is read by the slow `LlamaTokenizer` in legacy
mode (`lavit_mlx.models.llm.TextTokenizer`). This one keeps those ids and normalisation
(identity, a dummy prefix, spaces kept) but learns a 256-piece BPE vocabulary from the
world's own text: every caption, question, answer and the VQA prompt
"Question: {} Answer:", so that every world word is one piece (two with its "?" or ",").
Every printable ASCII character is a piece too, so a typed prompt never needs `<unk>`.
"""

from __future__ import annotations

import io
import json
import string
from itertools import product
from pathlib import Path
from typing import Iterator, List

import numpy as np

from ..errors import LaVITError
from .dataset import write_atomic
from .world import (COLOURS, COUNT_WORDS, NOTHING, PLACES, SHAPES, caption, place_phrase,
                    questions, scenes)

VQA_PROMPT = "Question: {} Answer:"  # the release's VQA template (LAVIT_REFERENCE.md, "ask")
VOCAB_SIZE = 256
TOKENIZER_FILE = "tokenizer.model"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
TOKENIZER_CONFIG = {"legacy": True, "clean_up_tokenization_spaces": False}
CORPUS_SCENES = 2000
_PRINTABLE = "".join(c for c in string.printable if c.isprintable() and not c.isspace())


def world_texts(seed: int = 0, n: int = CORPUS_SCENES) -> Iterator[str]:
    """Every kind of text the world produces: each object phrase, question and answer once,
    then the captions, questions, answers and VQA prompts of `n` scenes under `seed` (which
    give the pieces their natural frequencies)."""
    for colour, shape, place in product(COLOURS, SHAPES, PLACES):
        yield f"a {colour} {shape} {place_phrase(place)}"
    fixed = [f"what color is the {shape}?" for shape in SHAPES]
    fixed += [f"what shape is {place_phrase(place)}?" for place in PLACES]
    fixed += ["how many shapes are there?"]
    fixed += [f"is there a {colour} {shape}?" for colour, shape in product(COLOURS, SHAPES)]
    for question in fixed:
        yield question
        yield VQA_PROMPT.format(question)
    yield from (*COLOURS, *SHAPES, NOTHING, *COUNT_WORDS, "yes", "no")
    rng = np.random.default_rng([seed, 1])  # questions draw from their own stream
    for scene in scenes(seed, n):
        yield caption(scene)
        for question, answer in questions(scene, rng):
            yield VQA_PROMPT.format(question)
            yield answer


def train_text_tokenizer(out_dir, seed: int = 0, vocab_size: int = VOCAB_SIZE) -> Path:
    """Train the world's sentencepiece model and write it with its tokenizer config.

    The same seed gives the same bytes: one thread, no sampling or shuffling of the
    sentences, and the model is trained from memory so no path is recorded in it.

    Args:
        out_dir: folder to write `tokenizer.model` and `tokenizer_config.json` into.
        seed: seed of the scenes whose text is learned from.
        vocab_size: number of pieces (the specials and printable ASCII take 98).
    Returns:
        The path of `tokenizer.model`.
    """
    import sentencepiece as spm

    reserved = len(_PRINTABLE) + 4  # the characters, "\u2581" and <unk>, <s>, </s>
    if vocab_size <= reserved:
        raise LaVITError(f"vocab_size must exceed {reserved} (printable ASCII and the specials), not {vocab_size}")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=world_texts(seed),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,  # the world has fewer merges than a large vocab_size asks for
        character_coverage=1.0,
        required_chars=_PRINTABLE,
        # LLaMA's conventions: ids 0/1/2 for <unk>/<s>/</s>, no pad piece, text kept as typed.
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        split_digits=True,
        # Determinism: every sentence, in order, on one thread.
        input_sentence_size=0,
        shuffle_input_sentence=False,
        num_threads=1,
        minloglevel=2,
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / TOKENIZER_FILE, model.getvalue())
    write_atomic(out_dir / TOKENIZER_CONFIG_FILE, (json.dumps(TOKENIZER_CONFIG, indent=2) + "\n").encode())
    return out_dir / TOKENIZER_FILE


def world_words() -> List[str]:
    """The distinct whitespace-separated words of the world's text (punctuation attached)."""
    return sorted({word for text in world_texts(0, 200) for word in text.split()})
