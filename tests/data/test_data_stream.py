"""Shuffling, determinism, the rank split, epochs and bounded memory of `DataStream`."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from support.data_builders import caption_manifest, ids, image_bytes, write_tar

import lavit_mlx.data.stream as stream_module
from lavit_mlx.data import DataStream, format_stats
from lavit_mlx.errors import LaVITError


@pytest.fixture
def manifest(tmp_path):
    """47 captions in 5 virtual shards of 10 (the last one 7)."""
    return caption_manifest(tmp_path, 47)


def test_same_seed_same_sequence_other_seed_other_sequence(manifest):
    def run(seed):
        return ids(DataStream(manifest, seed=seed, shuffle_buffer=8, lines_per_shard=10, epochs=2))

    first = run(3)
    assert first == run(3)
    assert first != run(4)
    assert len(first) == 94


def test_shuffle_really_shuffles(manifest):
    stream = DataStream(manifest, seed=0, shuffle_buffer=8, lines_per_shard=10, epochs=2)
    order = [(stream.epoch, (sample.shard, sample.index)) for sample in stream]
    epochs = [[s for e, s in order if e == epoch] for epoch in (0, 1)]
    in_file_order = sorted(epochs[0], key=lambda s: (int(s[0].split("@")[1]), s[1]))
    for epoch in epochs:
        assert sorted(epoch) == sorted(in_file_order)  # every sample once per epoch
        assert epoch != in_file_order
    assert epochs[0] != epochs[1]
    # The shard order changes between epochs, and samples move within the buffer's reach.
    shard_order = [list(dict.fromkeys(s[0] for s in epoch)) for epoch in epochs]
    assert shard_order[0] != shard_order[1]
    first_ten = epochs[0][:10]
    assert sorted(i for _, i in first_ten) != [i for _, i in first_ten]
    # Without the options, the file order.
    plain = DataStream(manifest, shuffle_buffer=1, shuffle_shards=False, lines_per_shard=10,
                       epochs=1)
    assert ids(plain) == in_file_order


@pytest.mark.parametrize("lines_per_shard", [10, 30])  # 5 shards, or 2 (fewer than some worlds)
def test_rank_split_covers_all_samples_disjointly(manifest, lines_per_shard):
    for world in (1, 2, 3, 4):
        per_rank = [ids(DataStream(manifest, rank=r, world_size=world, seed=1, shuffle_buffer=4,
                                   lines_per_shard=lines_per_shard, epochs=1))
                    for r in range(world)]
        counts = Counter(s for samples in per_rank for s in samples)
        assert len(counts) == 47 and set(counts.values()) == {1}, world
        shards_of = [{shard for shard, _ in samples} for samples in per_rank]
        if 47 // lines_per_shard + 1 >= world:  # split by shard: no shard on two ranks
            assert sum(len(s) for s in shards_of) == len(set().union(*shards_of))
        else:  # fewer shards than ranks: every rank reads every shard, a slice of it
            assert all(len(s) == 2 for s in shards_of)
            assert all(abs(len(a) - len(b)) <= 2 for a in per_rank for b in per_rank)


def test_epochs_and_epoch_length(manifest):
    stream = DataStream(manifest, world_size=2, rank=1, lines_per_shard=10, epochs=3)
    assert stream.epoch_length() == len(stream) == 47  # over all ranks
    seen = Counter()
    for _ in stream:
        seen[stream.epoch] += 1
    assert list(seen) == [0, 1, 2] and stream.epoch == 2
    assert stream.stats["samples"] == sum(seen.values())
    assert format_stats({"samples": 5, "bad_image": 2, "empty_text": 0}) == \
        "5 samples; skipped 2 (bad_image 2)"


def test_epoch_samples_stops_at_the_end_of_the_epoch(manifest):
    stream = DataStream(manifest, lines_per_shard=10, shuffle_buffer=5)
    iterator = iter(stream)
    head = [next(iterator) for _ in range(10)]
    tail = list(stream.epoch_samples())
    assert len(head) + len(tail) == 47 and stream.epoch == 0
    next_epoch = list(stream.epoch_samples())
    assert len(next_epoch) == 47 and stream.epoch == 1


def test_infinite_stream_without_usable_samples_is_an_error(tmp_path):
    bad = write_tar(tmp_path / "bad.tar", [("a.png", b"not a png"), ("a.txt", b"x")])
    with pytest.raises(LaVITError, match="without a usable sample"):
        next(iter(DataStream(bad)))


def test_bad_options_are_errors(manifest):
    with pytest.raises(LaVITError):
        DataStream(manifest, rank=2, world_size=2)
    with pytest.raises(LaVITError):
        DataStream(manifest, shuffle_buffer=0)


def test_memory_stays_bounded_on_a_long_manifest(tmp_path, monkeypatch):
    manifest = caption_manifest(tmp_path, 20_000, shared_image=True)
    read = Counter()
    real_read_shard = stream_module.read_shard

    def counting_read_shard(*args):
        for item in real_read_shard(*args):
            read["records"] += 1
            yield item

    monkeypatch.setattr(stream_module, "read_shard", counting_read_shard)
    buffer = 64
    # Images are not decoded here: this is about what is held, and 20k decodes take seconds.
    stream = DataStream(manifest, shuffle_buffer=buffer, epochs=1, load_images=False)
    assert stream.epoch_length() == 20_000 and read["records"] == 0  # the index reads no record
    delivered, most_held = 0, 0
    for sample in stream:
        assert sample.image is None and sample.text
        delivered += 1
        most_held = max(most_held, read["records"] - delivered)
    assert delivered == 20_000 and read["records"] == 20_000
    assert most_held <= buffer


def test_a_saved_index_is_not_counted_again(manifest, monkeypatch):
    counted = DataStream(manifest, lines_per_shard=10, epochs=1)
    saved = json.loads(json.dumps(counted.index_state()))
    monkeypatch.setattr(stream_module, "build_index", lambda *a: pytest.fail("indexed again"))
    reused = DataStream(manifest, lines_per_shard=10, epochs=1, index=saved)
    assert ids(reused) == ids(counted)
    with open(manifest, "a") as out:
        out.write("{}\n")
    with pytest.raises(LaVITError, match="changed since it was indexed"):
        DataStream(manifest, index=saved)


def test_tar_and_manifest_mixed(tmp_path):
    manifest = caption_manifest(tmp_path / "m", 5)
    shard = write_tar(tmp_path / "t" / "x.tar",
                      [("k.jpg", image_bytes(1, "JPEG")), ("k.txt", b"t")])
    stream = DataStream([manifest, shard], epochs=1)
    assert sorted(stream.shard_ids) == ["m/train.jsonl@0", "t/x.tar"]
    assert len(list(stream)) == 6
