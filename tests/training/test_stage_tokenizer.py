"""The tokenizer stage: the loss falls on a tiny shapes world, a SIGKILLed run resumes
bit-identically, the norm-EMA step is right on a hand example, two data-parallel ranks keep
one codebook, training's in-place decoding equals inference's compacted one, and the
exported folder loads and tokenizes.

Run as a script it trains a tiny tokenizer over a random tiny EVA:
    python test_stage_tokenizer.py run WORLD ENCODER OUT STEPS [KILL_AT_BATCH]   (prints a checksum)
    python test_stage_tokenizer.py dp WORLD ENCODER OUT STEPS   (under mlx.launch; writes each rank's codebook)
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_stage_encoder import (IMAGE_SIZE, checksum, data_overrides, log_of, make_world,  # noqa: E402
                                run_script, run_stage)

import mlx.core as mx  # noqa: E402

import lavit_mlx  # noqa: E402
from lavit_mlx.config import EVAConfig, LaVITConfig, TokenIds, VQDecoderConfig  # noqa: E402
from lavit_mlx.errors import LaVITError  # noqa: E402
from lavit_mlx.training import load_run_config  # noqa: E402
from lavit_mlx.training.stages.tokenizer import (kept_positions, norm_ema_update, patch_weights, whitening,  # noqa: E402
                                                 pca_projection, perplexity, spherical_kmeans)

SCRIPT = Path(__file__)
LAUNCH = Path(sys.executable).parent / "mlx.launch"


def make_encoder(folder: Path, seed: int = 0) -> Path:
    """A random tiny EVA in an MLX folder (what the encoder stage exports)."""
    from lavit_mlx.export import save_components
    from lavit_mlx.models.eva_vit import EVAVisionTransformer
    from lavit_mlx.training.stages.encoder import init_vision_transformer

    mx.random.seed(seed)
    config = EVAConfig(width=32, depth=1, num_heads=2, mlp_dim=64, patch_size=28, image_size=IMAGE_SIZE,
                       head_dim_out=16)
    eva = EVAVisionTransformer(config)
    init_vision_transformer(eva)
    return save_components(folder, LaVITConfig(vision=config, token_ids=TokenIds(num_text=256)), {"eva": eva})


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shapes")
    make_world(folder)
    make_encoder(folder / "encoder")
    return folder


def tokenizer_overrides(world: Path, encoder: Path, out: Path, steps: int, **extra) -> list:
    settings = {"out": out, "model.init": encoder, "model.merger_depth": 1, "model.num_heads": 2,
                "model.codebook_size": 64, "model.code_dim": 8, "model.highres_decoder.width": 32,
                "model.highres_decoder.depth": 1, "model.highres_decoder.num_heads": 2,
                "model.highres_decoder.context_dims": "[16, 24]", "model.highres_decoder.pooled_dim": 8,
                "train.steps": steps, "train.batch_size": 8, "train.learning_rate": 3e-3, "train.warmup_steps": 2,
                "train.log_every": 1, "train.save_every": 5, "train.eval_batches": 2, "loss.init_batches": 2,
                "loss.dead_after": 3, **extra}
    return [f"{k}={v}" for k, v in settings.items()] + data_overrides(world)


def test_norm_ema_update_by_hand():
    codebook = mx.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    # code 0 was chosen by (0.6, 0.8) and (0, 1): their sum (0.6, 1.8); code 1 by (1, 0); code 2 by nothing
    counts = mx.array([2.0, 1.0, 0.0])
    sums = mx.array([[0.6, 1.8], [1.0, 0.0], [0.0, 0.0]])
    updated = np.array(norm_ema_update(codebook, counts, sums, decay=0.5))
    centroid = np.array([0.6, 1.8]) / np.hypot(0.6, 1.8)  # the normalised mean
    moved = 0.5 * np.array([1.0, 0.0]) + 0.5 * centroid
    assert np.allclose(updated[0], moved / np.linalg.norm(moved), atol=1e-6)
    assert np.allclose(updated[1], [np.sqrt(0.5), np.sqrt(0.5)], atol=1e-6)  # halfway between (0, 1) and (1, 0)
    assert np.array_equal(updated[2], np.array(codebook)[2])  # unused: unchanged
    assert float(perplexity(counts)) == pytest.approx(np.exp(-(2 / 3 * np.log(2 / 3) + 1 / 3 * np.log(1 / 3))))


def test_spherical_kmeans_finds_the_clusters():
    rng = np.random.default_rng(0)
    centres = np.eye(4, dtype=np.float32)
    points = centres[rng.integers(0, 4, 400)] + 0.05 * rng.standard_normal((400, 4)).astype(np.float32)
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    found = np.array(spherical_kmeans(mx.array(points), 4, 10, mx.random.key(1)))
    assert np.allclose(np.sort(np.abs(found @ centres.T).max(axis=0)), 1.0, atol=0.01)


def test_in_place_decoding_equals_the_compacted_sequence():
    from lavit_mlx.models.vq_decoder import VQDecoder
    from lavit_mlx.training.stages.tokenizer import init_decoder

    mx.random.seed(3)
    decoder = VQDecoder(VQDecoderConfig(highres=True, width=32, depth=2, num_heads=2, mlp_dim=64, code_dim=8,
                                        num_patches=16, feature_dim=32, context_dims=(16, 24), pooled_dim=8))
    init_decoder(decoder)
    codes = mx.random.normal((2, 16, 8))
    kept = mx.array((np.random.default_rng(0).random((2, 16)) < 0.4).astype(np.float32))
    in_place = decoder.decode_features(codes, kept, kept_positions(kept))
    keep = np.array(kept) > 0
    rows = [codes[i][mx.array(np.flatnonzero(keep[i]))] for i in range(2)]
    prompt, pooled = decoder(rows)  # inference: compacted, positions 0..T-1, padded to the longest
    expected_prompt, expected_pooled = decoder.unet_condition(in_place)
    assert mx.allclose(prompt, expected_prompt, atol=1e-5) and mx.allclose(pooled, expected_pooled, atol=1e-5)
    # training's straight-through key weights give the same forward (the merger's rule: eps 1e-6)
    soft = decoder.decode_features(codes, kept, kept_positions(kept), policy=kept)
    assert mx.allclose(soft, in_place, atol=1e-4)


def test_loss_falls_and_the_export_tokenizes(world, tmp_path):
    # Uncentred targets: the toy decoder learns the shared feature component within the test's
    # budget, where the centred ones (the default) take ~150 steps before the decoder reads
    # the codes (the bundled model's build trains the centred stage: reconstruction 0.27).
    out = tmp_path / "tokenizer"
    stage, last = run_stage("tokenizer", tokenizer_overrides(world, world / "encoder", out, 40, **{"loss.center_features": "false"}))
    log = [r for r in log_of(out) if "split" not in r]
    assert sum(r["highres_reconstruction"] for r in log[-3:]) < 0.5 * sum(r["highres_reconstruction"] for r in log[:3])
    assert {"keep_ratio_loss", "commitment", "keep_fraction", "tokens_per_image", "perplexity", "dead_codes",
            "eval_keep_fraction", "eval_tokens_per_image", "eval_codes_used",
            "eval_highres_reconstruction"} <= set(last)
    assert abs(last["keep_fraction"] - 1 / 3) < 0.15
    # inference's deterministic rule keeps tokens too (not only training's sampled masks)
    assert last["eval_tokens_per_image"] > 0 and last["eval_keep_fraction"] > 0
    assert abs(last["eval_keep_fraction"] - 1 / 3) < 0.1  # the calibrated threshold keeps ~rho
    model = lavit_mlx.load(out / "model")
    assert model.config.vision.width == 32 and model.config.tokenizer.codebook_size == 64
    assert model.config.token_ids.codebook_size == 64 and model.config.highres_decoder.context_dims == (16, 24)
    images = sorted((world / "eval" / "images").glob("*.png"))[:3]
    tokens = model.tokenize(images)
    assert all(0 < t.num_tokens <= 16 and t.codes.max() < 64 for t in tokens)
    # the exported tokenizer is the trained one: the same codes from the stage's own modules
    features = stage.model.eva(mx.array(np.stack([_pixels(p) for p in images])))[:, 1:]
    stage.model.tokenizer.eval()
    ours = stage.model.tokenizer.tokenize(features)
    assert all(np.array_equal(a.codes, b) for a, b in zip(tokens, ours.codes))
    prompt, pooled = model.decode_codes([t.codes for t in tokens])
    assert prompt.shape == (3, 16, 40) and pooled.shape == (3, 8)


def _pixels(path):
    from lavit_mlx.image_processing import load_image, preprocess

    return preprocess([load_image(path)], IMAGE_SIZE)[0]


def test_patch_weights_by_hand():
    target = mx.array([[[3.0, 4.0], [0.0, 1.0], [0.0, 0.0], [0.0, 0.0]],
                       [[1.0, 0.0], [1.0, 0.0], [0.0, 2.0], [0.0, 0.0]]])
    assert np.array_equal(np.array(patch_weights(target, "uniform")), np.ones((2, 4)))
    # lengths (5, 1, 0, 0) and (1, 1, 2, 0), each image's divided by its mean
    expected = np.array([[5, 1, 0, 0], [1, 1, 2, 0]], np.float32) / np.array([[1.5], [1.0]], np.float32)
    assert np.allclose(np.array(patch_weights(target, "norm")), expected, rtol=1e-6)


def test_norm_patch_weights_train(world, tmp_path):
    _, last = run_stage("tokenizer", tokenizer_overrides(world, world / "encoder", tmp_path / "norm", 6,
                                                         **{"loss.patch_weights": "norm"}))
    assert np.isfinite(last["loss"]) and np.isfinite(last["eval_highres_reconstruction"])


def test_pca_projection_by_hand():
    rng = np.random.default_rng(0)
    # points in a 2-dimensional subspace of 5 dimensions, spread 3 along one axis and 1 along the other
    basis = np.linalg.qr(rng.normal(size=(5, 5)))[0][:, :2]
    coords = rng.normal(size=(400, 2)) * np.array([3.0, 1.0])
    points = coords @ basis.T + 7.0
    w1, b1, w2, b2 = pca_projection(points, 2)
    assert w1.shape == (5, 5) and w2.shape == (2, 5) and b2.shape == (2,) and w1.dtype == np.float32
    projected = points @ w1.T + b1  # principal components, scaled by the first's standard deviation
    assert np.allclose(projected.mean(axis=0), 0.0, atol=1e-4)
    assert np.allclose(projected.std(axis=0)[:2], [1.0, coords[:, 1].std() / coords[:, 0].std()], rtol=0.05)
    assert np.allclose(projected[:, 2:], 0.0, atol=1e-4)  # nothing outside the subspace
    assert abs(np.corrcoef(projected[:, 0], coords[:, 0])[0, 1]) > 0.99  # the first is the widest direction
    assert abs(np.corrcoef(projected[:, 1], coords[:, 1])[0, 1]) > 0.99
    assert np.array_equal(pca_projection(points, 2)[0], w1)  # deterministic, signs included
    assert np.array_equal(w2[:, :2], np.eye(2)) and not w2[:, 2:].any()
    with pytest.raises(LaVITError, match="fewer than 2"):
        pca_projection(points[:1], 2)


def test_requantization_keeps_frozen_parts(world, tmp_path):
    """A second tokenizer run from the first's export with selector, merger and projection frozen
    (the shapes build's quantizer step): those stay bit-equal to the export, the projection gives
    the kept merger outputs' principal components, the codebook and the decoder train."""
    from mlx.utils import tree_flatten

    first = tmp_path / "first"
    run_stage("tokenizer", tokenizer_overrides(world, world / "encoder", first, 6))
    overrides = tokenizer_overrides(world, first / "model", tmp_path / "second", 6, **{
        "model.tokenizer_init": first / "model", "model.frozen": "[selector, merger, projection]",
        "loss.projection_init": "pca", "loss.kmeans_on": "kept", "loss.center_features": "false",
        "loss.calibrate_threshold": "false"})
    _, last = run_stage("tokenizer", overrides)
    assert np.isfinite(last["loss"])
    before = lavit_mlx.load(first / "model", components=["tokenizer", "highres_decoder"])
    after = lavit_mlx.load(tmp_path / "second" / "model", components=["tokenizer", "highres_decoder"])
    assert after.config.tokenizer.keep_threshold == before.config.tokenizer.keep_threshold
    old = dict(tree_flatten(before.tokenizer.parameters()))
    new = dict(tree_flatten(after.tokenizer.parameters()))
    for key in old:
        same = np.array_equal(np.array(old[key]), np.array(new[key]))
        if key.startswith(("token_predictor.", "causal_encoder.")):
            assert same, key
        elif key.startswith(("encode_task_layer.", "quantize.")):
            assert not same, key  # re-fitted (then frozen) / k-means'd and moved by the EMA
    w2 = np.array(new["encode_task_layer.2.weight"])
    assert np.array_equal(w2[:, :w2.shape[0]], np.eye(w2.shape[0]))  # the PCA projection, left frozen
    old_decoder = dict(tree_flatten(before.highres_decoder.parameters()))
    new_decoder = dict(tree_flatten(after.highres_decoder.parameters()))
    assert not np.array_equal(np.array(old_decoder["decode_task_layer.0.weight"]),
                              np.array(new_decoder["decode_task_layer.0.weight"]))
    assert np.array_equal(np.array(old_decoder["unet_proj_1.weight"]), np.array(new_decoder["unet_proj_1.weight"]))


def test_whitening_by_hand():
    rng = np.random.default_rng(1)
    # 6-dimensional features, one direction 100 times wider than another, one of no variance
    mixing = np.linalg.qr(rng.normal(size=(6, 6)))[0]
    points = (rng.normal(size=(3000, 6)) * np.array([100.0, 10.0, 5.0, 3.0, 2.0, 0.0])) @ mixing + 5.0
    mean, matrix = whitening(points)
    assert mean.shape == (6,) and matrix.shape == (6, 6) and matrix.dtype == np.float32
    white = (points - mean) @ matrix
    covariance = np.cov(white, rowvar=False)
    values = np.sort(np.linalg.eigvalsh(covariance))
    assert np.allclose(values[1:], 1.0, atol=1e-3)  # unit variance along every direction that has some
    assert values[0] < 1e-6  # the direction of no variance is not blown up (its eigenvalue is floored)
    assert np.abs(white).max() < 10


def test_decoder_only_run_in_whitened_space(world, tmp_path):
    """`model.frozen: [selector, merger, projection, codebook]` + `loss.target_space: whitened`: a
    run that retrains only the VQ decoder against PCA-whitened targets; the whole tokenizer
    (codebook included: no EMA, no restarts) stays bit-equal, so the codes an LLM was trained
    on do not change, and the decoder trains."""
    from mlx.utils import tree_flatten

    first = tmp_path / "first"
    run_stage("tokenizer", tokenizer_overrides(world, world / "encoder", first, 6))
    overrides = tokenizer_overrides(world, first / "model", tmp_path / "second", 6, **{
        "model.tokenizer_init": first / "model", "model.frozen": "[selector, merger, projection, codebook]",
        "loss.target_space": "whitened", "loss.kmeans_iters": "0", "loss.center_features": "false",
        "loss.calibrate_threshold": "false", "loss.init_batches": "2"})
    stage, last = run_stage("tokenizer", overrides)
    assert np.isfinite(last["loss"]) and 0 < last["eval_highres_reconstruction"] < 2
    matrix = np.array(stage.state["whiten"])
    assert not np.allclose(matrix, np.eye(matrix.shape[0]))  # set from the init batches
    before = lavit_mlx.load(first / "model", components=["tokenizer", "highres_decoder"])
    after = lavit_mlx.load(tmp_path / "second" / "model", components=["tokenizer", "highres_decoder"])
    old, new = dict(tree_flatten(before.tokenizer.parameters())), dict(tree_flatten(after.tokenizer.parameters()))
    assert all(np.array_equal(np.array(old[k]), np.array(new[k])) for k in old)
    old_decoder = dict(tree_flatten(before.highres_decoder.parameters()))
    new_decoder = dict(tree_flatten(after.highres_decoder.parameters()))
    assert not np.array_equal(np.array(old_decoder["decode_task_layer.0.weight"]),
                              np.array(new_decoder["decode_task_layer.0.weight"]))


def test_requantization_rejects_a_mismatched_tokenizer(world, tmp_path):
    first = tmp_path / "first"
    run_stage("tokenizer", tokenizer_overrides(world, world / "encoder", first, 2))
    overrides = tokenizer_overrides(world, first / "model", tmp_path / "second", 2, **{
        "model.tokenizer_init": first / "model", "model.codebook_size": 32})
    with pytest.raises(LaVITError, match="codebook_size 64"):
        run_stage("tokenizer", overrides)
    with pytest.raises(LaVITError, match="no such folder"):
        run_stage("tokenizer", tokenizer_overrides(world, first / "model", tmp_path / "third", 2,
                                                   **{"model.tokenizer_init": tmp_path / "nowhere"}))
    with pytest.raises(LaVITError, match="holds no tokenizer"):
        run_stage("tokenizer", tokenizer_overrides(world, first / "model", tmp_path / "fourth", 2,
                                                   **{"model.tokenizer_init": world / "encoder"}))


def test_gradient_codebook_mode_trains(world, tmp_path):
    out = tmp_path / "gradient"
    _, last = run_stage("tokenizer", tokenizer_overrides(world, world / "encoder", out, 6,
                                                         **{"loss.codebook": "gradient"}))
    assert "codebook" in last and np.isfinite(last["loss"])


def test_sigkill_then_resume_is_bit_identical(world, tmp_path):
    encoder = world / "encoder"
    straight = run_script(SCRIPT, "run", world, encoder, tmp_path / "a", 12)
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = run_script(SCRIPT, "run", world, encoder, tmp_path / "b", 12, 8)
    assert killed.returncode == -9
    resumed = run_script(SCRIPT, "run", world, encoder, tmp_path / "b", 12)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads(resumed.stdout.splitlines()[-1]) == json.loads(straight.stdout.splitlines()[-1])


@pytest.mark.skipif(not LAUNCH.exists() and shutil.which("mlx.launch") is None, reason="mlx.launch not installed")
def test_two_ranks_keep_one_codebook(world, tmp_path):
    launch = str(LAUNCH) if LAUNCH.exists() else shutil.which("mlx.launch")
    out = tmp_path / "dp"
    proc = subprocess.run([launch, "-n", "2", "--backend", "ring", "--", sys.executable, str(SCRIPT), "dp", str(world),
                           str(world / "encoder"), str(out), "8"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, second = (np.load(out / f"rank-{r}.npz") for r in (0, 1))
    assert not np.array_equal(first["batches"], second["batches"])  # the ranks tokenized different images
    assert not np.array_equal(first["codebook"], first["initial"])  # the codebook moved
    assert np.array_equal(first["codebook"], second["codebook"])
    assert np.array_equal(first["idle"], second["idle"])


def test_bad_configs_are_one_line_errors(world):
    encoder = world / "encoder"
    for override, message in (("loss.codebook=kmeans", "loss.codebook"), ("model.decoders=[big]", "model.decoders"),
                              ("loss.keep_ratio=0", "keep_ratio"), ("loss.patch_weights=area", "loss.patch_weights"),
                              ("loss.projection_init=svd", "loss.projection_init"),
                              ("loss.kmeans_on=some", "loss.kmeans_on"),
                              ("loss.target_space=pca", "loss.target_space"),
                              ("loss.target_space=whitened loss.init_batches=0", "needs loss.init_batches"),
                              ("model.frozen=[selector]", "model.tokenizer_init"),
                              ("model.frozen=[decoder]", "model.frozen"),
                              ("model.highres_decoder.context_dims=[16]", "context_dims")):
        with pytest.raises(LaVITError, match=message):
            load_run_config("tokenizer", None, [f"model.init={encoder}", *override.split()])
    with pytest.raises(LaVITError, match="model.init"):
        load_run_config("tokenizer", None, [])


def _data_parallel(world: Path, encoder: Path, out: Path, steps: int) -> None:
    from lavit_mlx.training.loop import World, train
    from lavit_mlx.training.stages import build_stage

    config = load_run_config("tokenizer", None, tokenizer_overrides(world, encoder, out, steps))
    group = World.init()
    stage = build_stage(config, group)
    seen = []
    batches = stage.batches

    def recording():
        for batch in batches():
            if not seen:
                seen.append(np.array(stage.model.tokenizer.quantize.embedding.weight))  # after k-means
            seen.append(np.array(batch["pixels"]).mean(axis=(1, 2, 3)))
            yield batch

    stage.batches = recording
    train(stage, config)
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / f"rank-{group.rank}.npz", codebook=np.array(stage.model.tokenizer.quantize.embedding.weight),
             initial=seen[0], batches=np.stack(seen[1:]), idle=np.array(stage.state["idle"]))


if __name__ == "__main__":
    mode, world_dir, encoder_dir, out_dir, steps = sys.argv[1], *map(Path, sys.argv[2:5]), int(sys.argv[5])
    if mode == "dp":
        _data_parallel(world_dir, encoder_dir, out_dir, steps)
    else:
        kill = int(sys.argv[6]) if len(sys.argv) > 6 else None
        trained, _ = run_stage("tokenizer", tokenizer_overrides(world_dir, encoder_dir, out_dir, steps), kill)
        print(json.dumps(checksum(trained)))
