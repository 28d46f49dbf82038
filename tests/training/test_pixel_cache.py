"""The pixel stage's picture cache is reused by a resumed run (its fingerprint survives JSON)."""

import numpy as np

from lavit_mlx.training.stages.pixel import Cached, cached_pictures


def test_a_second_run_reads_the_cache_instead_of_building_it(tmp_path):
    builds = []

    def build():
        builds.append(1)
        n = 3
        return Cached(mean=np.zeros((n, 4, 2, 2), np.float32), std=np.ones((n, 4, 2, 2), np.float32),
                      codes=np.zeros((n, 5), np.int32), valid=np.ones((n, 5), bool),
                      time_ids=np.zeros((n, 6), np.float32), pixels=None, texts=None)

    fingerprint = {"files": [("/data/manifest.jsonl", 10, 123)], "limit": 0}  # tuples, as fingerprint() gives
    first = cached_pictures(tmp_path, "train", fingerprint, build)
    again = cached_pictures(tmp_path, "train", fingerprint, build)
    assert len(builds) == 1 and np.array_equal(first.codes, again.codes)
    cached_pictures(tmp_path, "train", {**fingerprint, "limit": 5}, build)
    assert len(builds) == 2
