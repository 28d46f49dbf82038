"""A `DataStream` as mlx-lm's tuner input: an `iterate_batches` hook for `mlx_lm.tuner.train`.

mlx-lm (0.32, `mlx_lm/tuner/trainer.py`) calls
``iterate_batches(dataset, batch_size, max_seq_length, loop, seed, comm_group)`` and
expects ``(tokens (B, L), [[prompt offset, length]] (B, 2))`` pairs, B being this rank's
share of the global `batch_size`. Pass the stream as the dataset. mlx is imported when
the hook runs, so this module imports without it.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import numpy as np

from ..errors import LaVITError
from .batching import batches, pad_batch
from .samples import Sample
from .stream import DataStream

Encoded = Union[Sequence[int], tuple[Sequence[int], int]]


def make_iterate_batches(encode: Callable[[Sample], Encoded], pad_id: int = 0,
                         multiple: int = 32, lengths: Optional[Sequence[int]] = None) -> Callable:
    """Build the hook.

    Args:
        encode: a (transformed) sample -> its token ids, or (token ids, prompt length) so
            that mlx-lm's `mask_prompt` losses skip the prompt.
        pad_id, multiple, lengths: the padding buckets, as in `pad_batch` (one extra
            token, so that the model's input after the next-token shift is bucketed).

    Returns:
        A function with the signature of `mlx_lm.tuner.trainer.iterate_batches`. With
        `loop` (training) it follows the stream through its epochs; without (evaluation)
        it stops at the end of the stream's current epoch. Its `seed` is not used: the
        stream has its own.
    """

    def iterate_batches(dataset, batch_size, max_seq_length, loop=False, seed=None,
                        comm_group=None):
        import mlx.core as mx

        if not isinstance(dataset, DataStream):
            raise LaVITError(f"iterate_batches: the dataset is a {type(dataset).__name__}, "
                             "not a lavit_mlx.data.DataStream")
        world = comm_group.size() if comm_group is not None else 1
        if dataset.world_size != world:
            raise LaVITError(f"iterate_batches: the stream is split for {dataset.world_size} "
                             f"ranks, the run has {world}")
        if batch_size % world:
            raise LaVITError(f"batch size {batch_size} is not divisible by {world} ranks")
        samples = dataset if loop else dataset.epoch_samples()
        for group in batches(samples, batch_size // world, drop_last=True):
            encoded = [encode(sample) for sample in group]
            tokens = [e[0] if isinstance(e, tuple) else e for e in encoded]
            offsets = [e[1] if isinstance(e, tuple) else 0 for e in encoded]
            padded, kept = pad_batch(tokens, pad_id, multiple, lengths,
                                     max_length=max_seq_length, extra=1)
            yield mx.array(padded), mx.array(np.stack([np.asarray(offsets, np.int32), kept], 1))

    return iterate_batches
