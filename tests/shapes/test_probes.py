"""The linear probes the model card quotes: the ridge classifier by hand, and on the bundled model."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from lavit_mlx.shapes.probes import ridge_accuracy


def test_ridge_accuracy_reads_a_linear_label_and_not_noise():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(100), 10)
    labels = rng.integers(0, 4, size=1000)
    signal = np.eye(4)[labels] * 3.0 + rng.normal(size=(1000, 4))
    features = np.concatenate([signal, rng.normal(size=(1000, 12))], axis=1) @ rng.normal(size=(16, 16))
    assert ridge_accuracy(features, labels, groups) > 0.9
    noise = rng.normal(size=(1000, 16))
    assert abs(ridge_accuracy(noise, labels, groups) - 0.25) < 0.07
    with pytest.raises(ValueError, match="too few"):
        ridge_accuracy(features[:1], labels[:1], groups[:1])


@pytest.fixture(scope="module")
def bundled_probes():
    import lavit_mlx
    from lavit_mlx.shapes.probes import probe
    from lavit_mlx.zoo import bundled_model

    model = lavit_mlx.load(bundled_model(), components=["eva", "tokenizer", "highres_decoder"])
    return probe(model, scenes=120)


def test_the_bundled_tokens_keep_what_an_object_is(bundled_probes):
    """The encoder's features and the merger's output give an object patch's colour and cell
    linearly, and the kept codes' rows keep most of the colour (79% measured, chance ~17%)."""
    report = bundled_probes
    assert report["kept_object_patches"] > 0.9 * report["object_patches"]  # the selector keeps the objects
    assert report["target_colour"] > 0.95 and report["merged_colour"] > 0.95 and report["merged_cell"] > 0.95
    assert report["row_colour"] > 0.6 and report["row_cell"] > 0.9
    assert report["decoded_cos_background"] > report["decoded_cos_object"]


@pytest.mark.xfail(strict=True, reason="the bundled VQ decoder drops the colour its codes hold (15% measured; "
                                        "a decoder-only whitened run reached 53%, not shipped: model card)")
def test_the_bundled_vq_decoder_keeps_the_colour(bundled_probes):
    assert bundled_probes["decoded_colour"] > 0.4, bundled_probes


def test_the_probe_command_reports_json_and_rejects_a_bad_model(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lavit_mlx.shapes.probes", str(tmp_path / "nowhere")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and proc.stderr.strip().startswith("error:") and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "lavit_mlx.shapes.probes", "--scenes", "2"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "at least 4 scenes" in proc.stderr
