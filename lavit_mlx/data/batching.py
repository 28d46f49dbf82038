"""Batches, and padding text to a few lengths so that a compiled step rarely recompiles.

`mx.compile` traces a new graph for every new input shape; padding each batch to its own
longest caption would trace one per batch. `bucket_length` rounds up to a multiple of a
bucket size (mlx-lm pads to multiples of 32) or to the smallest of a few fixed lengths.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Optional, Sequence, TypeVar

import numpy as np

from ..errors import LaVITError

T = TypeVar("T")


def batches(stream: Iterable[T], batch_size: int, drop_last: bool = False) -> Iterator[list[T]]:
    """Group a stream into lists of `batch_size` items.

    A batch is yielded as soon as it is full, so a `DataStream.state_dict()` taken between
    batches counts exactly the samples of the batches yielded so far.

    Args:
        stream: any iterable, e.g. a `DataStream`.
        batch_size: items per batch.
        drop_last: drop a last, smaller batch instead of yielding it.
    """
    if batch_size < 1:
        raise LaVITError(f"batch_size must be at least 1, got {batch_size}")
    batch: list[T] = []
    for item in stream:
        batch.append(item)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch and not drop_last:
        yield batch


def bucket_length(length: int, multiple: int = 32, lengths: Optional[Sequence[int]] = None,
                  max_length: Optional[int] = None) -> int:
    """The padded length for a longest sequence of `length` tokens.

    Args:
        length: the longest sequence in the batch.
        multiple: round up to a multiple of this (when `lengths` is not given).
        lengths: fixed lengths to choose from: the smallest that holds `length`, else the
            largest (the batch is then truncated to it).
        max_length: never pad beyond this (the batch is truncated to it).

    Returns:
        The length to pad (or truncate) the batch to.
    """
    if lengths:
        fitting = [n for n in sorted(lengths) if n >= length]
        padded = fitting[0] if fitting else max(lengths)
    else:
        if multiple < 1:
            raise LaVITError(f"multiple must be at least 1, got {multiple}")
        padded = multiple * max(1, -(-length // multiple))
    return padded if max_length is None else min(padded, max_length)


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int = 0, multiple: int = 32,
              lengths: Optional[Sequence[int]] = None, max_length: Optional[int] = None,
              extra: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Pad token sequences to one bucketed length.

    Args:
        sequences: token ids, one list per sample.
        pad_id: the id written after each sequence.
        multiple, lengths: the buckets, as in `bucket_length`.
        max_length: truncate longer sequences (and never pad beyond it).
        extra: added to the bucketed length (1 for next-token targets: the model then sees
            a bucketed length after the shift, as mlx-lm's trainer does).

    Returns:
        tokens (B, L) int32 and the kept lengths (B,) int32.
    """
    if not sequences:
        raise LaVITError("pad_batch: no sequences")
    longest = max(len(s) for s in sequences)
    width = bucket_length(max(longest - extra, 1), multiple, lengths) + extra
    if max_length is not None:
        width = min(width, max_length)
    tokens = np.full((len(sequences), width), pad_id, dtype=np.int32)
    kept = np.zeros(len(sequences), dtype=np.int32)
    for row, sequence in enumerate(sequences):
        kept[row] = min(len(sequence), width)
        tokens[row, : kept[row]] = sequence[: kept[row]]
    return tokens, kept
