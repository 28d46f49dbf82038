"""Resuming from a checkpointed cursor: exact on the same world size, complete on another.

Ranks are simulated in one process: one `DataStream` per rank, each consuming some
samples, then their states merged as rank 0 would save them (through JSON, as a
checkpoint does) and loaded into the streams of the new world size.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
from support.data_builders import caption_manifest, write_manifest

from lavit_mlx.data import DataStream, merge_states
from lavit_mlx.errors import LaVITError

EPOCHS = 3
# Samples each rank consumes before the checkpoint: rank 0 passes the end of its share of
# epoch 0 (so the ranks stand in different epochs), rank 1 has consumed nothing.
CONSUMED = [11, 0, 6]


def labelled(stream, limit=None):
    """(epoch, (shard, index)) of the next `limit` samples (all if None)."""
    out = []
    for sample in stream:
        out.append((stream.epoch, (sample.shard, sample.index)))
        if limit is not None and len(out) == limit:
            break
    return out


@pytest.fixture(params=["manifest", "tars"])
def data(request, tmp_path, tar_shards):
    """(sources, options, the samples a whole epoch delivers) for a manifest and for tars."""
    if request.param == "tars":  # two shards: three ranks split within shards
        return tar_shards, {}, 18
    manifest = caption_manifest(tmp_path / "m", 45)
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    lines.insert(13, {"image": "images/none.png", "text": "missing file"})
    lines.insert(31, {"image": "images/00001.png", "text": ""})
    return write_manifest(tmp_path / "m", lines), {"lines_per_shard": 10}, 45


def streams(source, world, options, seed=5, buffer=4):
    return [DataStream(source, rank=r, world_size=world, seed=seed, shuffle_buffer=buffer,
                       epochs=EPOCHS, **options) for r in range(world)]


def checkpoint(ranks) -> dict:
    states = [json.loads(json.dumps(s.state_dict())) for s in ranks]
    merged = json.loads(json.dumps(merge_states(states[::-1])))  # any order of ranks
    assert len(json.dumps(merged)) < 6000
    return merged


def assert_each_sample_once_per_epoch(runs, per_epoch):
    everything = [item for run in runs for item in run]
    for epoch in range(EPOCHS):
        counts = Counter(s for e, s in everything if e == epoch)
        assert len(counts) == per_epoch and set(counts.values()) == {1}, epoch


@pytest.mark.parametrize("before,after", [(1, 1), (2, 2), (2, 1), (1, 3), (2, 3), (3, 2)])
def test_resume(data, before, after):
    source, options, per_epoch = data
    uninterrupted = [labelled(s) for s in streams(source, before, options)]

    first = streams(source, before, options)
    consumed = [labelled(s, CONSUMED[r]) if CONSUMED[r] else [] for r, s in enumerate(first)]
    merged = checkpoint(first)
    second = streams(source, after, options)
    for stream in second:
        stream.load_state_dict(merged)
    resumed = [labelled(s) for s in second]

    if before == after:  # exactly the uninterrupted sequence, rank by rank
        for r in range(before):
            assert consumed[r] + resumed[r] == uninterrupted[r]
    assert_each_sample_once_per_epoch(consumed + resumed, per_epoch)
    # The skip counts survive the checkpoint: the run counts what an uninterrupted one does.
    expected = Counter()
    for stream in streams(source, 1, options):
        labelled(stream)
        expected.update(stream.stats)
    assert Counter(merge_states([s.state_dict() for s in second])["stats"]) == expected


def test_resume_repeatedly_on_changing_world_sizes_and_seeds(data):
    source, options, per_epoch = data
    # (samples each rank takes, then the next world size, seed and buffer). The first
    # checkpoint has rank 1 in epoch 1 already, so the 3 ranks carry a share of epoch 1
    # through an exact (same settings) resume before moving to 1 rank and another seed.
    steps = [([4, 25], 3, 5, 3), ([2, 1, 3], 3, 5, 3), ([20], 1, 8, 4)]
    taken = []
    ranks = streams(source, 2, options)
    for counts, world, seed, buffer in steps:
        taken += [labelled(s, k) for s, k in zip(ranks, counts)]
        merged = checkpoint(ranks)
        ranks = streams(source, world, options, seed=seed, buffer=buffer)
        for stream in ranks:
            stream.load_state_dict(merged)
    taken += [labelled(s) for s in ranks]
    assert_each_sample_once_per_epoch(taken, per_epoch)


def test_a_single_rank_state_resumes_that_rank(data):
    source, options, _ = data
    one = streams(source, 1, options)[0]
    head = labelled(one, 7)
    again = streams(source, 1, options)[0]
    again.load_state_dict(json.loads(json.dumps(one.state_dict())))  # not merged
    assert head + labelled(again) == labelled(streams(source, 1, options)[0])


def test_cursor_mismatches_are_one_line_errors(tmp_path):
    manifest = caption_manifest(tmp_path, 12)
    pair = streams(manifest, 2, {"lines_per_shard": 5})
    states = [s.state_dict() for s in pair]
    with pytest.raises(LaVITError, match="merge_states"):
        streams(manifest, 3, {"lines_per_shard": 5})[0].load_state_dict(states[0])
    with pytest.raises(LaVITError, match="one state for each rank"):
        merge_states([states[0], states[0]])
    with pytest.raises(LaVITError, match="not a data cursor"):
        pair[0].load_state_dict({"step": 3})
    merged = merge_states(states)
    with open(manifest, "a") as out:
        out.write(json.dumps({"image": "images/00000.png", "text": "appended"}) + "\n")
    with pytest.raises(LaVITError, match="changed since it was indexed or checkpointed") as excinfo:
        streams(manifest, 2, {"lines_per_shard": 5})[0].load_state_dict(merged)
    assert "\n" not in str(excinfo.value)
