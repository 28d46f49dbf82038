"""Decoding loops (lavit_mlx/sampling.py) against transformers and against slow references.

transformers 5.x is installed, not 4.33.2. Where the two agree the test calls
`generate` directly: greedy decoding, and beam search with length_penalty 0 (the
release's VQA setting), where neither the length bookkeeping nor the stopping
heuristic depends on lengths. They differ with a length penalty: 4.33.2 counts the
`[[bos]]` that `generate(inputs_embeds=...)` puts in input_ids (open beams at
max_length are scored with length 1 + max_new_tokens, `is_done` uses
len(input_ids) + 1, and it stops on the best of all candidates), 5.x does not. For
that case (the release's captioning) the test carries a slow 4.33.2-rules beam
search that recomputes the whole sequence with the transformers model every step.
Guided image-token generation has no transformers counterpart that batches both
branches; the reference is a slow loop with two full forwards per step and no cache.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch

from lavit_mlx.errors import LaVITError
from lavit_mlx.models.llm import load_language_model
from lavit_mlx.image_tokens import (
    ImageTokenDecoding,
    generate_image_tokens,
    stream_image_tokens,
    text_suppression,
    visual_codes,
)
from lavit_mlx.sampling import TextDecoding, beam_search, generate_text, stream_text, visual_suppression
from support.tiny_llama import TINY_IDS, tiny_llama

IDS = TINY_IDS
HIDDEN = 64
LENGTHS = (5, 9, 3)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path, reference = tiny_llama(str(tmp_path_factory.getbasetemp() / "tiny_llama"))
    return load_language_model(path, token_ids=IDS), reference


@pytest.fixture(scope="module")
def prompts():
    """Three caption-style prompts of different lengths: [IMG], 'visual' embeddings, [/IMG]."""
    rng = np.random.default_rng(0)
    return [rng.standard_normal((n, HIDDEN)).astype(np.float32) for n in LENGTHS]


def hf_generate(reference, prompts, suppress=None, **options):
    """transformers generate on left-padded embeddings (eos embedding, mask 0); new ids up to eos."""
    longest = max(len(p) for p in prompts)
    pad = reference.model.embed_tokens.weight[IDS.pad].detach()
    embeds = torch.stack([torch.cat([pad.expand(longest - len(p), HIDDEN), torch.from_numpy(p)]) for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = reference.generate(
            inputs_embeds=embeds, attention_mask=mask, bos_token_id=IDS.bos, eos_token_id=IDS.eos,
            pad_token_id=IDS.pad, suppress_tokens=suppress or visual_suppression(IDS), do_sample=False, **options,
        )
    rows = []
    for row in out.tolist():  # 5.x returns only new ids for inputs_embeds
        ids = []
        for token in row:
            ids.append(token)
            if token == IDS.eos:
                break
        rows.append(ids)
    return rows


def as_mx(prompts):
    return [mx.array(p) for p in prompts]


# ----------------------------------------------------------------------------- text vs transformers
def test_greedy_matches_transformers(tiny, prompts):
    lm, reference = tiny
    options = dict(max_new_tokens=14, min_new_tokens=4)
    expected = hf_generate(reference, prompts, **options)
    assert generate_text(lm, as_mx(prompts), TextDecoding(**options)) == expected
    assert any(row[-1] == IDS.eos for row in expected)  # rows stop at different steps


@pytest.mark.filterwarnings("ignore:Passing .repetition_penalty.")
def test_greedy_with_repetition_penalty_matches_transformers(tiny, prompts):
    """4.33.2 penalises every id of input_ids, the `[[bos]]` included; 5.x only the new ids,
    minus as many as the row has left padding. Unpadded rows with the bos suppressed coincide.
    """
    lm, reference = tiny
    prompts = [p[:3] for p in prompts]
    suppress = visual_suppression(IDS) + [IDS.bos]
    options = dict(max_new_tokens=12, min_new_tokens=8, repetition_penalty=1.5)
    expected = hf_generate(reference, prompts, suppress, **options)
    assert generate_text(lm, as_mx(prompts), TextDecoding(**options), suppress=suppress) == expected
    assert expected != hf_generate(reference, prompts, suppress, max_new_tokens=12, min_new_tokens=8)  # it matters


@pytest.mark.parametrize("num_beams,early_stopping,min_new", [(2, True, 0), (3, False, 2), (5, "never", 2)])
def test_beam_search_matches_transformers_without_length_penalty(tiny, prompts, num_beams, early_stopping, min_new):
    lm, reference = tiny
    options = dict(max_new_tokens=12, min_new_tokens=min_new, num_beams=num_beams, length_penalty=0.0,
                   early_stopping=early_stopping)
    expected = hf_generate(reference, prompts, **options)
    assert generate_text(lm, as_mx(prompts), TextDecoding(**options)) == expected


# ----------------------------------------------------------------------------- beam search vs 4.33.2 rules
def reference_beam_search_433(reference, prompt, num_beams, max_new, min_new, length_penalty, early_stopping):
    """transformers 4.33.2 beam search for one prompt, re-running the full sequence every step.

    Returns (new ids incl. a final eos, length-normalised score).
    """
    embeds = torch.from_numpy(prompt)
    banned = visual_suppression(IDS)
    max_length = 1 + max_new  # input_ids = [bos] + new ids
    beams = [([], np.float32(0.0))] + [([], np.float32(-1e9))] * (num_beams - 1)
    finished = []  # (score, ids, ended on eos)

    def add(ids, total, on_eos):
        finished.append((total / (1 + len(ids)) ** length_penalty, ids, on_eos))  # bos counts
        finished.sort(key=lambda item: item[0])
        if len(finished) > num_beams:
            finished.pop(0)

    for step in range(max_new):
        candidates = []
        for b, (ids, total) in enumerate(beams):
            with torch.no_grad():
                sequence = torch.cat([embeds, reference.model.embed_tokens(torch.tensor(ids, dtype=torch.long))])
                logits = reference(inputs_embeds=sequence[None]).logits[0, -1]
            scores = torch.log_softmax(logits.float(), -1).numpy().copy()
            scores[banned] = -np.inf
            if step < min_new:
                scores[IDS.eos] = -np.inf
            candidates += [(np.float32(total + scores[v]), b, v) for v in range(len(scores))]
        candidates.sort(key=lambda c: (-c[0], c[1] * IDS.vocab_size + c[2]))
        continuing = []
        for rank, (total, b, token) in enumerate(candidates[: 2 * num_beams]):
            if token == IDS.eos:
                if rank < num_beams:
                    add(beams[b][0], float(total), True)
            else:
                continuing.append((beams[b][0] + [token], total))
            if len(continuing) == num_beams:
                break
        beams = continuing
        best_next = float(candidates[0][0])
        cur_len = 1 + step + 1  # len(input_ids) before this step's token, + 1
        if len(finished) == num_beams:
            worst = finished[0][0]
            if early_stopping is True:
                break
            length = max_length if (early_stopping == "never" and length_penalty > 0) else cur_len
            if worst >= best_next / length**length_penalty:
                break
    else:
        for ids, total in beams:
            add(ids, float(total), False)
    score, ids, on_eos = finished[-1]
    return ids + ([IDS.eos] if on_eos else []), score


@pytest.mark.parametrize("num_beams,early_stopping", [(2, False), (3, True)])
def test_beam_search_with_length_penalty_matches_433_rules(tiny, prompts, num_beams, early_stopping):
    lm, reference = tiny
    options = dict(max_new_tokens=10, min_new_tokens=3, num_beams=num_beams, length_penalty=1.0,
                   early_stopping=early_stopping)
    steps = list(beam_search(lm, as_mx(prompts), TextDecoding(**options)))
    final = steps[-1]
    for row, prompt in enumerate(prompts):
        ids, score = reference_beam_search_433(reference, prompt, num_beams, 10, 3, 1.0, early_stopping)
        assert final.sequences[row] == ids
        assert final.scores[row] == pytest.approx(score, rel=1e-4)
    assert all(len(s.running) == len(prompts) for s in steps[:-1])


def test_length_penalty_counts_the_bos(tiny, prompts):
    """A hypothesis' score is its summed log-probability / (1 + tokens before eos) ** length_penalty."""
    lm, reference = tiny
    config = TextDecoding(max_new_tokens=6, num_beams=2, length_penalty=2.0)
    final = list(beam_search(lm, as_mx(prompts[:1]), config))[-1]
    ids, score = final.sequences[0], final.scores[0]
    with torch.no_grad():
        sequence = torch.cat([torch.from_numpy(prompts[0]), reference.model.embed_tokens(torch.tensor(ids))])
        logprobs = torch.log_softmax(reference(inputs_embeds=sequence[None]).logits[0].float(), -1)
    start = len(prompts[0]) - 1
    total = sum(float(logprobs[start + i, t]) for i, t in enumerate(ids))
    length = len(ids) if ids[-1] == IDS.eos else 1 + len(ids)  # eos-ended: bos + tokens before eos
    assert score == pytest.approx(total / length**2.0, rel=1e-4)


# ----------------------------------------------------------------------------- sampling
def test_sampling_is_reproducible_and_warpers_work(tiny, prompts):
    lm, _ = tiny
    greedy = generate_text(lm, as_mx(prompts), TextDecoding(max_new_tokens=10))
    sample = TextDecoding(max_new_tokens=10, do_sample=True, temperature=1.5, top_k=0)
    first = generate_text(lm, as_mx(prompts), sample, seed=3)
    assert first == generate_text(lm, as_mx(prompts), sample, seed=3)
    assert first != generate_text(lm, as_mx(prompts), sample, seed=4)
    assert first != greedy
    # Only the best token survives top_k=1 or a tiny top_p: sampling becomes greedy.
    assert generate_text(lm, as_mx(prompts), TextDecoding(max_new_tokens=10, do_sample=True, top_k=1), seed=5) == greedy
    assert generate_text(lm, as_mx(prompts), TextDecoding(max_new_tokens=10, do_sample=True, top_k=0, top_p=1e-6),
                         seed=5) == greedy
    banned = set(visual_suppression(IDS))
    assert not any(t in banned for row in first for t in row)


def test_streaming_yields_per_row_until_each_ends(tiny, prompts):
    lm, _ = tiny
    steps = list(stream_text(lm, as_mx(prompts), TextDecoding(max_new_tokens=14, min_new_tokens=4)))
    assert len(steps) <= 14 and all(len(s) == len(prompts) for s in steps)
    for row in range(len(prompts)):
        column = [s[row] for s in steps]
        if IDS.eos in column:
            end = column.index(IDS.eos)
            assert end >= 4  # min_new_tokens
            assert all(t is None for t in column[end + 1 :])


def test_text_options_are_checked(tiny, prompts):
    lm, _ = tiny
    with pytest.raises(LaVITError, match="early_stopping"):
        TextDecoding(early_stopping="sometimes")
    with pytest.raises(LaVITError, match="beam_sample"):
        TextDecoding(num_beams=2, do_sample=True)
    with pytest.raises(LaVITError, match="exceeds the LLM's context of 128"):
        generate_text(lm, [mx.zeros((120, HIDDEN))], TextDecoding(max_new_tokens=36))
    with pytest.raises(LaVITError, match=r"input embeddings must be \(tokens, 64\)"):
        generate_text(lm, [mx.zeros((3, 32))], TextDecoding())


# ----------------------------------------------------------------------------- guided image tokens
IMAGE_PROMPTS = [[10, 11, 12, 13], [20, IDS.visual_offset + 3, IDS.visual_offset + 7], [30, 31, 32, 33, 34, 35, 36]]


def reference_image_tokens(reference, prompt, config, negative=None):
    """Two full forward passes per step, no cache; the unconditional branch starts at position 0."""
    conditional = list(prompt) + [IDS.image_start]
    unconditional = list(negative) if negative is not None else [IDS.image_start]
    banned = text_suppression(IDS)
    generated = []
    for step in range(config.max_new_tokens):
        with torch.no_grad():
            cond = reference(input_ids=torch.tensor([conditional + generated])).logits[0, -1].float()
            uncond = reference(input_ids=torch.tensor([unconditional + generated])).logits[0, -1].float()
        if config.guidance_scale != 1.0:
            cond, uncond = torch.log_softmax(cond, -1), torch.log_softmax(uncond, -1)
            scores = config.guidance_scale * (cond - uncond) + uncond
        else:
            scores = cond
        if step < config.min_new_tokens:
            scores[IDS.image_end] = -np.inf
        scores[banned] = -np.inf
        token = int(torch.argmax(scores))
        generated.append(token)
        if token == IDS.image_end:
            break
    return generated


GREEDY = dict(min_new_tokens=5, max_new_tokens=24, do_sample=True, top_k=1)


@pytest.mark.parametrize("scale", [1.0, 2.0, 4.0, 7.5])
def test_batched_guidance_matches_two_full_passes(tiny, scale):
    lm, reference = tiny
    config = ImageTokenDecoding(guidance_scale=scale, **GREEDY)
    ours = generate_image_tokens(lm, IMAGE_PROMPTS, config, seed=0)
    expected = [reference_image_tokens(reference, p, config) for p in IMAGE_PROMPTS]
    assert ours == expected
    if scale == 4.0:
        assert any(row[-1] == IDS.image_end for row in ours)  # rows end at different steps
    if scale != 1.0:  # guidance changes the tokens at this scale: the check above has teeth
        assert ours != generate_image_tokens(lm, IMAGE_PROMPTS, ImageTokenDecoding(guidance_scale=1.0, **GREEDY))


def test_negative_prompt_matches_reference(tiny):
    lm, reference = tiny
    config = ImageTokenDecoding(guidance_scale=5.0, **GREEDY)
    negative = [40, 41, IDS.image_start]
    ours = generate_image_tokens(lm, IMAGE_PROMPTS, config, negative_prompt_ids=negative, seed=0)
    assert ours == [reference_image_tokens(reference, p, config, negative) for p in IMAGE_PROMPTS]
    assert ours != generate_image_tokens(lm, IMAGE_PROMPTS, config, seed=0)
    per_prompt = [[40, IDS.image_start], [IDS.image_start], [41, 42, 43, IDS.image_start]]
    ours = generate_image_tokens(lm, IMAGE_PROMPTS, config, negative_prompt_ids=per_prompt, seed=0)
    assert ours == [reference_image_tokens(reference, p, config, n) for p, n in zip(IMAGE_PROMPTS, per_prompt)]


def test_image_sampling_is_seeded_and_release_constraints_hold(tiny):
    lm, _ = tiny
    config = ImageTokenDecoding(guidance_scale=4.0, min_new_tokens=6, max_new_tokens=40)  # top_k 50 sampling
    first = generate_image_tokens(lm, IMAGE_PROMPTS, config, seed=11)
    assert first == generate_image_tokens(lm, IMAGE_PROMPTS, config, seed=11)
    assert first != generate_image_tokens(lm, IMAGE_PROMPTS, config, seed=12)
    # the release's two forwards per step give the same tokens
    assert first == generate_image_tokens(lm, IMAGE_PROMPTS, config, seed=11, two_pass=True)
    banned = set(text_suppression(IDS))
    for row in first:
        assert not banned.intersection(row)
        assert IDS.image_end not in row[:6]
        assert IDS.image_end not in row[:-1]  # stops at [/IMG]
        assert len(row) <= 40
    codes = visual_codes(first[0], IDS)
    assert all(0 <= c < IDS.codebook_size for c in codes)
    assert len(codes) == sum(1 for t in first[0] if t >= IDS.visual_offset)


def test_image_stream_and_errors(tiny):
    lm, _ = tiny
    steps = list(stream_image_tokens(lm, IMAGE_PROMPTS, ImageTokenDecoding(max_new_tokens=3), seed=0))
    assert len(steps) == 3 and all(len(s) == 3 for s in steps)
    with pytest.raises(LaVITError, match="2 negative prompts for 3 prompts"):
        generate_image_tokens(lm, IMAGE_PROMPTS, ImageTokenDecoding(max_new_tokens=3), negative_prompt_ids=[[1], [2]])
    with pytest.raises(LaVITError, match="exceeds the LLM's context of 128"):
        generate_image_tokens(lm, [[5] * 20], ImageTokenDecoding(max_new_tokens=200))
    with pytest.raises(LaVITError, match="outside the vocabulary"):
        generate_image_tokens(lm, [[IDS.vocab_size]])


def test_each_row_samples_as_it_would_alone_with_its_seed(tiny, prompts):
    """Row i of a batch uses seed + i: one image (or caption) of a batch can be regenerated alone."""
    lm, _ = tiny
    config = ImageTokenDecoding(guidance_scale=4.0, min_new_tokens=6, max_new_tokens=30)
    batch = generate_image_tokens(lm, IMAGE_PROMPTS, config, seed=11)
    assert batch == [generate_image_tokens(lm, [p], config, seed=11 + i)[0] for i, p in enumerate(IMAGE_PROMPTS)]
    sample = TextDecoding(max_new_tokens=8, do_sample=True, temperature=1.5, top_k=0)
    together = generate_text(lm, as_mx(prompts), sample, seed=7)
    assert together == [generate_text(lm, as_mx([p]), sample, seed=7 + i)[0] for i, p in enumerate(prompts)]


def test_bad_seeds_are_one_line_errors(tiny):
    lm, _ = tiny
    for seed in (-1, 2**32, 99999999999999999999):
        with pytest.raises(LaVITError, match="expected an integer in 0..4294967295"):
            generate_image_tokens(lm, IMAGE_PROMPTS[:1], ImageTokenDecoding(max_new_tokens=2), seed=seed)
