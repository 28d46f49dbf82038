"""The cursor arithmetic: index sets, the seeded shard order, the split of left-over samples."""

from __future__ import annotations

from lavit_mlx.data.cursor import (CounterRNG, clip_after, iter_sorted, normalise, partition,
                                   shard_order, split_positions)


def members(ranges):
    return list(iter_sorted(ranges))


def test_shard_order_is_pinned():
    # The same on every machine and Python version: a cursor saved on one resumes on another.
    assert shard_order(10, seed=0, epoch=0, shuffle=True) == [2, 5, 1, 4, 7, 6, 3, 8, 0, 9]
    assert shard_order(10, seed=0, epoch=1, shuffle=True) != shard_order(10, 0, 0, True)
    assert shard_order(4, seed=0, epoch=0, shuffle=False) == [0, 1, 2, 3]
    rng = CounterRNG("buffer", 1, 2)
    draws = [rng.below(1000) for _ in range(3)]
    assert draws == [486, 710, 393]  # splitmix64 checked against a numpy uint64 version
    again = CounterRNG("buffer", 1, 2, draws=1)
    assert [again.below(1000) for _ in range(2)] == draws[1:]


def test_clip_after_keeps_what_is_unread():
    ranges = [[0, 10, 3], [4, 6, 1]]  # 0 3 6 9 and 4 5
    assert members(ranges) == [0, 3, 4, 5, 6, 9]
    assert members(clip_after(ranges, 4)) == [5, 6, 9]
    assert clip_after(ranges, 9) == []
    assert members(clip_after(ranges, -1)) == members(ranges)


def test_split_positions_balances_fragmented_sets():
    singles = [[0, 1, 1], [5, 6, 1], [9, 10, 1]]
    assert [members(split_positions(singles, 3, r)) for r in range(3)] == [[0], [5], [9]]
    ranges = [[0, 7, 2], [1, 4, 1]]  # 0 2 4 6, then 1 2 3 (positions 4 5 6)
    shares = [split_positions([[0, 7, 2], [1, 4, 1]], 2, r) for r in range(2)]
    assert sorted(members(shares[0]) + members(shares[1])) == sorted(members(ranges))
    assert [len(members(s)) for s in shares] == [4, 3]


def test_normalise_joins_buffered_singletons():
    assert normalise([[7, 8, 1], [3, 7, 1], [20, 30, 5], [40, 40, 1], [8, 9, 2]]) == \
        [[3, 9, 1], [20, 26, 5]]


def test_partition_by_shard_or_within_shards():
    entries = [[2, [[0, 4, 1]]], [0, [[0, 3, 1]]], [1, [[1, 2, 1]]]]
    assert [partition(entries, 2, r) for r in range(2)] == [
        [[2, [[0, 4, 1]]], [1, [[1, 2, 1]]]], [[0, [[0, 3, 1]]]]]
    four = [partition(entries, 4, r) for r in range(4)]
    assert four[3] == [[2, [[3, 4, 4]]]]  # every 4th sample of each shard
    assert sorted((pos, i) for share in four for pos, ranges in share
                  for i in members(ranges)) == sorted(
        (pos, i) for pos, ranges in entries for i in members(ranges))
