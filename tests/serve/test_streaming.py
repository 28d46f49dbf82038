"""Streamed text: the deltas add up to the cleaned answer, even where the release's cleaning
cuts the text at a stop string after it has begun to stream."""

from __future__ import annotations

import pytest

from lavit_mlx.serve.events import TextStream
from lavit_mlx.understanding import clean_answer, clean_caption


def streamed(task: str, pieces, live: bool = True) -> tuple:
    stream, sent, raw = TextStream(task, live), [], ""
    for piece in pieces:
        raw += piece
        sent.append(stream.update(raw))
    final = (clean_caption if task == "caption" else clean_answer)(raw)
    sent.append(stream.finish(final))
    return "".join(sent), final, [s for s in sent if s]


@pytest.mark.parametrize("task, pieces", [
    ("caption", [" a", " dog", " on", " grass", ".", " It", " runs"]),
    ("vqa", [" Two", " dogs", " question", ":", " what"]),  # cut at "question:" after "question" was decoded
    ("vqa", [" Yes", " Long", " answer", ":", " it is"]),
    ("vqa", [" Red", ",", " and", " blue"]),
])
def test_deltas_add_up_to_the_cleaned_answer(task, pieces):
    text, final, _ = streamed(task, pieces)
    assert text == final


def test_an_incomplete_character_waits_for_the_rest():
    stream = TextStream("caption", live=True)
    # decoding a byte-fallback character token by token: its first bytes decode to U+FFFD
    deltas = [stream.update(raw) for raw in (" caf", " caf\ufffd", " café", " café au lait")]
    assert deltas == ["caf", "", "é", " au lait"]


def test_captions_stream_word_by_word():
    _, final, deltas = streamed("caption", [" a", " dog", " on", " grass"])
    assert deltas == ["a", " dog", " on", " grass"] and final == "a dog on grass"


def test_beam_search_sends_its_answer_at_the_end():
    text, final, deltas = streamed("caption", [" a", " dog"], live=False)
    assert deltas == ["a dog"] and text == final
