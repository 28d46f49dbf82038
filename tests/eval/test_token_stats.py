"""Token statistics on known inputs; the histogram with and without matplotlib."""

from __future__ import annotations

import math
import sys

import pytest

from lavit_mlx.errors import LaVITError, MissingDependencyError
from lavit_mlx.eval.token_stats import codebook_usage, count_summary, save_histogram, token_stats

COUNTS = [10, 20, 30, 40, 50]


def test_count_summary_percentiles_and_kept_fraction():
    summary = count_summary(COUNTS, num_patches=100, rho=0.25)
    # linear interpolation between order statistics: p5 sits 0.05 * 4 = 0.2 of the way from 10 to 20
    assert summary == pytest.approx({
        "images": 5, "mean": 30.0, "median": 30.0, "p5": 12.0, "p25": 20.0, "p75": 40.0, "p95": 48.0,
        "min": 10, "max": 50, "kept_fraction": 0.3, "rho": 0.25, "kept_minus_rho": 0.05,
    })


def test_codebook_usage_perplexity():
    uniform = codebook_usage([[0, 1], [2, 3]], codebook_size=16)
    assert uniform == pytest.approx({"tokens": 4, "codes_used": 4, "usage": 0.25, "perplexity": 4.0})
    skewed = codebook_usage([[7, 7, 7], [9]], codebook_size=16)
    # exp(H) with p = (3/4, 1/4): exp(-(0.75 ln 0.75 + 0.25 ln 0.25)) = 0.75^-0.75 * 0.25^-0.25
    assert skewed["perplexity"] == pytest.approx(0.75 ** -0.75 * 0.25 ** -0.25, rel=1e-12)
    assert (skewed["codes_used"], skewed["usage"]) == (2, 2 / 16)
    assert codebook_usage([[], []])["perplexity"] == 0.0


def test_token_stats_overall_and_by_label():
    codes = [[1] * 10, [2] * 20, [1] * 15 + [3] * 15, [4] * 40, [5] * 50]
    labels = {"num_objects": [1, 1, 2, 10, 10]}
    report = token_stats(COUNTS, codes=codes, labels=labels, num_patches=100, rho=0.3, codebook_size=8)
    assert report["all"]["mean"] == 30.0
    assert report["all"]["codebook"]["codes_used"] == 5
    groups = report["by_label"]["num_objects"]
    assert list(groups) == ["1", "2", "10"]  # numeric order, not "1", "10", "2"
    assert [groups[key]["mean"] for key in groups] == [15.0, 30.0, 45.0]
    assert groups["2"]["codebook"]["perplexity"] == pytest.approx(2.0)
    assert report["histogram"] is None and "histogram_error" not in report


@pytest.mark.parametrize("kwargs, message", [
    ({"num_tokens": [3, 300]}, r"image 1: token count 300 is not an integer in 0..256"),
    ({"num_tokens": [2], "codes": [[1, 2], [3]]}, r"2 code lists for 1 token counts"),
    ({"num_tokens": [2], "codes": [[1]]}, r"image 0: 1 codes for 2 tokens"),
    ({"num_tokens": [1], "codes": [[16384]]}, r"image 0: code 16384 is outside the codebook"),
    ({"num_tokens": [1, 2], "labels": {"scene": ["a"]}}, r"label column 'scene' has 1 values for 2 images"),
    ({"num_tokens": []}, r"no token counts"),
])
def test_bad_inputs_are_one_line_errors(kwargs, message):
    with pytest.raises(LaVITError, match=message):
        token_stats(**kwargs)


def test_histogram_png(tmp_path):
    pytest.importorskip("matplotlib", reason="needs the [plot] extra")
    path = tmp_path / "tokens.png"
    report = token_stats(COUNTS, histogram=path, num_patches=100, rho=0.3)
    assert report["histogram"] == str(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    save_histogram(COUNTS, tmp_path / "groups.png", groups=["a", "a", "b", "b", "b"], title="by scene")
    assert (tmp_path / "groups.png").stat().st_size > 1000
    with pytest.raises(LaVITError, match="already exists"):
        save_histogram(COUNTS, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["groups.png", "tokens.png"]  # no temporary files


def test_without_matplotlib_the_rest_of_the_report_works(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(MissingDependencyError, match=r"matplotlib: pip install 'lavit-mlx\[plot\]'"):
        save_histogram(COUNTS, tmp_path / "x.png")
    report = token_stats(COUNTS, histogram=tmp_path / "x.png")
    assert report["histogram"] is None
    assert "lavit-mlx[plot]" in report["histogram_error"] and "\n" not in report["histogram_error"]
    assert math.isclose(report["all"]["mean"], 30.0)
    assert not (tmp_path / "x.png").exists()
