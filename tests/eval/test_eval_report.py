"""The eval report: contents, hashes, atomic writes; the plain-text table; imports without mlx/torch."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from lavit_mlx.errors import LaVITError
from lavit_mlx.eval.report import build_report, config_hash, file_sha256, format_table, write_report


def test_config_hash_is_sha256_of_canonical_json():
    config = {"llm": {"hidden": 64, "layers": 2}, "rho": 1 / 3, "name": "tiny-é"}
    canonical = '{"llm":{"hidden":64,"layers":2},"name":"tiny-é","rho":0.3333333333333333}'
    assert config_hash(config) == hashlib.sha256(canonical.encode("utf-8")).hexdigest()
    reordered = {"rho": 1 / 3, "name": "tiny-é", "llm": {"layers": 2, "hidden": 64}}
    assert config_hash(reordered) == config_hash(config)
    assert config_hash({**config, "rho": 0.5}) != config_hash(config)


def test_report_contents(tmp_path):
    data = tmp_path / "val.jsonl"
    data.write_bytes(b'{"image": "a.jpg", "text": "a cat"}\n')
    report = build_report("caption", {"CIDEr": 1.25, "per_image": {1: 0.5}, "bad": float("nan")},
                          model=tmp_path / "model", config={"a": 1}, data_files=data,
                          settings={"beams": 2, "max_tokens": 36}, seed=7)
    assert report["task"] == "caption"
    assert report["metrics"] == {"CIDEr": 1.25, "per_image": {"1": 0.5}, "bad": None}
    assert report["model"] == str(tmp_path / "model")
    assert report["config_sha256"] == config_hash({"a": 1})
    assert report["data"] == [{"path": str(data), "sha256": hashlib.sha256(data.read_bytes()).hexdigest()}]
    assert report["settings"] == {"beams": 2, "max_tokens": 36} and report["seed"] == 7
    assert report["lavit_mlx_version"] and report["created"].endswith("+00:00")
    with pytest.raises(LaVITError, match=r"cannot read data file .*absent.json"):
        file_sha256(tmp_path / "absent.json")


def test_write_report_is_atomic_and_refuses_to_overwrite(tmp_path):
    path = tmp_path / "report.json"
    report = {"task": "vqa", "metrics": {"overall": 66.0}, "path": Path("x")}
    assert write_report(report, path) == path
    assert json.loads(path.read_text()) == {"task": "vqa", "metrics": {"overall": 66.0}, "path": "x"}
    with pytest.raises(LaVITError, match=r"report.json already exists \(use --force"):
        write_report(report, path)
    write_report({"task": "t2i"}, path, force=True)
    assert json.loads(path.read_text()) == {"task": "t2i"}
    with pytest.raises(LaVITError, match="cannot write a object into a report"):
        write_report({"task": object()}, tmp_path / "bad.json")
    with pytest.raises(LaVITError, match=r"folder .*missing does not exist"):
        write_report(report, tmp_path / "missing" / "r.json")
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]  # no temporary or partial files


def test_format_table():
    rows = [{"metric": "BLEU-4", "value": 0.4012345}, {"metric": "CIDEr", "value": 1.334, "n": 5000}]
    assert format_table(rows) == "\n".join([
        "metric   value     n",
        "------  ------  ----",
        "BLEU-4  0.4012",
        "CIDEr   1.3340  5000",
    ])
    assert format_table([["yes/no", 80.5]], headers=["type", "acc"], float_format="{:.1f}") == \
        "type     acc\n------  ----\nyes/no  80.5"
    with pytest.raises(LaVITError, match="need headers"):
        format_table([[1, 2]])


def test_eval_package_imports_without_mlx_or_torch():
    code = ("import sys\n"
            "import lavit_mlx.eval.caption_metrics, lavit_mlx.eval.vqa_metrics, lavit_mlx.eval.data\n"
            "import lavit_mlx.eval.token_stats, lavit_mlx.eval.fid, lavit_mlx.eval.report\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mlx', 'torch', 'matplotlib')))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
