"""Batches, length buckets, and the mlx-lm `iterate_batches` hook."""

from __future__ import annotations

import json

import numpy as np
import pytest
from support.data_builders import caption_manifest

from lavit_mlx.data import DataStream, batches, bucket_length, merge_states, pad_batch
from lavit_mlx.errors import LaVITError


def test_batches_and_drop_last():
    assert list(batches(range(10), 4)) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert list(batches(range(10), 4, drop_last=True)) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert list(batches([], 3)) == []
    with pytest.raises(LaVITError):
        list(batches(range(3), 0))


def test_a_cursor_taken_between_batches_resumes_at_the_next_batch(tmp_path):
    manifest = caption_manifest(tmp_path, 23)

    def run():
        return DataStream(manifest, seed=2, shuffle_buffer=6, lines_per_shard=8, epochs=2)

    def keys(batch_list):
        return [[s.key for s in batch] for batch in batch_list]

    everything = keys(batches(run(), 5, drop_last=True))
    stream = run()
    head = keys(b for _, b in zip(range(3), batches(stream, 5, drop_last=True)))
    resumed = run()
    resumed.load_state_dict(json.loads(json.dumps(merge_states([stream.state_dict()]))))
    assert head + keys(batches(resumed, 5, drop_last=True)) == everything


def test_bucket_length():
    assert [bucket_length(n) for n in (1, 32, 33, 64, 65)] == [32, 32, 64, 64, 96]
    assert [bucket_length(n, multiple=8) for n in (0, 9)] == [8, 16]
    assert [bucket_length(n, lengths=[64, 16, 128]) for n in (3, 16, 17, 129)] == [16, 16, 64, 128]
    assert bucket_length(40, max_length=50) == 50
    assert bucket_length(70, lengths=[64], max_length=32) == 32


def test_pad_batch_pads_to_a_bucket_and_truncates():
    tokens, kept = pad_batch([[5, 6, 7], [8]], pad_id=-1)
    assert tokens.shape == (2, 32) and tokens.dtype == np.int32
    assert tokens[0, :4].tolist() == [5, 6, 7, -1] and kept.tolist() == [3, 1]
    # extra=1: after the next-token shift the model sees a bucketed length.
    assert pad_batch([[1] * 33], extra=1)[0].shape == (1, 33)
    assert pad_batch([[1] * 34], extra=1)[0].shape == (1, 65)
    tokens, kept = pad_batch([list(range(100))], lengths=[16, 48], max_length=40)
    assert tokens.shape == (1, 40) and kept.tolist() == [40] and tokens[0, -1] == 39


def test_iterate_batches_hook_runs_in_mlx_lm_evaluate(tmp_path):
    nn = pytest.importorskip("mlx.nn")
    trainer = pytest.importorskip("mlx_lm.tuner.trainer")
    from lavit_mlx.data.tuner import make_iterate_batches

    class TinyLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(128, 8)
            self.head = nn.Linear(8, 128)

        def __call__(self, tokens):
            return self.head(self.embed(tokens))

    def encode(sample):  # prompt "c:" then the caption, as (tokens, prompt length)
        return [ord(c) for c in "c:" + sample.text], 2

    stream = DataStream(caption_manifest(tmp_path, 10), shuffle_buffer=1, shuffle_shards=False)
    hook = make_iterate_batches(encode)
    shapes = [(t.shape, o.tolist()[0]) for t, o in hook(stream, 4, 2048)]
    assert shapes == [((4, 33), [2, 11]), ((4, 33), [2, 11])]  # 10 samples, whole batches of 4
    loss = trainer.evaluate(TinyLM(), stream, batch_size=4, num_batches=-1,
                            iterate_batches=hook)
    assert np.isfinite(loss) and stream.epoch == 1  # evaluate read one epoch, the next one
    with pytest.raises(LaVITError, match="not a lavit_mlx.data.DataStream"):
        next(hook([1, 2, 3], 4, 64))
