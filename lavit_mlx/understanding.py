"""Image understanding with LaVIT: captions and visual question answering.

Follows the official `lavit_for_understanding.py` (`generate`, `predict_answers`) and
LAVIT_REFERENCE.md section 4: the LLM reads `[IMG]`, the image's continuous visual
embeddings (the merger of `visual_weight.bin` + `vit_proj` on the kept patches),
`[/IMG]`, then the prompt; batches are left-padded with the eos embedding; visual ids
are suppressed.

- Caption: 2 beams, 8..36 new tokens, the text up to its first '.'.
- VQA: prompt "Question: {} Answer:", 5 beams, 2..10 new tokens, length_penalty 0; the
  answer is the first line, cut at ',' and '.', lower-cased.

The release *samples* the token selection for understanding (Gumbel); here the
deterministic rule is the default so that an answer is reproducible, and
`sample_tokens=True` (with a seed) gives the release's behaviour.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

from .errors import LaVITError
from .image_processing import ImageInput, load_or_error, preprocess, source_name
from .sampling import TextDecoding, beam_search, stream_text
from .seeding import resolve_seed

VQA_PROMPT = "Question: {} Answer:"
# Options of `caption`/`ask` that configure decoding; the others go to `describe`.
DECODING_OPTIONS = {"num_beams", "max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_k",
                    "top_p", "length_penalty", "repetition_penalty"}


@dataclass
class Answer:
    """One caption or answer."""

    text: str  # post-processed, as the release returns it
    raw: str  # the decoded text before post-processing
    token_ids: List[int]
    source: Optional[str] = None
    error: Optional[str] = None  # why this image could not be read (with skip_bad)


def clean_caption(text: str) -> str:
    return text.strip().split(".")[0]


def clean_answer(text: str) -> str:
    """The release's VQA post-processing (its optional spaCy lemmatizer aside)."""
    text = text.strip().split("\n")[0]
    for stop in ("question:", "Long answer:", ",", "."):
        text = text.split(stop)[0]
    return text.lower()


def _embeddings(model, pictures, prompts: Sequence[str], sample_tokens: bool, seeds):
    """Per image: [IMG] visual [/IMG] prompt, as LLM input embeddings."""
    size = model.eva.config.image_size
    out = model.tokenize_pixels(preprocess(pictures, size), sample=sample_tokens, seed=seeds, understanding=True)
    prompt_ids = [model.text_tokenizer.encode(p) if p else [] for p in prompts]
    rows = model.understanding_rows(out.visual_embeds, prompt_ids)
    model.llm.check_length(max(int(r.shape[0]) for r in rows))
    return rows


@dataclass
class TextProgress:
    """An event of `describe_stages`: the texts decoded so far for the images
    `first .. first + len(texts) - 1` of the call (the running best beams with beams)."""

    first: int
    texts: List[str]
    step: int


@dataclass
class Done:
    """The last event of `describe_stages`: one `Answer` per image, in order."""

    answers: List[Answer]


def _decode_rows(model, rows, decoding: TextDecoding, seeds: List[int]) -> Iterator[Tuple[int, List[List[int]], bool]]:
    """(step, token ids so far per row, final) while decoding a batch of input rows."""
    if decoding.num_beams > 1:
        for step in beam_search(model.llm, rows, decoding):
            if step.sequences is not None:
                yield step.step, step.sequences, True
            else:
                yield step.step, step.running, False
        return
    sequences = [[] for _ in rows]
    step = -1
    for step, tokens in enumerate(stream_text(model.llm, rows, decoding, seed=seeds)):
        for row, token in enumerate(tokens):
            if token is not None:
                sequences[row].append(token)
        yield step, sequences, False
    yield step, sequences, True


def describe_stages(
    model,
    images: Sequence[ImageInput],
    prompts: Sequence[str],
    decoding: TextDecoding,
    clean: Callable[[str], str],
    sample_tokens: bool = False,
    seed: Optional[int] = None,
    batch_size: int = 8,
    skip_bad: bool = False,
) -> Iterator[Union[TextProgress, Done]]:
    """Decode text for each (image, prompt) pair, as events: a `TextProgress` after every
    decoding step of every batch, then `Done` with the answers (see `describe`)."""
    if batch_size < 1:
        raise LaVITError(f"batch size {batch_size}: expected at least 1")
    if len(prompts) != len(images):
        raise LaVITError(f"{len(prompts)} prompts for {len(images)} images")
    base = resolve_seed(seed)
    tokenizer = model.text_tokenizer
    answers: List[Answer] = []
    for start in range(0, len(images), batch_size):
        chunk = list(images[start:start + batch_size])
        loaded = [load_or_error(image, skip_bad) for image in chunk]
        good = [i for i, (picture, _) in enumerate(loaded) if picture is not None]
        sequences = {}
        if good:
            seeds = [base + start + i for i in good]  # image j of the call: seed + j
            rows = _embeddings(model, [loaded[i][0] for i in good], [prompts[start + i] for i in good],
                               sample_tokens, seeds)
            for step, ids, final in _decode_rows(model, rows, decoding, seeds):
                if final:
                    sequences = dict(zip(good, ids))
                else:
                    yield TextProgress(start, [tokenizer.decode(row) for row in ids], step)
        for i, image in enumerate(chunk):
            if i in sequences:
                raw = tokenizer.decode(sequences[i])
                answers.append(Answer(clean(raw), raw, list(sequences[i]), source_name(image)))
            else:
                answers.append(Answer("", "", [], source_name(image), error=loaded[i][1]))
    yield Done(answers)


def describe(model, images: Sequence[ImageInput], prompts: Sequence[str], decoding: TextDecoding,
             clean: Callable[[str], str], sample_tokens: bool = False, seed: Optional[int] = None,
             stream: Optional[Callable[[List[str]], None]] = None, batch_size: int = 8, skip_bad: bool = False,
             progress: Optional[Callable[[int], None]] = None) -> List[Answer]:
    """Decode text for each (image, prompt) pair.

    Args:
        model: a `LaVIT`.
        images: paths or PIL images.
        prompts: one prompt per image ('' for none).
        decoding: beams, lengths, sampling (see `sampling.TextDecoding`).
        clean: post-processing of the decoded text.
        sample_tokens: sample the token selection as the release does (seeded).
        seed: for token selection and sampled decoding; image i of the call uses
            seed + i, so results do not depend on the batching. None draws one.
        stream: called with the texts decoded so far after each step (greedy/sampled
            decoding), or with the running best beams (beam search), per batch.
        batch_size: images per forward pass.
        skip_bad: an image that cannot be read gives an `Answer` with `error` set
            instead of raising; the others are answered.
        progress: called with the number of images done after each batch.

    Returns:
        One `Answer` per image, in order.
    """
    done_images = 0
    for event in describe_stages(model, images, prompts, decoding, clean, sample_tokens, seed, batch_size, skip_bad):
        if isinstance(event, Done):
            if progress and done_images < len(images):
                progress(len(images) - done_images)
            return event.answers
        if stream:
            stream(event.texts)
        if progress and event.first > done_images:
            progress(event.first - done_images)
            done_images = event.first
    raise LaVITError("decoding ended without a result")


def _split(options: dict) -> tuple:
    decoding = {k: v for k, v in options.items() if k in DECODING_OPTIONS and v is not None}
    return decoding, {k: v for k, v in options.items() if k not in DECODING_OPTIONS}


def caption(model, images: Sequence[ImageInput], prompt: str = "", **options) -> List[Answer]:
    """Captions, as the release's `generate` (2 beams, 8..36 new tokens, cut at the first '.').

    Options: num_beams, max_new_tokens, min_new_tokens, do_sample, temperature, top_k,
    top_p, length_penalty, repetition_penalty (decoding); sample_tokens, seed, stream.
    """
    decoding, rest = _split(options)
    return describe(model, images, [prompt] * len(images), TextDecoding.caption(**decoding), clean_caption, **rest)


def ask(model, images: Sequence[ImageInput], question: str, **options) -> List[Answer]:
    """Answers, as the release's `predict_answers` ("Question: {} Answer:", 5 beams,
    2..10 new tokens, length_penalty 0, early stopping); options as `caption`."""
    decoding, rest = _split(options)
    prompt = VQA_PROMPT.format(question)
    return describe(model, images, [prompt] * len(images), TextDecoding.vqa(early_stopping=True, **decoding),
                    clean_answer, **rest)
