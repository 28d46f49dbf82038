"""Stage 3, `lavit train pixel`: the weighting, dropout and EMA maths on hand examples, the
loss falls on a tiny task, a SIGKILLed run resumes bit-identically (EMA included), and the
export loads with `lavit_mlx.load` and reconstructs at the model's own defaults.

Run as a script, it trains a tiny pixel stage and prints checksums of the result:
    python test_stage_pixel.py DATA VAE OUT STEPS [KILL_AT]
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import lavit_mlx  # noqa: E402,F401  (the fast BLAS before mlx)
import mlx.core as mx  # noqa: E402

from lavit_mlx.training.stages.pixel import (EMASection, PixelStage, drop_conditioning, ema_decay,  # noqa: E402
                                             min_snr_weights)

IMAGE_SIZE = 32  # pictures resized; the dev tokenizer still sees them at 224


def tiny_overrides(data: Path, vae: Path, out: Path, steps: int, **extra) -> list:
    values = {
        "out": str(out), "data.train": str(data / "manifest.jsonl"), "data.image_size": IMAGE_SIZE,
        "model.vae": str(vae), "model.max_images": 12,
        "model.unet": {"block_out_channels": [16, 32], "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
                       "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "attention_head_dim": [1, 2],
                       "norm_num_groups": 8, "addition_time_embed_dim": 8},
        "model.dev_tokenizer": {"width": 32, "codebook_size": 64, "decoder_width": 32, "decoder_depth": 1,
                                "num_heads": 2, "context_dims": [16, 16], "pooled_dim": 16},
        "model.defaults": {"steps": 2, "guidance": 2.0}, "model.train_decoder": "all",
        "train.steps": steps, "train.batch_size": 4, "train.learning_rate": 2e-3, "train.warmup_steps": 0,
        "train.log_every": 1, "train.save_every": 3, "loss.eval_images": 2,
    }
    values.update(extra)
    return [f"{k}={json.dumps(v)}" for k, v in values.items()]


def make_vae(folder: Path) -> Path:
    """A random factor-4 VAE written as the VAE stage exports it."""
    from lavit_mlx.models.vae import AutoencoderKL, VAEConfig
    from lavit_mlx.training.stages.vae import DDIM_CONFIG, VAEModel, initialise, write_pixel_part

    mx.random.seed(3)
    config = VAEModel(channels=[8, 8, 8], norm_num_groups=4).vae_config()
    vae = AutoencoderKL(VAEConfig.from_dict(config))
    initialise(vae)
    return write_pixel_part(folder, "highres_pixel", vae, config, dict(DDIM_CONFIG))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from lavit_mlx.shapes import write_manifest

    root = tmp_path_factory.mktemp("pixel")
    write_manifest(root / "data", seed=0, n=12, kinds=["caption"])
    return root / "data", make_vae(root / "vae")


# ----------------------------------------------------------------------------- maths on hand examples
def test_min_snr_weights():
    snr = mx.array([0.5, 5.0, 20.0])
    eps = min_snr_weights(snr, 5.0, "epsilon").tolist()
    v = min_snr_weights(snr, 5.0, "v_prediction").tolist()
    assert np.allclose(eps, [1.0, 1.0, 0.25])  # min(snr, 5) / snr
    assert np.allclose(v, [0.5 / 1.5, 5 / 6, 5 / 21])  # min(snr, 5) / (snr + 1)
    assert min_snr_weights(snr, 0.0, "epsilon").tolist() == [1.0, 1.0, 1.0]  # off


def test_conditioning_dropout_zeroes_exactly_the_dropped_samples():
    context = mx.arange(2 * 3 * 4, dtype=mx.float32).reshape(2, 3, 4) + 1
    pooled = mx.array([[1.0, 2.0], [3.0, 4.0]])
    keep = mx.array([True, False])
    dropped_context, dropped_pooled = drop_conditioning(keep, context, pooled)
    assert np.array_equal(np.array(dropped_context[0]), np.array(context[0]))
    assert not np.any(np.array(dropped_context[1])) and dropped_pooled.tolist() == [[1.0, 2.0], [0.0, 0.0]]
    only_context, none = drop_conditioning(mx.array([False, True]), context)  # low-res: no pooled
    assert none is None and not np.any(np.array(only_context[0]))


def test_ema_decay_schedule_is_diffusers():
    warm = EMASection(decay=0.999, use_warmup=True, power=2 / 3)
    values = [float(ema_decay(step, warm)) for step in (1, 2, 11, 10**7)]
    assert values[0] == 0.0  # the first update copies the weights
    assert np.isclose(values[1], 1 - 2 ** (-2 / 3), atol=1e-6)
    assert np.isclose(values[2], 1 - 11 ** (-2 / 3), atol=1e-6)
    assert np.isclose(values[3], 0.999)  # capped at decay
    plain = EMASection(decay=0.9, use_warmup=False)
    assert np.isclose(float(ema_decay(5, plain)), 5 / 14)  # (1 + s) / (10 + s), s = 4
    assert np.isclose(float(ema_decay(10**6, plain)), 0.9)
    late = EMASection(update_after_step=5, use_warmup=False, min_decay=0.5)
    assert [float(ema_decay(s, late)) for s in (5, 6)] == [0.0, 0.0] and float(ema_decay(7, late)) == 0.5


def test_ema_update_moves_the_shadow_by_one_minus_decay():
    stage = SimpleNamespace(state={"ema": {"w": mx.array([1.0, 1.0])}, "ema_step": mx.array(1)},
                            config=SimpleNamespace(model=SimpleNamespace(ema=EMASection(use_warmup=False))))
    model = SimpleNamespace(trainable_parameters=lambda: {"w": mx.array([3.0, -1.0])})
    PixelStage.update(stage, model, {})  # step 2: decay (1 + 1) / (10 + 1) = 2/11
    assert int(stage.state["ema_step"]) == 2
    assert np.allclose(stage.state["ema"]["w"].tolist(), [1 - 9 / 11 * (1 - 3), 1 - 9 / 11 * (1 + 1)])


# ----------------------------------------------------------------------------- training
def log_of(out: Path) -> list:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_loss_falls_and_the_export_reconstructs(world, tmp_path):
    from lavit_mlx.generation import GenerationSettings, reconstruct_stages, run_stages
    from lavit_mlx.training import run

    data, vae = world
    out = tmp_path / "run"
    last = run("pixel", None, tiny_overrides(data, vae, out, 40, **{"train.save_every": 0}), resume=False)
    losses = [r["mse"] for r in log_of(out) if "mse" in r]
    assert np.mean(losses[-8:]) < 0.7 * np.mean(losses[:4])
    assert 0 <= last["eval_reconstruction_colour_and_cell"] <= 1 and last["eval_seconds_per_image"] > 0

    model = lavit_mlx.load(out / "model")
    assert model.config.highres_pixel.defaults == {"height": IMAGE_SIZE, "width": IMAGE_SIZE, "steps": 2,
                                                   "guidance": 2.0}
    assert model.config.highres_pixel.scheduler["prediction_type"] == "epsilon"
    done = run_stages(reconstruct_stages(model, str(data / "images" / "000000.png"), GenerationSettings(seed=1)))
    assert done.images[0].shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
    assert (done.settings.height, done.settings.steps, done.settings.guidance) == (IMAGE_SIZE, 2, 2.0)
    # the exported UNet is the EMA of the trained one
    from mlx.utils import tree_flatten

    exported = dict(tree_flatten(model.pixel_decoder().unet.parameters()))
    saved = mx.load(str(sorted((out / "checkpoints").iterdir())[-1] / "stage.safetensors"))
    trained = mx.load(str(sorted((out / "checkpoints").iterdir())[-1] / "parameters.safetensors"))
    assert np.array_equal(np.array(exported["conv_in.weight"]), np.array(saved["ema.unet/conv_in/weight"]))
    assert not np.array_equal(np.array(exported["conv_in.weight"]), np.array(trained["unet.conv_in.weight"]))


def test_spatial_map_lays_each_patch_over_the_latent_pixels_it_covers():
    from lavit_mlx.errors import LaVITError
    from lavit_mlx.pixel_decoder import spatial_map

    context = mx.array(np.arange(2 * 4 * 3, dtype=np.float32).reshape(2, 4, 3))  # 2 x 2 patches, width 3
    laid = np.array(spatial_map(context, 4, 6))
    assert laid.shape == (2, 3, 4, 6)
    patch = (np.arange(4)[:, None] // 2) * 2 + np.arange(6)[None, :] // 3  # the patch under each pixel
    assert np.array_equal(laid, np.array(context)[:, patch.reshape(-1)].reshape(2, 4, 6, 3).transpose(0, 3, 1, 2))
    uneven = np.array(spatial_map(mx.array(np.arange(64, dtype=np.float32).reshape(1, 64, 1)), 28, 28))[0, 0]
    assert uneven[0, 0] == uneven[2, 2] == 0 and uneven[3, 3] == uneven[4, 4] == 9 and uneven[27, 27] == 63
    with pytest.raises(LaVITError, match="square grid"):
        spatial_map(mx.zeros((1, 5, 2)), 4, 4)


def test_a_spatial_context_unet_trains_exports_and_sees_where_each_patch_is(world, tmp_path):
    from lavit_mlx.errors import LaVITError
    from lavit_mlx.pixel_decoder import SPATIAL_CONTEXT, PixelDecoder, spatial_map
    from lavit_mlx.training import run

    data, vae = world
    out = tmp_path / "run"
    run("pixel", None, tiny_overrides(data, vae, out, 12, **{"train.save_every": 0, "model.spatial_context": True}),
        resume=False)
    losses = [r["mse"] for r in log_of(out) if "mse" in r]
    assert np.mean(losses[-4:]) < np.mean(losses[:4])
    model = lavit_mlx.load(out / "model")
    assert model.config.highres_pixel.unet[SPATIAL_CONTEXT] is True
    decoder = model.pixel_decoder()
    assert decoder.spatial_context and decoder.latent_channels == 4
    assert decoder.unet.config.in_channels == 4 + 32  # latents + the context's width (16 + 16)

    # Cross-attention alone cannot tell where a token came from; the map can.
    rng = np.random.default_rng(0)
    context = mx.array(rng.normal(size=(1, 64, 32)).astype(np.float32))
    shuffled = context[:, mx.array(rng.permutation(64))]
    pooled = mx.array(rng.normal(size=(1, 16)).astype(np.float32))
    ids = mx.array([[32.0, 32, 0, 0, 32, 32]])
    x = mx.array(rng.normal(size=(1, 4, 8, 8)).astype(np.float32))

    def noise(ctx, spatial):
        prepared = decoder.unet.prepare_context(ctx)
        return np.array(decoder.unet_forward(x, mx.array([500]), prepared, pooled, ids, spatial=spatial))

    blank = mx.zeros((1, 32, 8, 8))
    assert np.allclose(noise(context, blank), noise(shuffled, blank), atol=1e-5)
    assert not np.allclose(noise(context, spatial_map(context, 8, 8)), noise(shuffled, spatial_map(shuffled, 8, 8)),
                           atol=1e-4)
    fake = SimpleNamespace(config=SimpleNamespace(out_channels=4, in_channels=4, context_dims=[32]))
    with pytest.raises(LaVITError, match=r"4 latent \+ 32 context channels, not 4"):
        PixelDecoder(fake, decoder.vae, {}, highres=True, spatial_context=True)


def run_script(data, vae, out, steps, kill_at=None):
    cmd = [sys.executable, __file__, str(data), str(vae), str(out), str(steps), "-" if kill_at is None else str(kill_at)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900)


def result(proc) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_sigkill_then_resume_is_bit_identical_with_the_ema(world, tmp_path):
    data, vae = world
    straight = result(run_script(data, vae, tmp_path / "a", 8))
    killed = run_script(data, vae, tmp_path / "b", 8, kill_at=5)  # killed fetching step 6's batch
    assert killed.returncode == -signal.SIGKILL
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["step-00000003"]
    resumed = result(run_script(data, vae, tmp_path / "b", 8))
    assert resumed == straight
    steps = [r["step"] for r in log_of(tmp_path / "b") if "split" not in r]
    assert steps == list(range(1, 9))


def checksum(arrays: dict) -> str:
    digest = hashlib.sha256()
    for key in sorted(arrays):
        digest.update(key.encode() + np.array(arrays[key]).tobytes())
    return digest.hexdigest()


if __name__ == "__main__":
    from lavit_mlx.training.config import load_run_config
    from lavit_mlx.training.loop import World, train

    data_dir, vae_dir, out_dir, total = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
    kill_at = None if sys.argv[5] == "-" else int(sys.argv[5])
    original = PixelStage.batches

    def batches(self):
        for index, batch in enumerate(original(self)):
            if index == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            yield batch

    PixelStage.batches = batches
    config = load_run_config("pixel", None, tiny_overrides(data_dir, vae_dir, out_dir, total))
    stage = PixelStage(config, World.init())
    train(stage, config)
    final = out_dir / "checkpoints" / f"step-{total:08d}"  # the trained weights; the export holds the EMA
    print(json.dumps({"weights": checksum(mx.load(str(final / "parameters.safetensors"))),
                      "ema": checksum(mx.load(str(final / "stage.safetensors"))),
                      "optimizer": checksum(mx.load(str(final / "optimizer.safetensors"))), "drawn": stage.drawn,
                      "export": checksum(mx.load(str(out_dir / "model" / "highres_pixel_decoding" / "unet"
                                                     / "diffusion_mlx_model.safetensors")))}))
