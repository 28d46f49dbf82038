"""LaVIT's decoding loops on the LLM, with transformers 4.33.2 `generate` semantics.

The release calls `LlamaForCausalLM.generate(inputs_embeds=..., attention_mask=...)`
(official `lavit_for_understanding.py`, `lavit_for_generation.py`; reference section 4).
What that means in 4.33.2 and is reproduced here:

- `input_ids` starts as `[[bos]]` per row (bos = `<s>` for text, `[IMG]` for images).
  The bos is never fed to the model but counts in every length: max_length =
  1 + max_new_tokens, `MinNewTokensLengthLogitsProcessor` skips a prompt of 1, a
  beam hypothesis' length (for the length penalty) is bos + its tokens before eos,
  and `BeamSearchScorer.process` calls `is_done` with cur_len = len(input_ids) + 1.
- Position ids come from the attention mask, so in a left-padded batch every row
  starts at position 0: mlx-lm's BatchKVCache (per-row offsets) does exactly this.
- Logits processors in transformers' order: classifier-free guidance, repetition
  penalty, min_new_tokens (eos -> -inf), suppress_tokens; then the sampling warpers
  temperature, top-k, top-p; then argmax or multinomial sampling. Beam search runs the
  processors on log-softmax scores.
- Classifier-free guidance for image tokens is in `image_tokens.py`; the processors and
  the pipelined loop here serve both.

Loops are generators that yield once per step (mlx-lm `generate_step`); the next step
is queued with `mx.async_eval` before the current tokens are read, and all logits
processing stays on the device. `generate_text` collects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Sequence, Union

import mlx.core as mx
import numpy as np

from .config import TokenIds
from .errors import LaVITError
from .models.llm import LanguageModel
from .seeding import MAX_SEED, check_seed, new_seed

# transformers' BeamSearch initial score of every beam but the first, and its candidate
# count per row: max(2, 1 + number of eos ids) * num_beams.
_INACTIVE_BEAM_SCORE = -1e9
_CANDIDATES_PER_BEAM = 2


@dataclass
class TextDecoding:
    """Options of `generate(...)` for text; defaults are transformers' GenerationConfig ones."""

    max_new_tokens: int = 36
    min_new_tokens: int = 0
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0
    early_stopping: Union[bool, str] = False

    @classmethod
    def caption(cls, **overrides) -> "TextDecoding":
        """The release's captioning: 2 beams, 8..36 new tokens (reference section 4)."""
        return cls(**{"num_beams": 2, "max_new_tokens": 36, "min_new_tokens": 8, **overrides})

    @classmethod
    def vqa(cls, **overrides) -> "TextDecoding":
        """The release's VQA: 5 beams, 2..10 new tokens, length_penalty 0."""
        return cls(**{"num_beams": 5, "max_new_tokens": 10, "min_new_tokens": 2, "length_penalty": 0.0,
                      **overrides})

    def __post_init__(self):
        check_common(self.max_new_tokens, self.min_new_tokens, self.temperature, self.top_k, self.top_p)
        if self.num_beams < 1:
            raise LaVITError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.num_beams > 1 and self.do_sample:
            raise LaVITError("sampling with beams (beam_sample) is not supported: use num_beams=1 or do_sample=False")
        if not (isinstance(self.early_stopping, bool) or self.early_stopping == "never"):
            raise LaVITError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        if self.repetition_penalty <= 0:
            raise LaVITError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


def check_common(max_new, min_new, temperature, top_k, top_p):
    if max_new < 1:
        raise LaVITError(f"max_new_tokens must be >= 1, got {max_new}")
    if min_new < 0:
        raise LaVITError(f"min_new_tokens must be >= 0, got {min_new}")
    if temperature <= 0:
        raise LaVITError(f"temperature must be > 0, got {temperature}")
    if top_k < 0:
        raise LaVITError(f"top_k must be >= 0, got {top_k}")
    if not 0 < top_p <= 1:
        raise LaVITError(f"top_p must be in (0, 1], got {top_p}")


# ----------------------------------------------------------------------------- processors
# Logits processors in mlx-lm's convention, `processor(tokens, logits) -> logits`, where
# `tokens` (rows, t) is what transformers keeps in input_ids: the bos, then every token
# generated so far. They apply in transformers' order (see `make_logits_processors`).
Processor = Callable[[mx.array, mx.array], mx.array]
Sampler = Callable[[mx.array], mx.array]


def id_mask(vocab_size: int, ids: Sequence[int]) -> mx.array:
    mask = np.zeros(vocab_size, dtype=bool)
    mask[np.asarray(list(ids), dtype=np.int64)] = True
    return mx.array(mask)


def visual_suppression(token_ids: TokenIds) -> List[int]:
    """Ids the release suppresses when decoding text: `[IMG]`, `[/IMG]` and every visual code."""
    return list(range(token_ids.image_start, token_ids.vocab_size))


def neg_inf(scores: mx.array, mask: mx.array) -> mx.array:
    return mx.where(mask, mx.array(-mx.inf, scores.dtype), scores)


def suppress_tokens(ids: Sequence[int], vocab_size: int) -> Processor:
    """SuppressTokensLogitsProcessor: these ids are never generated."""
    mask = id_mask(vocab_size, ids)
    return lambda tokens, logits: neg_inf(logits, mask)


def min_new_tokens(count: int, end_id: int, vocab_size: int) -> Processor:
    """MinNewTokensLengthLogitsProcessor: `end_id` is forbidden until `count` new tokens
    (the bos in `tokens` is not counted)."""
    mask = id_mask(vocab_size, [end_id])
    return lambda tokens, logits: neg_inf(logits, mask) if tokens.shape[1] - 1 < count else logits


def repetition_penalty(penalty: float) -> Processor:
    """RepetitionPenaltyLogitsProcessor over the tokens in `tokens` (the bos included)."""

    def process(tokens: mx.array, logits: mx.array) -> mx.array:
        seen = mx.zeros(logits.shape, mx.bool_)
        seen = mx.put_along_axis(seen, tokens, mx.ones(tokens.shape, mx.bool_), axis=-1)
        penalised = mx.where(logits < 0, logits * penalty, logits / penalty)
        return mx.where(seen, penalised, logits)

    return process


def classifier_free_guidance(scale: float) -> Processor:
    """UnbatchedClassifierFreeGuidanceLogitsProcessor on one batch [cond rows; uncond rows]:
    both go through log-softmax and out = scale * (cond - uncond) + uncond. It halves the
    rows, so it comes first."""

    def process(tokens: mx.array, logits: mx.array) -> mx.array:
        scores = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        rows = scores.shape[0] // 2
        cond, uncond = scores[:rows], scores[rows:]
        return scale * (cond - uncond) + uncond

    return process


def make_logits_processors(token_ids: TokenIds, vocab_size: int, *, end_id: int, min_new: int,
                           suppress: Sequence[int], repetition: float = 1.0,
                           guidance: Optional[float] = None) -> List[Processor]:
    """LaVIT's decoding rules as processors, in transformers 4.33.2's order: classifier-free
    guidance, repetition penalty, min_new_tokens, suppress_tokens."""
    processors: List[Processor] = []
    if guidance is not None and guidance != 1.0:  # transformers adds no guidance processor at 1
        processors.append(classifier_free_guidance(guidance))
    if repetition != 1.0:
        processors.append(repetition_penalty(repetition))
    if min_new > 0:
        processors.append(min_new_tokens(min_new, end_id, vocab_size))
    processors.append(suppress_tokens(suppress, vocab_size))
    return processors


def _warp(scores: mx.array, temperature: float, top_k: int, top_p: float, min_keep: int = 1) -> mx.array:
    """TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper, in that order."""
    if temperature != 1.0:
        scores = scores / temperature
    vocab = scores.shape[-1]
    if top_k:
        k = min(max(top_k, min_keep), vocab)
        kth = -mx.partition(-scores, k - 1, axis=-1)[..., k - 1 : k]  # k-th largest, (rows, 1)
        scores = neg_inf(scores, scores < kth)
    if top_p < 1.0:
        order = mx.argsort(scores, axis=-1)  # ascending
        cumulative = mx.cumsum(mx.softmax(mx.take_along_axis(scores, order, axis=-1), axis=-1), axis=-1)
        drop_sorted = (cumulative <= 1 - top_p) & (mx.arange(vocab) < vocab - min_keep)
        drop = mx.put_along_axis(mx.zeros(scores.shape, dtype=mx.bool_), order, drop_sorted, axis=-1)
        scores = neg_inf(scores, drop)
    return scores


def row_seeds(seed, rows: int) -> List[int]:
    """Row i samples with seed + i, so that a row of a batch can be reproduced alone; a
    list gives every row's seed itself."""
    if isinstance(seed, (list, tuple)):
        if len(seed) != rows:
            raise LaVITError(f"{len(seed)} seeds for {rows} rows")
        return [check_seed(s) for s in seed]
    base = check_seed(seed) if seed is not None else new_seed()
    return [(base + i) % (MAX_SEED + 1) for i in range(rows)]


def make_sampler(do_sample: bool, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 seeds: Sequence[int] = ()) -> Sampler:
    """`sampler(scores) -> tokens` in mlx-lm's convention: argmax, or the warpers and then
    a draw from softmax(scores) with each row's own key (row i of a batch draws exactly
    what it would draw alone with the same seed)."""
    if not do_sample:
        return lambda scores: mx.argmax(scores, axis=-1).astype(mx.int32)
    keys = [mx.random.key(s) for s in seeds]

    def sample(scores: mx.array) -> mx.array:
        if len(keys) != scores.shape[0]:
            raise LaVITError(f"the sampler has {len(keys)} seeds for {scores.shape[0]} rows")
        scores = _warp(scores, temperature, top_k, top_p)
        noise = []
        for i, key in enumerate(keys):
            keys[i], sub = mx.random.split(key)
            noise.append(mx.random.gumbel(scores.shape[1:], key=sub))
        # argmax(scores + Gumbel noise) is a draw from softmax(scores) (mx.random.categorical)
        return mx.argmax(scores + mx.stack(noise), axis=-1).astype(mx.int32)

    return sample


# ----------------------------------------------------------------------------- the decoding loop
def decode(
    logits: mx.array,
    forward: Callable[[mx.array], mx.array],
    processors: Sequence[Processor],
    sampler: Sampler,
    rows: int,
    max_new_tokens: int,
    bos_id: int,
    end_id: int,
    pad_id: int,
) -> Iterator[List[Optional[int]]]:
    """The token loop every decoder shares (mlx-lm `generate_step`, batched).

    `logits` are the prefill's last-position logits, `forward(tokens)` gives the next ones
    for the (rows,) tokens just chosen (guided decoding feeds both branches). Yields each
    step's token per row, or None once a row has produced `end_id` (which is yielded);
    ended rows are fed `pad_id`, as transformers does. The next step is queued
    (`mx.async_eval`) before the host reads this one.
    """

    def choose(logits: mx.array, history: mx.array, ended: mx.array) -> tuple:
        scores = logits
        for process in processors:
            scores = process(history, scores)
        tokens = mx.where(ended, pad_id, sampler(scores))
        return tokens, mx.concatenate([history, tokens[:, None]], axis=1), ended | (tokens == end_id)

    history = mx.full((rows, 1), bos_id, dtype=mx.int32)  # transformers' input_ids start as [[bos]]
    tokens, history, ended = choose(logits, history, mx.zeros((rows,), dtype=mx.bool_))
    mx.async_eval(tokens)
    done = [False] * rows
    for step in range(max_new_tokens):
        if step + 1 < max_new_tokens:
            upcoming = choose(forward(tokens), history, ended)
            mx.async_eval(upcoming[0])
        values = tokens.tolist()
        yield [None if done[r] else values[r] for r in range(rows)]
        done = [done[r] or values[r] == end_id for r in range(rows)]
        if all(done) or step + 1 == max_new_tokens:
            return
        tokens, history, ended = upcoming


def collect(steps: Iterator[List[Optional[int]]], rows: int) -> List[List[int]]:
    """Every row's tokens from a stream of per-step tokens (None: the row has ended)."""
    out: List[List[int]] = [[] for _ in range(rows)]
    for step in steps:
        for row, token in enumerate(step):
            if token is not None:
                out[row].append(token)
    return out


def _prefill(lm: LanguageModel, inputs_embeds: Sequence[mx.array], max_new_tokens: int):
    batch, padding = lm.pad_embeddings(inputs_embeds)
    lm.check_length(batch.shape[1], max_new_tokens)
    cache = lm.make_cache(padding)
    return lm.next_logits(inputs_embeds=batch, cache=cache), cache


# ----------------------------------------------------------------------------- text: greedy / sampling
def stream_text(
    lm: LanguageModel,
    inputs_embeds: Sequence[mx.array],
    config: TextDecoding = TextDecoding(),
    suppress: Optional[Sequence[int]] = None,
    seed: Optional[int] = None,
) -> Iterator[List[Optional[int]]]:
    """Greedy or sampled decoding (num_beams == 1) of a left-padded batch, one step per yield.

    Args:
        inputs_embeds: per row a (T_i, hidden) array (e.g. [IMG], visual embeddings,
            [/IMG], prompt embeddings); rows are left-padded with the eos embedding.
        config: decoding options (num_beams must be 1).
        suppress: ids never generated; None = `[IMG]`, `[/IMG]` and the visual codes.
        seed: sampling seed; row i samples with seed + i (same seed, same tokens, whatever
            the batch). None draws one.

    Yields:
        per step, for each row, the new token id, or None once the row has ended
        (the eos itself is yielded). Stops when every row has ended or after
        max_new_tokens steps.
    """
    if config.num_beams != 1:
        raise LaVITError("stream_text decodes with num_beams=1; use beam_search for beams")
    ids = lm.token_ids
    processors = make_logits_processors(
        ids, lm.args.vocab_size, end_id=ids.eos, min_new=config.min_new_tokens,
        suppress=visual_suppression(ids) if suppress is None else suppress, repetition=config.repetition_penalty)
    sampler = make_sampler(config.do_sample, config.temperature, config.top_k, config.top_p,
                           row_seeds(seed, len(inputs_embeds)))
    logits, cache = _prefill(lm, inputs_embeds, config.max_new_tokens)
    yield from decode(logits, lambda tokens: lm.next_logits(input_ids=tokens[:, None], cache=cache), processors,
                      sampler, len(inputs_embeds), config.max_new_tokens, ids.bos, ids.eos, ids.pad)


# ----------------------------------------------------------------------------- text: beam search
class _Hypotheses:
    """transformers 4.33.2 `BeamHypotheses`: the n best finished sequences of one row."""

    def __init__(self, num_beams: int, length_penalty: float, early_stopping, max_length: int):
        self.num_beams = num_beams
        self.length_penalty = length_penalty
        self.early_stopping = early_stopping
        self.max_length = max_length
        self.beams: list = []  # (score, ids incl. bos, ended on eos)
        self.worst_score = 1e9

    def add(self, ids: List[int], sum_logprobs: float, on_eos: bool) -> None:
        score = sum_logprobs / (len(ids) ** self.length_penalty)
        if len(self.beams) < self.num_beams or score > self.worst_score:
            self.beams.append((score, ids, on_eos))
            if len(self.beams) > self.num_beams:
                ranked = sorted((s, i) for i, (s, _, _) in enumerate(self.beams))
                del self.beams[ranked[0][1]]
                self.worst_score = ranked[1][0]
            else:
                self.worst_score = min(score, self.worst_score)

    def is_done(self, best_sum_logprobs: float, cur_len: int) -> bool:
        if len(self.beams) < self.num_beams:
            return False
        if self.early_stopping is True:
            return True
        if self.early_stopping is False or self.length_penalty <= 0.0:
            best = best_sum_logprobs / cur_len**self.length_penalty
        else:  # "never" with a positive penalty: the longest possible sequence is the best
            best = best_sum_logprobs / self.max_length**self.length_penalty
        return self.worst_score >= best

    def best(self):
        return sorted(self.beams, key=lambda b: b[0])[-1]


@dataclass
class BeamStep:
    """One beam-search step: per row whether it is done and its best running beam's tokens.

    The last step yielded carries `sequences`: per row the chosen hypothesis' new
    tokens (ending with eos when it ended on eos) and `scores` (length-normalised).
    """

    step: int
    done: List[bool]
    running: List[List[int]]
    sequences: Optional[List[List[int]]] = None
    scores: Optional[List[float]] = None


def beam_search(
    lm: LanguageModel,
    inputs_embeds: Sequence[mx.array],
    config: TextDecoding = TextDecoding.caption(),
    suppress: Optional[Sequence[int]] = None,
) -> Iterator[BeamStep]:
    """Beam search as transformers 4.33.2 `beam_search` + `BeamSearchScorer` (num_return_sequences 1).

    Args:
        inputs_embeds: per row a (T_i, hidden) array; left-padded with the eos embedding.
        config: num_beams >= 2, max/min_new_tokens, length_penalty, early_stopping,
            repetition_penalty.
        suppress: ids never generated; None = `[IMG]`, `[/IMG]` and the visual codes.

    Yields:
        a BeamStep per decoding step; the last one has `sequences` set.
    """
    nb = config.num_beams
    if nb < 2:
        raise LaVITError("beam_search needs num_beams >= 2; use stream_text for greedy or sampling")
    ids = lm.token_ids
    vocab = lm.args.vocab_size
    suppress = visual_suppression(ids) if suppress is None else list(suppress)
    allowed = vocab - len(set(int(i) for i in suppress))
    if allowed < _CANDIDATES_PER_BEAM * nb:
        raise LaVITError(f"{nb} beams need at least {_CANDIDATES_PER_BEAM * nb} allowed ids, only {allowed} are")
    processors = make_logits_processors(ids, vocab, end_id=ids.eos, min_new=config.min_new_tokens,
                                        suppress=suppress, repetition=config.repetition_penalty)
    rows = len(inputs_embeds)
    max_length = 1 + config.max_new_tokens  # the bos counts
    logits, cache = _prefill(lm, inputs_embeds, config.max_new_tokens)
    # Prefill once per row, then copy the row to its beams (transformers prefills each copy).
    expand = mx.array([r for r in range(rows) for _ in range(nb)])
    logits = logits[expand]
    for layer_cache in cache:
        layer_cache.filter(expand)
    beam_scores = np.zeros((rows, nb), dtype=np.float32)
    beam_scores[:, 1:] = _INACTIVE_BEAM_SCORE
    sequences = [[ids.bos] for _ in range(rows * nb)]
    hyps = [_Hypotheses(nb, config.length_penalty, config.early_stopping, max_length) for _ in range(rows)]
    done = [False] * rows
    k = _CANDIDATES_PER_BEAM * nb

    for step in range(config.max_new_tokens):
        # Beam search runs the processors on log-softmax scores (transformers' beam_search).
        scores = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        history = mx.array(sequences, dtype=mx.int32)
        for process in processors:
            scores = process(history, scores)
        scores = (scores + mx.array(beam_scores.reshape(-1, 1))).reshape(rows, nb * vocab)
        top = mx.argpartition(-scores, k - 1, axis=-1)[:, :k]
        top_scores = mx.take_along_axis(scores, top, axis=-1)
        top, top_scores = np.array(top), np.array(top_scores)
        cur_len = len(sequences[0]) + 1  # as BeamSearchScorer.process

        next_scores = np.zeros((rows, nb), dtype=np.float32)
        next_tokens = np.full((rows, nb), ids.pad, dtype=np.int64)
        next_rows = np.zeros((rows, nb), dtype=np.int64)
        for r in range(rows):
            if done[r]:
                # transformers pads finished rows; their beams keep their own cache rows.
                next_rows[r] = np.arange(r * nb, (r + 1) * nb)
                continue
            order = np.lexsort((top[r], -top_scores[r]))  # best first; ties: lower index
            filled = 0
            for rank, j in enumerate(order):
                score, flat = float(top_scores[r, j]), int(top[r, j])
                beam, token = divmod(flat, vocab)
                source = r * nb + beam
                if token == ids.eos:
                    if rank >= nb:  # an eos outside the top num_beams is not a hypothesis
                        continue
                    hyps[r].add(list(sequences[source]), score, on_eos=True)
                else:
                    next_scores[r, filled], next_tokens[r, filled], next_rows[r, filled] = score, token, source
                    filled += 1
                if filled == nb:
                    break
            done[r] = done[r] or hyps[r].is_done(float(top_scores[r].max()), cur_len)

        beam_scores = next_scores
        source_rows = next_rows.reshape(-1)
        sequences = [sequences[s] + [int(t)] for s, t in zip(source_rows, next_tokens.reshape(-1))]
        last = all(done) or len(sequences[0]) >= max_length
        running = [sequences[r * nb][1:] for r in range(rows)]
        if last:
            break
        yield BeamStep(step, list(done), running)
        index = mx.array(source_rows)
        tokens = mx.array(next_tokens.reshape(-1), dtype=mx.int32)
        for layer_cache in cache:
            layer_cache.filter(index)
        logits = lm.next_logits(input_ids=tokens[:, None], cache=cache)

    # finalize: open beams of unfinished rows compete with the finished hypotheses.
    for r in range(rows):
        if not done[r]:
            for b in range(nb):
                hyps[r].add(sequences[r * nb + b], float(beam_scores[r, b]), on_eos=False)
    best = [hyp.best() for hyp in hyps]
    yield BeamStep(
        step, list(done), running,
        sequences=[list(seq[1:]) + ([ids.eos] if on_eos else []) for _, seq, on_eos in best],
        scores=[score for score, _, _ in best],
    )


def generate_text(
    lm: LanguageModel,
    inputs_embeds: Sequence[mx.array],
    config: TextDecoding = TextDecoding.caption(),
    suppress: Optional[Sequence[int]] = None,
    seed: Optional[int] = None,
) -> List[List[int]]:
    """Decode every row to the end: new token ids per row (ending with eos if it stopped on it).

    Beam search when config.num_beams > 1, otherwise greedy/sampling. Decode the ids
    with `TextTokenizer.decode`.
    """
    if config.num_beams > 1:
        final = None
        for final in beam_search(lm, inputs_embeds, config, suppress):
            pass
        return final.sequences
    return collect(stream_text(lm, inputs_embeds, config, suppress, seed), len(inputs_embeds))
