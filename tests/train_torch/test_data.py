"""Evaluation over img2dataset tar shards with WebDataset's pipeline: split by node (and worker),
undecodable samples skipped and counted; manifests go through the resumable stream."""

from __future__ import annotations

from support.data_builders import img2dataset_shard

from lavit_train.data import EvalShards, StreamLoader, eval_loader
from lavit_train.distributed import World


def keys(example_batches):
    return [key for batch in example_batches for key in batch["key"]]


def example(sample, stream):
    return {"key": sample.key, "text": sample.text, "epoch": stream.epoch}


def collate(examples):
    return {name: [e[name] for e in examples] for name in examples[0]}


def test_tar_shards_are_split_by_node_and_bad_samples_counted(tmp_path, monkeypatch):
    bad = [("0000099.jpg", b"not a jpeg"), ("0000099.txt", b"broken")]
    shards = [img2dataset_shard(tmp_path, n, 4, extra=bad if n == 1 else None) for n in range(3)]
    pattern = str(tmp_path / "{00000..00002}.tar")
    loader = eval_loader(pattern, World(), 5, example, collate)
    assert isinstance(loader, EvalShards)
    seen = keys(loader)
    assert len(seen) == 12 and len(set(seen)) == 12
    assert sum(loader.errors.values()) == 1 and loader.epoch_length() == 12
    assert all(isinstance(t, str) and t.startswith("shard") for batch in loader for t in batch["text"])
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")  # webdataset's split_by_node reads torchrun's variables
    second = keys(EvalShards(pattern, World(), 5, example, collate))
    assert sorted(second) == sorted(k for k in seen if k.startswith("00001"))
    assert len(shards) == 3


def test_manifests_are_read_once_in_order(tmp_path):
    import builders

    manifest = builders.manifest(tmp_path, 7)
    loader = eval_loader(manifest, World(), 3, lambda s, stream: {"uid": s.meta["uid"], "epoch": stream.epoch},
                         collate)
    assert isinstance(loader, StreamLoader)
    assert [uid for batch in loader for uid in batch["uid"]] == list(range(7))
