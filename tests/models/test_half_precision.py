"""float16 and bfloat16 against float32, on official-tiny weights cast to each dtype.

A GPU runs the LLM and the UNets at their stored half precision (`lavit_mlx.loading.compute_dtype`),
and MLX's own operations there; the CPU's float32 kernels never see a half array. Every
transformer component runs under `ops.native_ops()` here, so that the float32 parts that
MLX promotes to (see below) take the GPU's operations too; a half UNet takes them by its
dtype. The float32 references are the fixture's (the official modules' outputs; the
project matches them to 1e-4 in float32) or the project's float32 CPU path.

What runs in half: EVA (pixels and weights cast), the selector, the LLM, the UNets (they
cast their inputs to their weights' dtype). The merger's policy masks are float32 and the
VQ decoders take their code rows in float32, so MLX promotes most of their arithmetic to
float32 with half-rounded weights. The VAE always decodes in float32.
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

import lavit_mlx
from lavit_mlx import ops
from lavit_mlx.models.llm import load_language_model
from lavit_mlx.models.unet import load_unet

DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16}
# max|ours - ref| / max|ref|. Unit roundoff: float16 2^-11 = 4.9e-4, bfloat16 2^-8 = 3.9e-3.
# The transformer components (2-block EVA, selector, merger, VQ decoders, 2-layer LLM)
# stay within ~3 roundoffs (measured float16 <= 1.3e-3, bfloat16 <= 1.2e-2, the LLM); the
# tolerances are 10 and 5 roundoffs.
TOL = {"float16": 5e-3, "bfloat16": 2e-2}
# A UNet stacks ~20 GroupNorm/conv/attention stages: measured 3.1e-3 / 2.6e-2, and diffusers'
# own UNet on the same weights in torch float16 / bfloat16 is 2.1e-3 / 2.4e-2 off its float32.
UNET_TOL = {"float16": 1e-2, "bfloat16": 5e-2}
# The guided loop: g = 7 multiplies the UNet's rounding in (cond - uncond) and the VAE about
# doubles it; measured after 2 to 4 steps <= 7.8e-3 / 7.1e-2 on the latents and 1.5e-2 /
# 1.4e-1 on the decoded image. An overflow, or a VAE run in half, is off by ~1 or NaN.
LOOP_TOL = {"float16": 5e-2, "bfloat16": 2.5e-1}
UNET_FOLDERS = {True: "highres_pixel_decoding", False: "pixel_decoding"}


def as_numpy(x) -> np.ndarray:
    """float64 numpy of an mx (any float dtype, bfloat16 included) or numpy array."""
    if isinstance(x, mx.array):
        x = x.astype(mx.float32)
    return np.asarray(x, np.float64)


def max_rel(ours, ref) -> float:
    ours, ref = as_numpy(ours), as_numpy(ref)
    assert ours.shape == ref.shape
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def may_differ(margin: np.ndarray, scale: float, name: str) -> np.ndarray:
    """Where a discrete decision may legitimately change: its float32 margin is within twice
    the error the tolerance allows on the values it compares (each may be off by TOL * scale)."""
    return np.abs(margin) <= 2 * TOL[name] * scale


@pytest.fixture(params=list(DTYPES))
def dtype_name(request):
    return request.param


@pytest.fixture
def gpu_ops():
    """MLX's own operations also for what the half models promote to float32 (the GPU path)."""
    with ops.native_ops():
        yield


@pytest.fixture(scope="module")
def expected(official_tiny):
    from safetensors.numpy import load_file

    return load_file(str(official_tiny / "expected.safetensors"))


@pytest.fixture(scope="module")
def facts(official_tiny):
    return json.loads((official_tiny / "expected.json").read_text())


def half_model(checkpoint, facts, dtype, *components):
    model = lavit_mlx.load(checkpoint, vision_heads=facts["config"]["heads"])
    for name in components:
        getattr(model, name).set_dtype(dtype)
    return model


# ------------------------------------------------------------------------- vision side
def test_eva_selector_merger_at_half(dtype_name, gpu_ops, official_checkpoint, expected, facts):
    dtype, tol = DTYPES[dtype_name], TOL[dtype_name]
    model = half_model(official_checkpoint, facts, dtype, "eva", "tokenizer", "understanding")
    features = model.eva(mx.array(expected["pixel_values"]).astype(dtype))
    assert features.dtype == dtype
    assert max_rel(features, expected["encoder_features"]) <= tol
    patches = features[:, 1:]
    logprobs = model.tokenizer.token_predictor(patches)
    assert logprobs.dtype == dtype
    assert max_rel(logprobs, expected["selector_logprobs"]) <= tol
    # The fixture's keep mask, so that a legitimately flipped near-tie (below) does not
    # change which tokens are compared.
    keep = mx.array(expected["keep_mask"])
    out = model.tokenizer.tokenize(patches, keep=keep)
    assert max_rel(out.merged, expected["merged_features"]) <= tol
    understanding = model.understanding.tokenize(patches, keep=keep)
    assert max_rel(understanding.visual_embeds[0], expected["understanding_visual_embeds"]) <= tol


def test_keep_mask_at_half_changes_only_at_near_ties(dtype_name, gpu_ops, official_checkpoint, expected, facts):
    """The fixture's closest keep/drop call has a float32 margin of 0.026 in log-probability,
    about float16's error there (0.026) and above bfloat16's spacing (0.004 at 0.69): a
    half-precision keep mask may legitimately differ there. Measured: float16 keeps the same
    256 decisions; bfloat16 flips 12, all at float32 margins <= 0.57."""
    dtype = DTYPES[dtype_name]
    model = half_model(official_checkpoint, facts, dtype, "eva", "tokenizer")
    features = model.eva(mx.array(expected["pixel_values"]).astype(dtype))[:, 1:]
    keep = as_numpy(model.tokenizer.select(model.tokenizer.token_predictor(features)))[0] > 0.5
    reference = expected["selector_logprobs"][0]
    assert np.array_equal(expected["keep_mask"][0] > 0.5, reference[:, 0] > reference[:, 1])
    flipped = keep != (expected["keep_mask"][0] > 0.5)
    allowed = may_differ(reference[:, 0] - reference[:, 1], np.abs(reference).max(), dtype_name)
    assert not (flipped & ~allowed).any(), f"decisions far from a tie flipped: {np.flatnonzero(flipped & ~allowed)}"
    assert allowed.sum() < keep.size  # the check constrains something


def test_codes_at_half_change_only_at_near_ties(dtype_name, gpu_ops, official_checkpoint, expected, facts):
    """The nearest and second-nearest codes of a token are 4.3e-4 apart in squared distance
    (distances ~1..3.4, float16 spacing 2e-3 there): codes legitimately change at half
    precision. Measured: float16 1 of 103, bfloat16 7; each is within 5.5e-3 of the best."""
    dtype = DTYPES[dtype_name]
    model = half_model(official_checkpoint, facts, dtype, "eva", "tokenizer")
    features = model.eva(mx.array(expected["pixel_values"]).astype(dtype))[:, 1:]
    codes = model.tokenizer.tokenize(features, keep=mx.array(expected["keep_mask"])).codes[0]
    reference_codes = np.array(facts["code_ids"])
    assert codes.shape == reference_codes.shape

    # float32 distances of every kept token to every code (the project's float32 path).
    tokenizer = lavit_mlx.load(official_checkpoint, vision_heads=facts["config"]["heads"]).tokenizer
    merged = mx.array(expected["merged_features"][0])
    z = merged[mx.array(np.flatnonzero(expected["keep_mask"][0] > 0.5).astype(np.int32))]
    for layer in tokenizer.encode_task_layer:
        z = layer(z)
    distances = as_numpy(tokenizer.quantize.distances(z))  # (tokens, codebook)
    assert np.array_equal(distances.argmin(axis=-1), reference_codes)
    rows = np.arange(len(codes))
    gap = distances[rows, codes] - distances[rows, reference_codes]
    assert (gap <= 2 * TOL[dtype_name] * np.abs(distances).max()).all(), f"max gap {gap.max()}"


def test_vq_decoders_at_half(dtype_name, gpu_ops, official_checkpoint, expected, facts):
    dtype, tol = DTYPES[dtype_name], TOL[dtype_name]
    model = half_model(official_checkpoint, facts, dtype)
    rows = [model.codebook[mx.array(np.array(facts["code_ids"], np.int32))].astype(dtype)]
    low = model.decoder(highres=False)
    low.set_dtype(dtype)
    assert max_rel(low(rows), expected["lowres_condition"]) <= tol
    high = model.decoder(highres=True)
    high.set_dtype(dtype)
    prompt_embeds, pooled = high(rows)
    assert max_rel(prompt_embeds, expected["highres_prompt_embeds"]) <= tol
    assert max_rel(pooled, expected["highres_pooled"]) <= tol


# ------------------------------------------------------------------------- LLM
def test_llm_logits_at_half(dtype_name, gpu_ops, official_checkpoint, expected):
    dtype, tol = DTYPES[dtype_name], TOL[dtype_name]
    folder = official_checkpoint / "language_model"
    llm = load_language_model(folder, dtype=dtype)
    assert llm.dtype == dtype
    ids = mx.array(expected["llm_generation_input_ids"])
    logits = llm(input_ids=ids)
    assert logits.dtype == mx.float32  # the API's, whatever the weights
    assert max_rel(logits[:, -4:], expected["llm_generation_logits_last4"]) <= tol
    embeds = mx.array(expected["llm_understanding_inputs_embeds"]).astype(dtype)
    assert max_rel(llm(inputs_embeds=embeds)[:, -4:], expected["llm_understanding_logits_last4"]) <= tol

    # Greedy tokens at all 111 positions against the float32 model: a position may change
    # only where float32's top two logits are within the tolerance of each other. Measured:
    # float16 changes none; bfloat16 5, whose float32 gaps are <= 0.009 (logits up to 3.3).
    reference = as_numpy(load_language_model(folder)(input_ids=ids))[0]
    top2 = np.sort(reference, axis=-1)[:, -2:]
    changed = as_numpy(logits)[0].argmax(-1) != reference.argmax(-1)
    allowed = may_differ(top2[:, 1] - top2[:, 0], np.abs(reference).max(), dtype_name)
    assert not (changed & ~allowed).any(), f"clear greedy tokens changed at {np.flatnonzero(changed & ~allowed)}"
    assert allowed.sum() < len(allowed)


# ------------------------------------------------------------------------- UNets and VAE
def unet_inputs(expected, highres: bool, latent_scale: float = 1.0):
    latents = expected["unet_latents"] * latent_scale
    batch = latents.shape[0]
    if highres:
        return (latents, 501, np.repeat(expected["highres_prompt_embeds"], batch, axis=0)), dict(
            text_embeds=np.repeat(expected["highres_pooled"], batch, axis=0), time_ids=expected["highres_time_ids"])
    return (latents, 501, np.repeat(expected["lowres_condition"], batch, axis=0)), dict(
        encoder_attention_mask=expected["lowres_unet_mask"])


@pytest.mark.parametrize("highres", [True, False], ids=["highres", "lowres"])
def test_unet_noise_prediction_at_half(dtype_name, highres, official_checkpoint, expected):
    dtype = DTYPES[dtype_name]
    unet = load_unet(official_checkpoint / UNET_FOLDERS[highres] / "unet", dtype=dtype)
    args, kwargs = unet_inputs(expected, highres)
    out = unet(*args, **kwargs)
    assert out.dtype == dtype  # computed in half, as on a GPU
    assert max_rel(out, expected["highres_unet_out" if highres else "lowres_unet_out"]) <= UNET_TOL[dtype_name]


@pytest.fixture(scope="module")
def float32_runs(official_checkpoint, expected):
    """float32 results (CPU kernels) shared by both dtypes: per decoder, the UNet on latents
    x 1000, and the guided loop's final latents and image."""
    model = lavit_mlx.load(official_checkpoint)
    runs = {}
    for highres in (True, False):
        args, kwargs = unet_inputs(expected, highres, latent_scale=1000.0)
        scaled = load_unet(official_checkpoint / UNET_FOLDERS[highres] / "unet")(*args, **kwargs)
        decoder = model.pixel_decoder(highres)
        latents = guided_latents(decoder, expected, highres)
        runs[highres] = scaled, latents, decoder.vae_decode_raw(latents / decoder.scaling_factor)
    return runs


@pytest.mark.parametrize("highres", [True, False], ids=["highres", "lowres"])
def test_unet_at_half_with_activations_past_256(dtype_name, highres, official_checkpoint, expected, float32_runs):
    """Latents x 1000 drive the activations past 256, where float16 squares overflow: the
    GroupNorm statistics must not (they did: variance inf, every group normalised to 0, and
    the prediction was 100% off in float16; now 7e-4)."""
    dtype = DTYPES[dtype_name]
    args, kwargs = unet_inputs(expected, highres, latent_scale=1000.0)
    unet = load_unet(official_checkpoint / UNET_FOLDERS[highres] / "unet", dtype=dtype)
    assert max_rel(unet(*args, **kwargs), float32_runs[highres][0]) <= UNET_TOL[dtype_name]


def test_group_norm_statistics_do_not_overflow_in_float16():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((1, 4, 4, 64)) * 600).astype(np.float32)  # squares past 65504
    weight, bias = (rng.standard_normal(64).astype(np.float32) for _ in range(2))
    reference = ops.group_norm(mx.array(x), mx.array(weight), mx.array(bias), 32, 1e-5)  # CPU float32
    with ops.native_ops():
        out = ops.group_norm(*(mx.array(a).astype(mx.float16) for a in (x, weight, bias)), 32, 1e-5)
    assert out.dtype == mx.float16
    assert max_rel(out, reference) <= TOL["float16"]


LOOP_STEPS = 2


def guided_latents(decoder, expected, highres: bool) -> mx.array:
    """Final latents of a short guided loop (release guidance) from the fixture's latents."""
    if highres:
        conditioning = (mx.array(expected["highres_prompt_embeds"]), mx.array(expected["highres_pooled"]))
    else:
        conditioning = mx.array(expected["lowres_condition"])
    start = mx.array(expected["unet_latents"][:1])
    size = [n * decoder.vae_scale_factor for n in start.shape[2:]]
    return list(decoder.denoise(conditioning, *size, steps=LOOP_STEPS, latents=start))[-1][2]


@pytest.mark.parametrize("highres", [True, False], ids=["highres", "lowres"])
def test_pixel_decoder_half_unet_float32_vae(dtype_name, highres, official_checkpoint, expected, float32_runs,
                                             monkeypatch):
    """The GPU path of `LaVIT.pixel_decoder`: UNet at the large-model dtype, VAE in float32."""
    dtype = DTYPES[dtype_name]
    import lavit_mlx.loading as loading

    monkeypatch.setattr(loading, "compute_dtype", lambda large: dtype if large else mx.float32)
    decoder = lavit_mlx.load(official_checkpoint).pixel_decoder(highres)
    assert decoder.unet.conv_in.weight.dtype == dtype
    assert {v.dtype for _, v in tree_flatten(decoder.vae.parameters())} == {mx.float32}
    _, latents_ref, images_ref = float32_runs[highres]
    latents = guided_latents(decoder, expected, highres)
    assert latents.dtype == mx.float32
    assert max_rel(latents, latents_ref) <= LOOP_TOL[dtype_name]
    images = decoder.vae_decode_raw(latents / decoder.scaling_factor)
    assert images.dtype == mx.float32
    assert max_rel(images, images_ref) <= LOOP_TOL[dtype_name]
    # Half latents are decoded in float32 too: the same pixels as their float32 values.
    half = latents.astype(dtype)
    assert decoder.vae_decode_raw(half).dtype == mx.float32
    assert np.array_equal(decoder.to_images(half), decoder.to_images(half.astype(mx.float32)))
