"""`lavit finetune` on the bundled model: 100 captions in a new style (each starts "yes, ")
make `lavit caption --adapter` write that style on new scenes; without the adapter the
model does not."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow
STYLE = "yes, "


def lavit(*args):
    proc = subprocess.run([sys.executable, "-m", "lavit_cli.cli", *map(str, args)], capture_output=True, text=True)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc


def test_a_new_caption_style_is_learned(tmp_path):
    from lavit_mlx.shapes import write_manifest

    manifest = write_manifest(tmp_path / "style", seed=4242, n=100, kinds=["caption"])
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    manifest.write_text("".join(json.dumps({**line, "text": STYLE + line["text"]}) + "\n" for line in lines))
    lavit("finetune", "--data", manifest, "--task", "caption", "--out", tmp_path / "adapter", "--steps", 120,
          "--batch-size", 8, "--learning-rate", "1e-3", "--seed", 1)
    fresh = write_manifest(tmp_path / "new", seed=4343, n=10, kinds=["caption"])
    images = [fresh.parent / json.loads(line)["image"] for line in fresh.read_text().splitlines()]
    before = json.loads(lavit("caption", *images, "--json").stdout)
    after = json.loads(lavit("caption", *images, "--json", "--adapter", tmp_path / "adapter").stdout)
    assert sum(r["caption"].startswith(STYLE) for r in before) == 0
    assert sum(r["caption"].startswith(STYLE) for r in after) >= 8, [r["caption"] for r in after]
