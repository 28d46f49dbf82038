"""The resumable cursor: index sets, the seeded shuffles, the rank split, and state merging.

Everything here is plain integers and lists so that a cursor is JSON and means the same
on every machine and Python version:

- an *index set* is a list of ``[start, stop, step]`` ranges (disjoint) of sample
  indices inside one shard; a whole shard is ``[[0, n, 1]]``, rank r's modulo slice of it
  ``[[r, n, w]]``;
- a *plan* is the ordered list ``[[shard_pos, index_set], ...]`` that one rank still has
  to read in an epoch (``shard_pos`` indexes the shard list of the data index);
- randomness comes from a counter-based generator (splitmix64 of a hashed key and a draw
  counter), so its whole state is one integer.

The rank split (`partition`) is the same rule for a fresh epoch and for the samples left
over from a checkpoint: with at least as many shards as ranks each rank takes every w-th
shard whole; with fewer, every rank reads every shard and takes every w-th of its samples.
"""

from __future__ import annotations

import hashlib
import heapq
from typing import Iterator, Sequence

from ..errors import LaVITError

STATE_FORMAT = "lavit-data-cursor"
STATE_VERSION = 1

# The fields that must agree between rank states before they can be merged.
COMMON_FIELDS = ("format", "version", "seed", "shuffle_buffer", "shuffle_shards", "index",
                 "world_size")

_MASK64 = (1 << 64) - 1
_GOLDEN64 = 0x9E3779B97F4A7C15


def _splitmix64(value: int) -> int:
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


class CounterRNG:
    """Uniform integers from (key, draw counter): the state to save is `draws` alone."""

    def __init__(self, *key: object, draws: int = 0):
        text = "|".join(str(part) for part in key).encode()
        self._base = int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")
        self.draws = draws

    def below(self, n: int) -> int:
        """An integer in [0, n); the bias of the multiply-shift is below n / 2**64."""
        self.draws += 1
        return (_splitmix64((self._base + self.draws * _GOLDEN64) & _MASK64) * n) >> 64


def shard_order(num_shards: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """The epoch's shard order, the same on every rank (Fisher-Yates on `CounterRNG`)."""
    order = list(range(num_shards))
    if shuffle:
        rng = CounterRNG("shards", seed, epoch)
        for i in range(num_shards - 1, 0, -1):
            j = rng.below(i + 1)
            order[i], order[j] = order[j], order[i]
    return order


# ----- index sets ---------------------------------------------------------------------


def set_size(ranges: Sequence[Sequence[int]]) -> int:
    return sum(len(range(*r)) for r in ranges)


def iter_sorted(ranges: Sequence[Sequence[int]]) -> Iterator[int]:
    """The indices of a set in increasing order (a tar can only be read forwards)."""
    return heapq.merge(*(range(*r) for r in ranges))


def clip_after(ranges: Sequence[Sequence[int]], last: int) -> list[list[int]]:
    """The indices greater than `last`: what is unread once reading reached `last`."""
    clipped = []
    for start, stop, step in ranges:
        if last >= start:
            start += ((last - start) // step + 1) * step
        if start < stop:
            clipped.append([start, stop, step])
    return clipped


def split_positions(ranges: Sequence[Sequence[int]], world: int, rank: int) -> list[list[int]]:
    """The members at positions rank, rank + world, ... of the set (ranges taken in order)."""
    picked, offset = [], 0
    for start, stop, step in ranges:
        count = len(range(start, stop, step))
        skip = (rank - offset) % world
        if skip < count:
            picked.append([start + skip * step, stop, step * world])
        offset += count
    return picked


def normalise(ranges: Sequence[Sequence[int]]) -> list[list[int]]:
    """Sorted, empty ranges dropped, touching unit-step runs (buffered singletons) joined."""
    out: list[list[int]] = []
    for start, stop, step in sorted(ranges):
        count = len(range(start, stop, step))
        if count == 0:
            continue
        if count == 1:
            stop, step = start + 1, 1
        else:
            stop = start + (count - 1) * step + 1  # tight stop, so that runs compare equal
        if out and step == 1 and out[-1][2] == 1 and out[-1][1] == start:
            out[-1][1] = stop
        else:
            out.append([start, stop, step])
    return out


# ----- plans --------------------------------------------------------------------------


def partition(entries: Sequence[Sequence], world: int, rank: int) -> list[list]:
    """Rank `rank`'s share of `entries` ([[shard_pos, index_set], ...], non-empty, in order).

    At least as many shards as ranks: every world-th shard, whole. Fewer: every shard, and
    every world-th of its samples, so that no rank sits idle.
    """
    if len(entries) >= world:
        return [[pos, [list(r) for r in ranges]] for pos, ranges in entries[rank::world]]
    plan = []
    for pos, ranges in entries:
        share = split_positions(ranges, world, rank)
        if share:
            plan.append([pos, share])
    return plan


def standard_plan(lengths: Sequence[int], seed: int, epoch: int, shuffle: bool,
                  world: int, rank: int) -> list[list]:
    """A rank's plan for a fresh epoch: all samples of all shards, split by `partition`."""
    order = shard_order(len(lengths), seed, epoch, shuffle)
    entries = [[pos, [[0, lengths[pos], 1]]] for pos in order if lengths[pos] > 0]
    return partition(entries, world, rank)


def carried_plan(remaining: dict[int, list], lengths: Sequence[int], seed: int, epoch: int,
                 shuffle: bool, world: int, rank: int) -> list[list]:
    """A rank's share of the samples a checkpoint left over from `epoch` (shard -> index set)."""
    order = shard_order(len(lengths), seed, epoch, shuffle)
    entries = [[pos, remaining[pos]] for pos in order if remaining.get(pos)]
    return partition(entries, world, rank)


def _check_format(state: dict, what: str) -> None:
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise LaVITError(f"{what}: not a data cursor (no format {STATE_FORMAT!r})")
    if state.get("version") != STATE_VERSION:
        raise LaVITError(
            f"{what}: data cursor version {state.get('version')} "
            f"(this version reads {STATE_VERSION})"
        )


def merge_states(states: Sequence[dict]) -> dict:
    """Merge the `DataStream.state_dict()` of every rank into one checkpoint cursor.

    The result keeps each rank's exact state (for an identical resume on the same number
    of ranks) and, per epoch still in flight, the index set of every shard that no rank has
    delivered yet (for a resume on any other number of ranks).

    Args:
        states: one state per rank, all ranks of one run, in any order.

    Returns:
        The merged cursor (JSON-serialisable); `DataStream.load_state_dict` takes it.
    """
    if not states:
        raise LaVITError("merge_states: no rank states given")
    for state in states:
        _check_format(state, "merge_states")
        if "ranks" in state:
            raise LaVITError("merge_states: give the ranks' own states, not a merged one")
    first = states[0]
    for state in states[1:]:
        for field in COMMON_FIELDS:
            if state[field] != first[field]:
                raise LaVITError(
                    f"merge_states: the ranks disagree on {field!r}; are they states of one run?"
                )
    world = first["world_size"]
    by_rank = sorted(states, key=lambda s: s["rank"])
    if [s["rank"] for s in by_rank] != list(range(world)):
        got = sorted(s["rank"] for s in states)
        raise LaVITError(
            f"merge_states: need one state for each rank 0..{world - 1}, got ranks {got}"
        )

    lengths = first["index"]["lengths"]
    low = min(s["epoch"] for s in by_rank)
    high = max([s["epoch"] for s in by_rank] + [e for s in by_rank for e, _ in s["future"]])
    remaining = []
    for epoch in range(low, high + 1):
        per_shard: dict[int, list] = {}
        for state in by_rank:
            if state["epoch"] > epoch:
                continue  # this rank has delivered all of its share of that epoch
            if state["epoch"] == epoch:
                plan = state["plan"] + [[pos, [[i, i + 1, 1]]] for pos, i in state["buffer"]]
            else:
                future = dict((e, p) for e, p in state["future"])
                plan = future.get(epoch)
                if plan is None:
                    plan = standard_plan(lengths, first["seed"], epoch, first["shuffle_shards"],
                                         world, state["rank"])
            for pos, ranges in plan:
                per_shard.setdefault(pos, []).extend(ranges)
        remaining.append([epoch, [[pos, normalise(r)] for pos, r in sorted(per_shard.items())]])

    stats: dict[str, int] = {}
    for state in by_rank:
        for reason, count in state["stats"].items():
            stats[reason] = stats.get(reason, 0) + count
    merged = {field: first[field] for field in COMMON_FIELDS}
    merged["ranks"] = [{k: v for k, v in s.items() if k not in COMMON_FIELDS} for s in by_rank]
    merged["remaining"] = remaining
    merged["stats"] = stats
    return merged


def check_state(state: dict, what: str = "data cursor") -> None:
    """Refuse, in one line, something that is not a cursor of this version."""
    _check_format(state, what)
