"""The world's text tokenizer: LaVIT's special ids, a small vocabulary, exact round trips."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lavit_mlx.errors import LaVITError
from lavit_mlx.shapes import caption, questions, scenes
from lavit_mlx.shapes.text_tokenizer import (TOKENIZER_CONFIG_FILE, VOCAB_SIZE, VQA_PROMPT,
                                             train_text_tokenizer, world_words)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_text_tokenizer(tmp_path_factory.mktemp("world-tokenizer"))


@pytest.fixture(scope="module")
def tokenizer(trained):
    from lavit_mlx.models.llm import TextTokenizer  # imports mlx; the shapes package does not

    return TextTokenizer.from_folder(trained.parent)


def test_ids_and_config_follow_lavit(trained, tokenizer):
    assert tokenizer.vocab_size == VOCAB_SIZE
    assert [tokenizer.sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert tokenizer.sp.pad_id() == -1
    config = json.loads((trained.parent / TOKENIZER_CONFIG_FILE).read_text())
    assert config == {"legacy": True, "clean_up_tokenization_spaces": False}


def test_same_seed_same_bytes(trained, tmp_path):
    assert train_text_tokenizer(tmp_path / "again").read_bytes() == trained.read_bytes()


def test_every_world_text_round_trips(tokenizer):
    rng = np.random.default_rng(0)
    for scene in scenes(9, 1000):
        texts = [caption(scene)]
        for question, answer in questions(scene, rng):
            texts += [question, answer, VQA_PROMPT.format(question)]
        for text in texts:
            ids = tokenizer.encode(text)
            assert 0 not in ids, text  # no <unk>
            assert tokenizer.decode(ids) == text


def test_world_words_are_one_or_two_pieces(tokenizer):
    words = world_words()
    assert {"triangle", "purple", "nothing", "Question:", "center?"} <= set(words)
    for word in words:
        pieces = tokenizer.sp.encode(word, out_type=str)
        assert len(pieces) <= 2, (word, pieces)
        assert len(pieces) == 1 or pieces[1] in "?,:", (word, pieces)


def test_typed_prompts_need_no_unk(tokenizer):
    text = "A red circle, top-left (2 of them)! And: 'blue' squares?"
    assert 0 not in tokenizer.encode(text) and tokenizer.decode(tokenizer.encode(text)) == text


def test_too_small_vocabulary_is_a_user_error(tmp_path):
    with pytest.raises(LaVITError):
        train_text_tokenizer(tmp_path, vocab_size=64)
