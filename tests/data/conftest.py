"""Fixtures of the data tests (the builders are in data_builders.py)."""

from __future__ import annotations

import pytest
from support.data_builders import img2dataset_shard


@pytest.fixture
def tar_shards(tmp_path):
    """Two tar shards of 9 samples; the second has a stray member (a sample without image)."""
    folder = tmp_path / "shards"
    img2dataset_shard(folder, 0, 9)
    img2dataset_shard(folder, 1, 9, extra=[("README.txt", b"not a sample")])
    return str(folder / "{00000..00001}.tar")
