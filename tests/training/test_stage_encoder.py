"""The encoder stage: its losses fall on a tiny shapes world, a SIGKILLed run resumes
bit-identically, and the exported folder loads the trained EVA.

Run as a script it trains a tiny encoder and prints a checksum of everything it saved:
    python test_stage_encoder.py WORLD OUT STEPS [KILL_AT_BATCH]
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import lavit_mlx  # noqa: E402,F401  (the fast BLAS before mlx)
import mlx.core as mx  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from lavit_mlx.errors import LaVITError  # noqa: E402
from lavit_mlx.training import load_run_config  # noqa: E402
from lavit_mlx.training.loop import World, train  # noqa: E402
from lavit_mlx.training.stages import build_stage  # noqa: E402

SCRIPT = Path(__file__)
IMAGE_SIZE = 112  # a 4 x 4 grid of 28-pixel patches: the stages' code paths at a tiny cost


def make_world(folder: Path, scenes: int = 48) -> Path:
    """A tiny shapes world on disk: text tokenizer, train and eval caption manifests."""
    from lavit_mlx.shapes.dataset import write_manifest
    from lavit_mlx.shapes.text_tokenizer import train_text_tokenizer

    train_text_tokenizer(folder / "text")
    write_manifest(folder / "train", seed=0, n=scenes, kinds=["caption"])
    write_manifest(folder / "eval", seed=1, n=16, kinds=["caption"])
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return make_world(tmp_path_factory.mktemp("shapes"))


def data_overrides(world: Path) -> list:
    return [f"data.train={world / 'train' / 'manifest.jsonl'}", f"data.eval={world / 'eval' / 'manifest.jsonl'}",
            f"data.image_size={IMAGE_SIZE}", "data.shuffle_buffer=16", "data.lines_per_shard=16"]


def encoder_overrides(world: Path, out: Path, steps: int) -> list:
    return [f"out={out}", f"model.text_tokenizer={world / 'text'}", "model.width=32", "model.depth=1",
            "model.num_heads=2", "model.embed_dim=16", "model.text_width=32", "model.text_depth=1",
            "model.text_heads=2", "model.text_length=32", f"train.steps={steps}", "train.batch_size=8",
            "train.learning_rate=3e-3", "train.warmup_steps=2", "train.log_every=1", "train.save_every=5",
            "train.eval_batches=2", *data_overrides(world)]


def killing_at(stage, kill_at):
    """Make `stage` SIGKILL itself when it is asked for batch `kill_at` (0-based)."""
    if kill_at is None:
        return stage
    batches = stage.batches

    def killer():
        for index, batch in enumerate(batches()):
            if index == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            yield batch

    stage.batches = killer
    return stage


def checksum(stage) -> dict:
    """sha256 of every saved parameter and every stage-state array."""
    arrays = {**stage.saved_parameters(), **{f"state.{k}": v for k, v in tree_flatten(stage.state)}}
    return {k: hashlib.sha256(np.array(v).tobytes()).hexdigest() for k, v in sorted(arrays.items())}


def run_stage(stage_name: str, overrides: list, kill_at=None):
    config = load_run_config(stage_name, None, overrides)
    stage = killing_at(build_stage(config, World.init()), kill_at)
    last = train(stage, config)
    return stage, last


def run_script(script: Path, *args, timeout=600):
    return subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def log_of(out: Path) -> list:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_losses_fall_and_the_export_loads(world, tmp_path):
    out = tmp_path / "encoder"
    stage, last = run_stage("encoder", encoder_overrides(world, out, 40) + ["loss.position_weight=1.0",
                                                                          "loss.position_on=content",
                                                                          "loss.object_weight=1.0"])
    log = [r for r in log_of(out) if "split" not in r]
    first, final = log[:3], log[-3:]
    mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    assert mean(final, "patch_pixels") < 0.5 * mean(first, "patch_pixels")
    assert mean(final, "patch_position") < 0.5 * mean(first, "patch_position")
    assert mean(final, "contrastive") < mean(first, "contrastive") - 0.3
    assert mean(final, "patch_objects") < 0.8 * mean(first, "patch_objects")
    assert {"contrastive", "patch_pixels", "logit_scale", "retrieval_accuracy", "eval_contrastive",
            "object_accuracy", "eval_patch_objects"} <= set(last)
    model = lavit_mlx.load(out / "model", components=["eva"])
    assert model.config.vision.width == 32 and model.config.vision.num_patches == 16
    assert model.config.token_ids.num_text == stage.vocab_size
    pixels = mx.random.normal((2, 3, IMAGE_SIZE, IMAGE_SIZE), key=mx.random.key(0))
    stage.model.eva.eval()
    assert mx.allclose(model.eva(pixels), stage.model.eva(pixels), atol=1e-5)


def test_sigkill_then_resume_is_bit_identical(world, tmp_path):
    straight = run_script(SCRIPT, world, tmp_path / "a", 12)
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = run_script(SCRIPT, world, tmp_path / "b", 12, 8)  # killed fetching step 9's batch
    assert killed.returncode == -9
    resumed = run_script(SCRIPT, world, tmp_path / "b", 12)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads(resumed.stdout.splitlines()[-1]) == json.loads(straight.stdout.splitlines()[-1])
    assert [r["step"] for r in log_of(tmp_path / "b") if "split" not in r] == list(range(1, 13))


def test_pooled_patch_targets():
    from lavit_mlx.training.stages.encoder import pooled_patches

    pixels = mx.arange(2 * 3 * 8 * 8, dtype=mx.float32).reshape(2, 3, 8, 8)
    pooled = pooled_patches(pixels, patch=4, grid=2)  # 2 x 2 patches of 4 x 4, pooled to 2 x 2
    assert pooled.shape == (2, 4, 12)
    # image 1, patch (row 1, col 0), channel 2, pooled cell (0, 1): rows 4-5, columns 2-3
    expected = np.array(pixels)[1, 2, 4:6, 2:4].mean()
    assert float(pooled[1, 2, 2 * 4 + 0 * 2 + 1]) == pytest.approx(expected)


def test_patch_position_targets():
    from lavit_mlx.training.stages.encoder import patch_positions

    grid = np.array(patch_positions(4))  # 4 x 4 patches in raster order: (row, column) centres
    assert grid.shape == (16, 2)
    assert grid[0].tolist() == [-0.75, -0.75] and grid[3].tolist() == [-0.75, 0.75]
    assert grid[4].tolist() == [-0.25, -0.75] and grid[15].tolist() == [0.75, 0.75]


def test_content_patches_are_those_unlike_the_background():
    from lavit_mlx.training.stages.encoder import content_patches

    pooled = np.full((2, 9, 4), 1.0, np.float32)  # 3 x 3 patches of 4 cells, white ...
    pooled[0, 4, 1] = 0.2  # ... one cell of picture 0's centre patch coloured
    pooled[1, [0, 8]] = -1.5  # two whole patches of picture 1
    pooled[1, 5, 2] = 0.8  # a cell within the tolerance: still background
    where = np.array(content_patches(mx.array(pooled)))
    assert where[0].tolist() == [0, 0, 0, 0, 1, 0, 0, 0, 0]
    assert where[1].tolist() == [1, 0, 0, 0, 0, 0, 0, 0, 1]


def test_patch_objects_are_the_scene_objects_under_each_patch():
    from lavit_mlx.shapes.world import COLOURS, PLACES, SHAPES, caption, patch_objects, render, scenes

    for scene in scenes(7, 20):
        colour, shape, cell = patch_objects(render(scene), caption(scene), 28)
        assert colour.shape == shape.shape == cell.shape == (64,)
        assert ((colour > 0) == (cell > 0)).all() and ((shape > 0) == (cell > 0)).all()
        for obj in scene.objects:
            mine = np.flatnonzero(cell == 1 + PLACES.index(obj.place))
            # the patch under the object's centre is labelled with it, and every patch so labelled
            # carries its colour and shape and lies within a patch of its box
            centre = int(obj.cy // 28) * 8 + int(obj.cx // 28)
            assert centre in mine
            assert (colour[mine] == 1 + list(COLOURS).index(obj.colour)).all()
            assert (shape[mine] == 1 + SHAPES.index(obj.shape)).all()
            x0, y0, x1, y1 = obj.box
            rows, cols = mine // 8, mine % 8
            assert (rows * 28 < y1).all() and ((rows + 1) * 28 > y0).all()
            assert (cols * 28 < x1).all() and ((cols + 1) * 28 > x0).all()
        assert int((cell > 0).sum()) >= 4 * len(scene.objects)  # a 40 px object covers at least 2 x 2 patches
    with pytest.raises(LaVITError, match="names no object of the shapes world"):
        patch_objects(render(next(scenes(7, 1))), "a photo of a dog", 28)


def test_the_object_term_refuses_other_worlds_captions(world, tmp_path):
    from lavit_mlx.shapes.world import render, scenes

    folder = tmp_path / "other"
    (folder / "images").mkdir(parents=True)
    render(next(scenes(3, 1))).save(folder / "images" / "0.png")
    (folder / "manifest.jsonl").write_text(json.dumps({"image": "images/0.png", "text": "a photo of a dog"}) + "\n")
    overrides = encoder_overrides(world, tmp_path / "run", 2) + [f"data.train={folder / 'manifest.jsonl'}",
                                                                 "loss.object_weight=1.0", "train.batch_size=1"]
    with pytest.raises(LaVITError, match="loss.object_weight needs the shapes world's captions"):
        run_stage("encoder", overrides)


def test_bad_configs_are_one_line_errors(world):
    with pytest.raises(LaVITError, match="loss.object_weight -2.0: expected at least 0"):
        load_run_config("encoder", None, [f"model.text_tokenizer={world / 'text'}", "loss.object_weight=-2"])
    with pytest.raises(LaVITError, match="loss.position_on 'edges': choose among all, content"):
        load_run_config("encoder", None, [f"model.text_tokenizer={world / 'text'}", "loss.position_on=edges"])
    with pytest.raises(LaVITError, match="loss.position_weight -1.0: expected at least 0"):
        load_run_config("encoder", None, [f"model.text_tokenizer={world / 'text'}", "loss.position_weight=-1"])
    with pytest.raises(LaVITError, match="model.text_tokenizer"):
        load_run_config("encoder", None, [])
    with pytest.raises(LaVITError, match="text_heads"):
        load_run_config("encoder", None, [f"model.text_tokenizer={world / 'text'}", "model.text_heads=5"])
    config = load_run_config("encoder", None, [f"model.text_tokenizer={world / 'text'}", "model.patch_size=30"])
    with pytest.raises(LaVITError, match="patch_size"):
        build_stage(config, World.init())


if __name__ == "__main__":
    world_dir, out_dir, steps = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    kill = int(sys.argv[4]) if len(sys.argv) > 4 else None
    trained, _ = run_stage("encoder", encoder_overrides(world_dir, out_dir, steps), kill)
    print(json.dumps(checksum(trained)))
