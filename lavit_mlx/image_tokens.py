"""Image-token generation on the LLM with the release's classifier-free guidance.

Reference: LAVIT_REFERENCE.md section 4 ("Text-to-image") and the official
`lavit_for_generation.py` `generate_image_tokenids`, which calls transformers 4.33.2
`generate` with `guidance_scale` (`UnbatchedClassifierFreeGuidanceLogitsProcessor`): an
unconditional sequence that starts from `[IMG]` alone at position 0 (or the negative
prompt ids) and receives every sampled token; both logit vectors go through
log-softmax and out = g * (cond - uncond) + uncond; then `[/IMG]` is forbidden until 20
new tokens, text ids are suppressed, and top-k sampling picks the token. The release
runs the unconditional branch as a second forward per step; here both branches are one
left-padded batch with one shared cache, so each step is a single forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence

import mlx.core as mx
import numpy as np

from .config import TokenIds
from .errors import LaVITError
from .models.llm import LanguageModel
from .sampling import check_common, collect, decode, make_logits_processors, make_sampler, row_seeds


@dataclass
class ImageTokenDecoding:
    """Options of the release's image-token generation (reference section 4, "Text-to-image")."""

    guidance_scale: float = 4.0  # 5.0 for multimodal prompts in the release
    min_new_tokens: int = 20
    max_new_tokens: int = 200
    do_sample: bool = True
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0

    def __post_init__(self):
        check_common(self.max_new_tokens, self.min_new_tokens, self.temperature, self.top_k, self.top_p)


def text_suppression(token_ids: TokenIds) -> List[int]:
    """Ids the release suppresses when generating image tokens: every text id except unk, bos, eos."""
    special = {token_ids.unk, token_ids.bos, token_ids.eos}
    return [i for i in range(token_ids.num_text) if i not in special]


def _negative_rows(negative_prompt_ids, count: int, token_ids: TokenIds) -> List[List[int]]:
    if negative_prompt_ids is None:
        return [[token_ids.image_start] for _ in range(count)]
    rows = list(negative_prompt_ids)
    if rows and all(isinstance(i, (int, np.integer)) for i in rows):
        return [[int(i) for i in rows] for _ in range(count)]
    if len(rows) != count:
        raise LaVITError(f"{len(rows)} negative prompts for {count} prompts")
    return [[int(i) for i in row] for row in rows]


def stream_image_tokens(
    lm: LanguageModel,
    prompts: Sequence[Sequence[int]],
    config: ImageTokenDecoding = ImageTokenDecoding(),
    negative_prompt_ids=None,
    seed: Optional[int] = None,
    two_pass: bool = False,
) -> Iterator[List[Optional[int]]]:
    """Image-token generation with classifier-free guidance, one step per yield.

    Args:
        prompts: per image the prompt ids WITHOUT the trailing `[IMG]` (text ids and
            visual ids mixed, no BOS); `[IMG]` is appended here, as the release does.
        config: guidance scale, min/max new tokens, sampling options.
        negative_prompt_ids: None (the unconditional branch is `[IMG]` alone at
            position 0), one id list for every prompt, or one list per prompt. As in
            transformers, these ids are the whole start of the unconditional branch.
        seed: sampling seed; prompt i samples with seed + i, so one image of a batch can
            be regenerated alone. None draws one.
        two_pass: run the unconditional branch as a separate forward with its own
            cache, as the release does (for comparison; same tokens, slower).

    Yields:
        per step, for each prompt, the new id, or None once the prompt has produced
        `[/IMG]` (which is yielded). Stops when all have ended or after max_new_tokens.
    """
    ids = lm.token_ids
    vocab = lm.args.vocab_size
    rows = len(prompts)
    if rows == 0:
        raise LaVITError("no prompt to generate from")
    guided = config.guidance_scale != 1.0  # transformers adds no guidance processor at 1
    cond_rows = [[int(i) for i in p] + [ids.image_start] for p in prompts]
    cond_ids, cond_pad = lm.pad_ids(cond_rows)
    lm.check_length(cond_ids.shape[1], config.max_new_tokens)
    cache = lm.make_cache(cond_pad)
    logits = lm.next_logits(input_ids=cond_ids, cache=cache)
    uncond_cache = None
    if guided:
        uncond_ids, uncond_pad = lm.pad_ids(_negative_rows(negative_prompt_ids, rows, ids))
        lm.check_length(uncond_ids.shape[1], config.max_new_tokens)
        uncond_cache = lm.make_cache(uncond_pad)
        uncond_logits = lm.next_logits(input_ids=uncond_ids, cache=uncond_cache)
        logits = mx.concatenate([logits, uncond_logits])
        if not two_pass:
            # One left-padded batch: rows [cond_0..cond_B-1, uncond_0..uncond_B-1].
            for layer_cache, layer_uncond in zip(cache, uncond_cache):
                layer_cache.extend(layer_uncond)
            uncond_cache = None

    def forward(tokens: mx.array) -> mx.array:
        if not guided:
            return lm.next_logits(input_ids=tokens[:, None], cache=cache)
        if uncond_cache is None:
            both = mx.concatenate([tokens, tokens])[:, None]
            return lm.next_logits(input_ids=both, cache=cache)
        return mx.concatenate([
            lm.next_logits(input_ids=tokens[:, None], cache=cache),
            lm.next_logits(input_ids=tokens[:, None], cache=uncond_cache),
        ])

    processors = make_logits_processors(ids, vocab, end_id=ids.image_end, min_new=config.min_new_tokens,
                                        suppress=text_suppression(ids), guidance=config.guidance_scale)
    sampler = make_sampler(config.do_sample, config.temperature, config.top_k, config.top_p, row_seeds(seed, rows))
    yield from decode(logits, forward, processors, sampler, rows, config.max_new_tokens, ids.image_start,
                      ids.image_end, ids.pad)


def generate_image_tokens(
    lm: LanguageModel,
    prompts: Sequence[Sequence[int]],
    config: ImageTokenDecoding = ImageTokenDecoding(),
    negative_prompt_ids=None,
    seed: Optional[int] = None,
    two_pass: bool = False,
) -> List[List[int]]:
    """Generated ids per prompt (ending with `[/IMG]` when produced); see `stream_image_tokens`.

    `visual_codes` turns them into codebook indices.
    """
    return collect(stream_image_tokens(lm, prompts, config, negative_prompt_ids, seed, two_pass), len(prompts))


def visual_codes(generated: Sequence[int], token_ids: TokenIds) -> List[int]:
    """Codebook indices of generated ids: keep ids >= visual_offset, subtract it (the release)."""
    return [int(i) - token_ids.visual_offset for i in generated if int(i) >= token_ids.visual_offset]
