"""What the worker runs on the model: the checked requests and the runners over the
library's pipelines (`describe_stages`, `generate_stages`, `token_overlay`).

A runner takes the model and a batch of requests and yields `(index, event)` per step;
the worker (`queue.py`) owns delivery, stopping and errors. Understanding requests with
the same decoding settings share one `describe_stages` call: one EVA forward and one
left-padded LLM batch.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Hashable, Iterator, List, Optional, Sequence, Tuple

from ..generation import Done as ImagesDone
from ..generation import GenerationSettings, generate_stages
from ..sampling import TextDecoding
from ..understanding import Done as TextDone
from ..understanding import TextProgress, clean_answer, clean_caption, describe_stages
from .queue import Result

CLEANERS = {"caption": clean_caption, "vqa": clean_answer}
_solo = itertools.count()  # batch keys of requests that must run alone


@dataclass
class Understanding:
    """A checked chat request: one image (already resized to the model's input size) and its prompt."""

    image: object  # PIL image
    prompt: str  # '' (caption) or "Question: {} Answer:"
    task: str  # 'caption' or 'vqa'
    decoding: TextDecoding
    sample_tokens: bool = False
    seed: Optional[int] = None
    batchable: bool = True  # False when the prompt may not fit the context: a failure stays its own

    def batch_key(self) -> Hashable:
        """Requests with equal keys give the same answers alone or together."""
        seeded = self.seed is not None and (self.decoding.do_sample or self.sample_tokens)
        if seeded or not self.batchable:  # image i of a call uses seed + i: a given seed runs alone
            return ("solo", next(_solo))
        return ("understand", self.task, dataclasses.astuple(self.decoding), self.sample_tokens)


@dataclass
class TextUpdate:
    """The raw text decoded so far (the running best beam with beam search)."""

    text: str
    step: int


@dataclass
class Completion:
    answer: object  # understanding.Answer
    prompt_tokens: int  # [IMG] + visual tokens + [/IMG] + prompt tokens, as fed to the LLM
    image_tokens: int


class _RowLengths:
    """The model, seen by `describe_stages`, noting the length of every LLM input row
    (the visual token count is only known once the selector has run)."""

    def __init__(self, model):
        self._model = model
        self.rows: List[Tuple[int, int]] = []  # (visual tokens, prompt tokens) per row

    def __getattr__(self, name):
        return getattr(self._model, name)

    def understanding_rows(self, visual_embeds, prompts):
        self.rows += [(int(v.shape[0]), len(p)) for v, p in zip(visual_embeds, prompts)]
        return self._model.understanding_rows(visual_embeds, prompts)


def understand(model, requests: Sequence[Understanding]) -> Iterator[Tuple[int, object]]:
    """One batch of understanding requests (same `batch_key`) through `describe_stages`."""
    first = requests[0]
    counted = _RowLengths(model)
    stages = describe_stages(counted, [r.image for r in requests], [r.prompt for r in requests], first.decoding,
                             CLEANERS[first.task], sample_tokens=first.sample_tokens, seed=first.seed,
                             batch_size=len(requests))
    try:
        for event in stages:
            if isinstance(event, TextProgress):
                for offset, text in enumerate(event.texts):
                    yield event.first + offset, TextUpdate(text, event.step)
            elif isinstance(event, TextDone):
                for index, answer in enumerate(event.answers):
                    visual, prompt = counted.rows[index]
                    yield index, Result(Completion(answer, visual + 2 + prompt, visual))
    finally:
        stages.close()


@dataclass
class Generation:
    """A checked image request: resolved settings; prompt images as files of the request."""

    settings: GenerationSettings
    image_names: List[str]  # what the PNG metadata records for the prompt images (sha256 of each)


def generate(model, requests: Sequence[Generation]) -> Iterator[Tuple[int, object]]:
    request = requests[0]
    stages = generate_stages(model, request.settings)
    try:
        for event in stages:
            if isinstance(event, ImagesDone):
                # the metadata names the uploaded images by digest, not by their temporary files
                settings = dataclasses.replace(event.settings, images=list(request.image_names))
                yield 0, Result(dataclasses.replace(event, settings=settings))
            else:
                yield 0, event
    finally:
        stages.close()


@dataclass
class OverlayRequest:
    image: object  # PIL image, as uploaded
    sample: bool = False
    seed: Optional[int] = None


def overlay(model, requests: Sequence[OverlayRequest]) -> Iterator[Tuple[int, object]]:
    from ..pictures import token_overlay

    request = requests[0]
    yield 0, Result(token_overlay(model, request.image, sample=request.sample, seed=request.seed))


RUNNERS = {"understand": understand, "generate": generate, "overlay": overlay}

