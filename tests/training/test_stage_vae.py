"""`lavit train vae`: the training convolutions compute what the inference ones do, the loss
falls on a tiny task, the export is a loadable VAE with its scaling factor, and a SIGKILLed
run resumes bit-identically (crops included).

Run as a script, it trains a tiny VAE and prints checksums of the last checkpoint:
    python test_stage_vae.py DATA OUT STEPS [KILL_AT]
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

from lavit_mlx import ops  # noqa: E402
from lavit_mlx.training.stages.vae import (DDIM_CONFIG, VAEStage, for_training, load_trained_vae,  # noqa: E402
                                           unfold_conv2d, unfold_upsample2x_conv3x3)


def tiny_overrides(data: Path, out: Path, steps: int, **extra) -> list:
    values = {
        "out": str(out), "data.train": str(data / "manifest.jsonl"), "data.image_size": 64,
        "model.channels": [8, 16], "model.norm_num_groups": 4, "loss.crop_size": 32, "loss.eval_images": 4,
        "train.steps": steps, "train.batch_size": 4, "train.learning_rate": 3e-3, "train.warmup_steps": 0,
        "train.log_every": 1, "train.save_every": 3,
    }
    values.update(extra)
    return [f"{k}={json.dumps(v)}" for k, v in values.items()]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from lavit_mlx.shapes import write_manifest

    root = tmp_path_factory.mktemp("vae")
    write_manifest(root / "data", seed=0, n=8, kinds=["caption"])
    return root / "data"


@pytest.mark.parametrize("stride, padding, kernel, channels", [(1, 1, 3, (5, 7)), (2, 0, 3, (8, 8)),
                                                               (1, 0, 1, (6, 3)), (1, 1, 3, (64, 64))])
def test_training_convolutions_compute_the_inference_ones(stride, padding, kernel, channels):
    x = mx.random.normal((2, 13, 11, channels[0]), key=mx.random.key(0))
    weight = mx.random.normal((channels[1], kernel, kernel, channels[0]), key=mx.random.key(1))
    bias = mx.random.normal((channels[1],), key=mx.random.key(2))
    expected = ops.conv2d(x, weight, bias, stride, padding)
    assert np.allclose(np.array(unfold_conv2d(x, weight, bias, stride, padding)), np.array(expected), atol=1e-4)


def test_upsample_conv_and_a_whole_vae_are_unchanged_for_training():
    from lavit_mlx.models.vae import AutoencoderKL, VAEConfig
    from lavit_mlx.training.stages.vae import VAEModel, initialise

    x = mx.random.normal((2, 7, 9, 16), key=mx.random.key(3))
    weight = mx.random.normal((8, 3, 3, 16), key=mx.random.key(4))
    assert np.allclose(np.array(unfold_upsample2x_conv3x3(x, weight, None)),
                       np.array(ops.upsample2x_conv3x3(x, weight, None)), atol=1e-4)
    mx.random.seed(0)
    vae = AutoencoderKL(VAEConfig.from_dict(VAEModel(channels=[8, 16], norm_num_groups=4).vae_config()))
    initialise(vae)
    images = mx.random.uniform(-1, 1, (2, 3, 24, 24), key=mx.random.key(5))
    before = vae.decode(vae.encode(images).mean)
    after = for_training(vae).decode(vae.encode(images).mean)
    assert np.allclose(np.array(before), np.array(after), atol=1e-4)


def log_of(out: Path) -> list:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_loss_falls_and_the_export_is_a_vae_with_its_scaling_factor(data, tmp_path):
    from lavit_mlx.training import run

    out = tmp_path / "run"
    last = run("vae", None, tiny_overrides(data, out, 30, **{"train.save_every": 0}), resume=False)
    losses = [r["loss"] for r in log_of(out) if "split" not in r]
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:3])
    assert last["eval_psnr"] > 12 and 0 <= last["eval_checker_correct"] <= 1

    stored = json.loads((out / "model" / "config.json").read_text())
    assert stored["format"] == "lavit-mlx" and stored["highres_pixel"]["scheduler"] == DDIM_CONFIG
    vae, config = load_trained_vae(out / "model")
    assert config["scaling_factor"] == pytest.approx(1 / last["eval_latent_std"], rel=1e-3)
    assert config["block_out_channels"] == [8, 16] and vae.scale_factor == 2
    images = mx.random.uniform(-1, 1, (1, 3, 16, 16))
    assert vae.decode(vae.encode(images).mean).shape == (1, 3, 16, 16)


def test_the_last_steps_train_on_whole_pictures(data, tmp_path):
    """Crops, then `loss.full_picture_steps` batches of `loss.full_batch_size` whole pictures
    (GroupNorm's statistics over a crop are not a picture's); too many such steps is an error."""
    from lavit_mlx.errors import LaVITError
    from lavit_mlx.training.config import load_run_config
    from lavit_mlx.training.loop import World

    config = load_run_config("vae", None, tiny_overrides(data, tmp_path / "run", 5, **{
        "loss.full_picture_steps": 2, "loss.full_batch_size": 3}))
    batches = iter(VAEStage(config, World()).batches())
    shapes = [next(batches)["images"].shape for _ in range(5)]
    assert shapes == [(4, 3, 32, 32)] * 3 + [(3, 3, 64, 64)] * 2
    too_many = load_run_config("vae", None, tiny_overrides(data, tmp_path / "bad", 5, **{"loss.full_picture_steps": 6}))
    with pytest.raises(LaVITError, match="full_picture_steps 6"):
        VAEStage(too_many, World())


def test_a_decoder_only_run_keeps_the_encoder_and_its_scaling_factor(data, tmp_path):
    """`model.init` + `model.frozen: [encoder]`: the encoder (and quant_conv) come out bit-equal,
    so the latents a UNet was trained on do not change; the decoder trains; the export keeps
    the init's scaling_factor. Freezing without an init, or an unknown part, is an error."""
    from mlx.utils import tree_flatten

    from lavit_mlx.errors import LaVITError
    from lavit_mlx.training import run
    from lavit_mlx.training.config import load_run_config

    first = tmp_path / "first"
    run("vae", None, tiny_overrides(data, first, 4, **{"train.save_every": 0}), resume=False)
    second = tmp_path / "second"
    run("vae", None, tiny_overrides(data, second, 4, **{"train.save_every": 0, "model.init": str(first / "model"),
                                                         "model.frozen": ["encoder"]}), resume=False)
    before, before_config = load_trained_vae(first / "model")
    after, after_config = load_trained_vae(second / "model")
    assert after_config["scaling_factor"] == before_config["scaling_factor"]
    old, new = dict(tree_flatten(before.parameters())), dict(tree_flatten(after.parameters()))
    for key in old:
        same = np.array_equal(np.array(old[key]), np.array(new[key]))
        if key.startswith(("encoder.", "quant_conv.")):
            assert same, key
    assert not all(np.array_equal(np.array(old[k]), np.array(new[k])) for k in old if k.startswith("decoder."))
    for extra, message in (({"model.frozen": ["encoder"]}, "model.init"), ({"model.frozen": ["unet"]}, "model.frozen")):
        with pytest.raises(LaVITError, match=message):
            load_run_config("vae", None, tiny_overrides(data, tmp_path / "bad", 2, **extra))


def run_script(data, out, steps, kill_at=None):
    cmd = [sys.executable, __file__, str(data), str(out), str(steps), "-" if kill_at is None else str(kill_at)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900)


def result(proc) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_sigkill_then_resume_is_bit_identical(data, tmp_path):
    straight = result(run_script(data, tmp_path / "a", 7))
    killed = run_script(data, tmp_path / "b", 7, kill_at=4)  # killed fetching step 5's batch
    assert killed.returncode == -signal.SIGKILL
    resumed = result(run_script(data, tmp_path / "b", 7))
    assert resumed == straight


def checksum(arrays: dict) -> str:
    digest = hashlib.sha256()
    for key in sorted(arrays):
        digest.update(key.encode() + np.array(arrays[key]).tobytes())
    return digest.hexdigest()


if __name__ == "__main__":
    from lavit_mlx.training.config import load_run_config
    from lavit_mlx.training.loop import World, train

    data_dir, out_dir, total = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    kill_at = None if sys.argv[4] == "-" else int(sys.argv[4])
    original = VAEStage.batches

    def batches(self):
        for index, batch in enumerate(original(self)):
            if index == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            yield batch

    VAEStage.batches = batches
    # the last 3 steps on whole pictures: the kill (at step 5's batch) falls in that phase
    config = load_run_config("vae", None, tiny_overrides(data_dir, out_dir, total, **{
        "loss.full_picture_steps": 3, "loss.full_batch_size": 2}))
    stage = VAEStage(config, World.init())
    train(stage, config)
    final = out_dir / "checkpoints" / f"step-{total:08d}"
    print(json.dumps({"weights": checksum(mx.load(str(final / "parameters.safetensors"))),
                      "optimizer": checksum(mx.load(str(final / "optimizer.safetensors"))),
                      "data": json.loads((final / "state.json").read_text())["data"]["batches"]}))
