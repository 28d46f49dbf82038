"""The MLX UNet against the official fixture and against diffusers' UNet2DConditionModel.

The diffusers models are random and tiny, of other shapes than the fixture's: three
resolution levels, int and per-block head counts, linear and 1x1-conv projections, an
SDXL-style text_time UNet on a non-square latent, latent sizes the down path cannot halve
exactly, a context mask, batches of 2 and 3. Each is saved with `save_pretrained` and
read back through `load_unet` (config -> model -> sanitize -> strict load).
"""

from __future__ import annotations

import contextlib
import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from lavit_mlx.errors import CheckpointError, LaVITError
from lavit_mlx.models.unet import UNetConfig, UNet2DConditionModel, load_unet
from lavit_mlx.weights import load_strict

# float32 end to end; measured ~2e-6 on the fixture and ~1e-6 against diffusers.
TOL = 1e-4


def max_rel(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


# ------------------------------------------------------------------------- official fixture
@pytest.fixture(scope="module")
def expected(official_tiny):
    from safetensors.numpy import load_file

    return load_file(str(official_tiny / "expected.safetensors"))


def test_fixture_lowres_unet_with_context_mask(official_checkpoint, expected):
    unet = load_unet(official_checkpoint / "pixel_decoding" / "unet")  # a .bin folder
    latents = expected["unet_latents"]
    context = np.repeat(expected["lowres_condition"], latents.shape[0], axis=0)
    mask = expected["lowres_unet_mask"]
    assert mask[0].sum() < mask.shape[1]  # row 0 really masks positions
    out = unet(latents, 501, context, encoder_attention_mask=mask)
    assert out.shape == latents.shape
    assert max_rel(out, expected["lowres_unet_out"]) <= TOL
    # The mask changes the prediction: ignoring it must not pass.
    assert max_rel(unet(latents, 501, context), expected["lowres_unet_out"]) > 10 * TOL


def test_fixture_highres_unet_text_time(official_checkpoint, expected):
    unet = load_unet(official_checkpoint / "highres_pixel_decoding" / "unet")
    latents = expected["unet_latents"]
    batch = latents.shape[0]
    out = unet(latents, 501, np.repeat(expected["highres_prompt_embeds"], batch, axis=0),
               text_embeds=np.repeat(expected["highres_pooled"], batch, axis=0),
               time_ids=expected["highres_time_ids"])
    assert max_rel(out, expected["highres_unet_out"]) <= TOL


# ------------------------------------------------------------------------- against diffusers
BASE = dict(in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=8, sample_size=8)

CASES = {
    # SD-2 style: per-block heads, linear projections, 3 levels, mask, batch 2.
    "three_levels_list_heads_linear": dict(
        config=dict(BASE, block_out_channels=(16, 32, 48),
                    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                    attention_head_dim=[2, 4, 4], use_linear_projection=True, cross_attention_dim=24),
        latent=(2, 8, 8), context_len=7, mask=True, timestep=999),
    # SD-1 style: int heads, 1x1-conv projections, 2 layers per block, odd latent sizes
    # (10x6 cannot be halved twice: the up path resizes to the skips), batch 3,
    # sin/cos order and frequency shift of the other convention, centred input, a mid
    # block output scale, and a resnet_out_scale_factor that diffusers ignores for these
    # block types.
    "int_heads_conv_projection_uneven_latent": dict(
        config=dict(BASE, block_out_channels=(16, 32, 32), layers_per_block=2,
                    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                    attention_head_dim=2, use_linear_projection=False, cross_attention_dim=12,
                    flip_sin_to_cos=False, freq_shift=1, center_input_sample=True,
                    resnet_out_scale_factor=2.0, mid_block_scale_factor=1.5),
        latent=(3, 10, 6), context_len=5, mask=True, timestep=37),
    # SDXL style: text_time added embedding, deeper transformers on the inner blocks,
    # non-square latent, a fractional timestep, batch 2 with different size ids.
    "text_time_non_square": dict(
        config=dict(BASE, block_out_channels=(16, 32, 64),
                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                    attention_head_dim=[1, 2, 4], transformer_layers_per_block=[1, 1, 2],
                    use_linear_projection=True, cross_attention_dim=32,
                    addition_embed_type="text_time", addition_time_embed_dim=8,
                    projection_class_embeddings_input_dim=20 + 6 * 8),
        latent=(2, 8, 12), context_len=6, mask=False, timestep=437.5, text_embeds_dim=20),
}


def random_diffusers_unet(config: dict, seed: int):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    model = diffusers.UNet2DConditionModel(**config).eval()
    with torch.no_grad():  # norms away from (1, 0) so that their loading is checked too
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.2 * torch.randn_like(param))
    return model


def case_inputs(case: dict, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    batch, height, width = case["latent"]
    cfg = case["config"]
    inputs = dict(
        sample=rng.standard_normal((batch, cfg["in_channels"], height, width)).astype(np.float32),
        context=rng.standard_normal((batch, case["context_len"], cfg["cross_attention_dim"])).astype(np.float32),
    )
    if case["mask"]:
        mask = np.ones((batch, case["context_len"]), dtype=bool)
        mask[0, 2:] = False  # different lengths per row
        mask[-1, -1] = False
        inputs["mask"] = mask
    if cfg.get("addition_embed_type") == "text_time":
        inputs["text_embeds"] = rng.standard_normal((batch, case["text_embeds_dim"])).astype(np.float32)
        sizes = np.array([[64, 96, 0, 0, 64, 96], [96, 64, 8, 4, 80, 72]], dtype=np.float32)
        inputs["time_ids"] = sizes[np.arange(batch) % 2]
    return inputs


def run_diffusers(model, case: dict, inputs: dict) -> np.ndarray:
    import torch

    added = None
    if "text_embeds" in inputs:
        added = {"text_embeds": torch.from_numpy(inputs["text_embeds"]),
                 "time_ids": torch.from_numpy(inputs["time_ids"])}
    with torch.no_grad():
        out = model(torch.from_numpy(inputs["sample"]), case["timestep"],
                    encoder_hidden_states=torch.from_numpy(inputs["context"]),
                    encoder_attention_mask=torch.from_numpy(inputs["mask"]) if "mask" in inputs else None,
                    added_cond_kwargs=added).sample
    return out.numpy()


def run_ours(unet, case: dict, inputs: dict) -> mx.array:
    return unet(inputs["sample"], case["timestep"], inputs["context"],
                encoder_attention_mask=inputs.get("mask"),
                text_embeds=inputs.get("text_embeds"), time_ids=inputs.get("time_ids"))


@pytest.fixture(scope="module")
def diffusers_unets(tmp_path_factory):
    """name -> (folder written by save_pretrained, reference output, inputs)."""
    built = {}
    for seed, (name, case) in enumerate(CASES.items()):
        model = random_diffusers_unet(case["config"], seed)
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(str(folder))
        inputs = case_inputs(case, seed)
        built[name] = (folder, run_diffusers(model, case, inputs), inputs)
    return built


@pytest.mark.parametrize("name", list(CASES))
def test_matches_diffusers(name, diffusers_unets):
    folder, reference, inputs = diffusers_unets[name]
    unet = load_unet(folder)
    out = run_ours(unet, CASES[name], inputs)
    assert out.dtype == mx.float32
    assert out.shape == reference.shape
    assert max_rel(out, reference) <= TOL


def test_batch_rows_are_independent(diffusers_unets):
    """Row i of a batch equals the same input run alone (mask and time ids per row)."""
    name = "text_time_non_square"
    folder, reference, inputs = diffusers_unets[name]
    unet = load_unet(folder)
    single = {k: v[1:2] for k, v in inputs.items()}
    out = run_ours(unet, CASES[name], single)
    assert max_rel(out, reference[1:2]) <= TOL


def test_sanitize_is_idempotent_and_mlx_weights_reload(diffusers_unets, tmp_path):
    folder, reference, inputs = diffusers_unets["int_heads_conv_projection_uneven_latent"]
    unet = load_unet(folder)
    converted = dict(tree_flatten(unet.parameters()))
    assert any(v.ndim == 4 and v.shape[1] != v.shape[-1] for v in converted.values())  # real convs
    again = unet.sanitize(converted)  # 'torch' is the default; every key here is shape-decided
    assert set(again) == set(converted)
    assert all(np.array_equal(np.array(again[k]), np.array(converted[k])) for k in converted)

    # An MLX-layout folder loads to the same model.
    mx.save_safetensors(str(tmp_path / "diffusion_pytorch_model.safetensors"), converted)
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    reloaded = load_unet(tmp_path, source_layout="mlx")
    case = CASES["int_heads_conv_projection_uneven_latent"]
    assert max_rel(run_ours(reloaded, case, inputs), reference) <= TOL


def test_sanitize_converts_torch_conv_layout(diffusers_unets):
    folder, _, _ = diffusers_unets["int_heads_conv_projection_uneven_latent"]
    from lavit_mlx.weights import read_weights

    raw = read_weights(folder / "diffusion_pytorch_model.safetensors")
    unet = load_unet(folder)
    key = "down_blocks.0.attentions.0.proj_in.weight"  # a 1x1 conv: (O, I, 1, 1) in torch
    assert raw[key].shape == (16, 16, 1, 1)
    assert unet.sanitize(raw)[key].shape == (16, 1, 1, 16)
    assert unet.sanitize(raw)["conv_in.weight"].shape == (16, 3, 3, 4)


def test_missing_and_wrong_keys_are_named(diffusers_unets):
    folder, _, _ = diffusers_unets["three_levels_list_heads_linear"]
    from lavit_mlx.weights import read_weights

    config = json.loads((folder / "config.json").read_text())
    weights = read_weights(folder / "diffusion_pytorch_model.safetensors")
    model = UNet2DConditionModel(UNetConfig.from_dict(config))
    key = "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    partial = {k: v for k, v in model.sanitize(weights).items() if k != key}
    with pytest.raises(CheckpointError, match="missing key 'mid_block.attentions.0.transformer_blocks"):
        load_strict(model, partial, str(folder))
    wrong = UNet2DConditionModel(UNetConfig.from_dict(dict(config, cross_attention_dim=8)))
    with pytest.raises(CheckpointError, match="attn2.to_k.weight' has shape"):
        load_strict(wrong, wrong.sanitize(weights), str(folder))


def test_text_time_unet_requires_added_inputs(diffusers_unets):
    folder, _, inputs = diffusers_unets["text_time_non_square"]
    unet = load_unet(folder)
    with pytest.raises(LaVITError, match="text_embeds and time_ids"):
        unet(inputs["sample"], 10, inputs["context"])


# ------------------------------------------------------------------------- configs
@pytest.mark.parametrize("key,value", [
    ("class_embed_type", "timestep"),
    ("time_cond_proj_dim", 256),
    ("addition_embed_type", "text"),
    ("down_block_types", ["SimpleCrossAttnDownBlock2D", "DownBlock2D"]),
    ("up_block_types", ["UpBlock2D", "AttnUpBlock2D"]),
    ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
    ("resnet_time_scale_shift", "scale_shift"),
    ("encoder_hid_dim_type", "text_proj"),
    ("act_fn", "gelu"),
    ("only_cross_attention", True),
])
def test_unsupported_config_value_is_named(key, value):
    config = dict(block_out_channels=[32, 64], down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                  up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=32)
    config[key] = value
    with pytest.raises(CheckpointError) as info:
        UNetConfig.from_dict(config)
    message = str(info.value)
    assert key in message and "\n" not in message
    shown = value[0] if isinstance(value, list) else value
    assert repr(shown) in message or str(shown).lower() in message


def test_config_ignores_unknown_keys_and_reads_heads_quirk():
    config = UNetConfig.from_dict({"_class_name": "UNet2DConditionModel", "some_future_key": 3,
                                   "block_out_channels": [32, 64], "attention_head_dim": [2, 4],
                                   "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                                   "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"]})
    # num_attention_heads is null: attention_head_dim counts heads (diffusers' quirk).
    model = UNet2DConditionModel(config)
    assert model.down_blocks[0].attentions[0].transformer_blocks[0].attn1.heads == 2
    assert model.up_blocks[1].attentions[0].transformer_blocks[0].attn1.heads == 2
    assert model.mid_block.attentions[0].transformer_blocks[0].attn1.heads == 4


# ------------------------------------------------------------------------- CPU kernels
# The CPU paths of cpu_math (Winograd, folded upsampling, per-tap and unfolded convs,
# fused GroupNorm/SiLU, softmax attention) against plain MLX/torch computations, at
# sizes that select each path.
CONV_CASES = [
    # (batch, H, W, in, out, kernel, padding, expected path)
    (1, 64, 72, 64, 96, 3, 1, "winograd-4"),  # F(4x4, 3x3)
    (2, 9, 7, 1280, 1024, 3, 1, "winograd-2"),  # F(2x2, 3x3), odd sizes (partial tiles)
    (2, 9, 11, 16, 24, 3, 1, "direct"),
    (2, 64, 66, 32, 3, 3, 1, "per-tap"),  # few outputs on a large map
    (2, 10, 12, 4, 40, 3, 1, "unfold"),  # few inputs (conv_in)
    (2, 12, 10, 24, 16, 1, 0, "matmul"),
]


@pytest.mark.parametrize("batch,h,w,cin,cout,k,pad,path", CONV_CASES)
def test_cpu_conv_paths_match_mlx_conv(batch, h, w, cin, cout, k, pad, path):
    from lavit_mlx.cpu import conv as cpu_conv

    rng = np.random.default_rng(cin + cout)
    x = mx.array(rng.standard_normal((batch, h, w, cin)).astype(np.float32))
    weight = mx.array((rng.standard_normal((cout, k, k, cin)) / np.sqrt(k * k * cin)).astype(np.float32))
    bias = mx.array(rng.standard_normal(cout).astype(np.float32))
    expected_tile = {"winograd-4": 4, "winograd-2": 2}.get(path, 0)
    assert cpu_conv.winograd_tile(x, weight, 1, pad) == expected_tile
    reference = mx.conv2d(x, weight, padding=pad) + bias
    tol = 5e-5 if path == "winograd-4" else 5e-6  # F(4x4) rounds at ~1e-5 in float32
    assert max_rel(cpu_conv.conv2d(x, weight, bias, 1, pad), reference) <= tol


@pytest.mark.parametrize("batch,h,w,channels,tile", [(1, 64, 62, 64, 4), (2, 11, 13, 640, 2), (1, 40, 36, 64, 0),
                                                      (2, 5, 4, 8, 0)])
def test_folded_upsample_conv_matches_upsample_then_conv(batch, h, w, channels, tile):
    from lavit_mlx.cpu import conv as cpu_conv
    from lavit_mlx.models.diffusion_blocks import upsample_nearest

    rng = np.random.default_rng(channels)
    x = mx.array(rng.standard_normal((batch, h, w, channels)).astype(np.float32))
    weight = mx.array((rng.standard_normal((channels, 3, 3, channels)) / np.sqrt(9 * channels)).astype(np.float32))
    bias = mx.array(rng.standard_normal(channels).astype(np.float32))
    # The four folded 2x2 convs read the input padded by one: (H + 1, W + 1) valid windows.
    assert cpu_conv.winograd_tile(mx.zeros((batch, h + 1, w + 1, channels)), weight[:, :2, :2, :], 1, 0) == tile
    reference = mx.conv2d(upsample_nearest(x), weight, padding=1) + bias
    assert max_rel(cpu_conv.upsample2x_conv3x3(x, weight, bias), reference) <= 5e-5


@pytest.mark.parametrize("shape,groups,silu", [((1, 64, 64, 128), 32, True), ((2, 6, 10, 32), 8, False),
                                               ((2, 7, 64), 4, True)])
def test_group_norm_silu_matches_torch(shape, groups, silu):
    torch = pytest.importorskip("torch")
    from lavit_mlx.cpu import kernels as cpu_math

    rng = np.random.default_rng(len(shape))
    x = (rng.standard_normal(shape) * 3 + 1.5).astype(np.float32)  # mean far from 0
    gamma, beta = (rng.standard_normal(shape[-1]).astype(np.float32) for _ in range(2))
    norm = torch.nn.GroupNorm(groups, shape[-1], eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.from_numpy(gamma))
        norm.bias.copy_(torch.from_numpy(beta))
        channels_first = torch.from_numpy(x).movedim(-1, 1)
        ref = norm(channels_first)
        ref = (torch.nn.functional.silu(ref) if silu else ref).movedim(1, -1).numpy()
    out = cpu_math.group_norm(mx.array(x), mx.array(gamma), mx.array(beta), groups, 1e-6, silu)
    assert max_rel(out, ref) <= 1e-5


def test_silu_geglu_attention_match_torch():
    torch = pytest.importorskip("torch")
    from lavit_mlx.cpu import kernels as cpu_math

    x = np.linspace(-60, 60, 600_000, dtype=np.float32).reshape(2, -1)  # large enough to split
    silu = torch.nn.functional.silu(torch.from_numpy(x).double()).numpy()
    assert np.abs(np.array(cpu_math.silu(mx.array(x))) - silu).max() <= 2e-6 * np.abs(x).max()
    gate = np.cos(x)
    geglu = (torch.from_numpy(gate).double() * torch.nn.functional.gelu(torch.from_numpy(x).double())).numpy()
    assert np.abs(np.array(cpu_math.geglu(mx.array(gate), mx.array(x))) - geglu).max() <= 1e-6 * np.abs(x).max()

    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 4, n, 16)).astype(np.float32) * s for n, s in ((300, 1), (90, 3), (90, 1)))
    keep = np.ones((2, 90), dtype=bool)
    keep[0, 40:] = False
    bias = ((1.0 - keep) * -10000.0).astype(np.float32)[:, None, None, :]
    with torch.no_grad():
        ref = torch.nn.functional.scaled_dot_product_attention(
            *(torch.from_numpy(a) for a in (q, k, v)), attn_mask=torch.from_numpy(bias), scale=0.25).numpy()
    out = cpu_math.attention(mx.array(q), mx.array(k), mx.array(v), 0.25, mx.array(bias))
    assert max_rel(out, ref) <= 1e-5


def test_matches_diffusers_at_winograd_sizes(tmp_path):
    """A UNet whose 3x3 convs and upsampling take the Winograd paths on the CPU."""
    case = dict(
        config=dict(BASE, block_out_channels=(96, 128),
                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                    attention_head_dim=2, use_linear_projection=True, cross_attention_dim=32),
        latent=(2, 32, 32), context_len=4, mask=False, timestep=300)
    model = random_diffusers_unet(case["config"], 7)
    model.save_pretrained(str(tmp_path))
    inputs = case_inputs(case, 7)
    unet = load_unet(tmp_path)
    from lavit_mlx.cpu import conv as cpu_conv

    resnet_conv = unet.down_blocks[0].resnets[0].conv1
    assert cpu_conv.winograd_tile(mx.zeros((2, 32, 32, 96)), resnet_conv.weight, 1, 1) == 4
    assert max_rel(run_ours(unet, case, inputs), run_diffusers(model, case, inputs)) <= TOL


def test_prepared_context_gives_the_same_prediction(diffusers_unets):
    name = "three_levels_list_heads_linear"
    folder, reference, inputs = diffusers_unets[name]
    unet = load_unet(folder)
    prepared = unet.prepare_context(inputs["context"], inputs["mask"])
    out = unet(inputs["sample"], CASES[name]["timestep"], prepared)
    assert max_rel(out, reference) <= TOL
    with pytest.raises(LaVITError, match="prepare_context"):
        unet(inputs["sample"], 1, prepared, encoder_attention_mask=inputs["mask"])


def test_native_op_path_matches_fixture(official_checkpoint, expected, monkeypatch):
    """The path taken on a GPU (MLX's own conv, sigmoid, erf, attention), forced on the CPU."""

    from lavit_mlx import ops

    monkeypatch.setattr(ops, "cpu_kernels", lambda x: False)
    unet = load_unet(official_checkpoint / "highres_pixel_decoding" / "unet")
    latents = expected["unet_latents"]
    batch = latents.shape[0]
    out = unet(latents, 501, np.repeat(expected["highres_prompt_embeds"], batch, axis=0),
               text_embeds=np.repeat(expected["highres_pooled"], batch, axis=0),
               time_ids=expected["highres_time_ids"])
    assert max_rel(out, expected["highres_unet_out"]) <= TOL


# ------------------------------------------------------------------------- large latents
# Bands and query chunks keep a large latent's working memory bounded; they must not
# change a single output value.
BANDED_CASES = [
    # (batch, H, W, in, out, stride, padding, upsample)
    (1, 61, 70, 64, 96, 1, 1, False),  # Winograd F(4x4), partial last tile row
    (2, 33, 29, 16, 24, 1, 1, False),  # MLX's conv, unfolded per band
    (2, 34, 30, 16, 24, 2, 0, False),  # stride 2 (a downsampler)
    (1, 37, 30, 64, 64, 1, 1, True),  # folded upsample, Winograd
    (2, 13, 9, 16, 16, 1, 1, True),  # folded upsample, four MLX convs
]


@pytest.mark.parametrize("batch,h,w,cin,cout,stride,pad,upsample", BANDED_CASES)
def test_banded_convs_equal_unbanded(batch, h, w, cin, cout, stride, pad, upsample, monkeypatch):
    from lavit_mlx.cpu import conv as cpu_conv

    rng = np.random.default_rng(h * w)
    x = mx.array(rng.standard_normal((batch, h, w, cin)).astype(np.float32))
    weight = mx.array((rng.standard_normal((cout, 3, 3, cin)) / np.sqrt(9 * cin)).astype(np.float32))
    bias = mx.array(rng.standard_normal(cout).astype(np.float32))

    def run():
        if upsample:
            return np.array(cpu_conv.upsample2x_conv3x3(x, weight, bias))
        return np.array(cpu_conv.conv2d(x, weight, bias, stride, pad))

    whole = run()
    bands = []
    real_bands = cpu_conv._bands
    monkeypatch.setattr(cpu_conv, "_bands", lambda count, unit: bands.append(real_bands(count, unit)) or bands[-1])
    monkeypatch.setattr(cpu_conv, "CONV_SINGLE_PASS_BYTES", 16 * 1024)
    monkeypatch.setattr(cpu_conv, "CONV_BAND_BYTES", 16 * 1024)
    banded = run()
    assert max(len(b) for b in bands) > 2  # it really ran in bands
    # Winograd bands compute every tile as before, but a GEMM of fewer rows may round
    # differently in BLAS (OpenBLAS's Haswell kernel does, its SkylakeX kernel did not), as
    # MLX's conv of fewer rows does
    assert max_rel(banded, whole) <= 2e-5  # float32 rounding of the transformed tiles (5.6e-6 seen)


@pytest.mark.parametrize("native", [False, True])
def test_chunked_attention_equals_one_pass(native, monkeypatch):
    from lavit_mlx import ops

    rng = np.random.default_rng(3)
    q, k, v = (mx.array(rng.standard_normal(shape).astype(np.float32))
               for shape in ((2, 3, 301, 8), (2, 3, 120, 8), (2, 3, 120, 8)))
    bias = mx.array(np.where(rng.random((2, 3, 301, 120)) < 0.2, -10000.0, 0.0).astype(np.float32))
    context = ops.native_ops() if native else contextlib.nullcontext()
    with context:
        whole = np.array(ops.attention(q, k, v, 0.35, bias))
        monkeypatch.setattr(ops, "ATTENTION_SINGLE_PASS_BYTES", 1024)
        monkeypatch.setattr(ops, "ATTENTION_CHUNK_BYTES", 2 * 3 * 120 * 4 * 16)  # 16 query rows
        assert ops.query_chunk_rows(q, 120) == 16
        chunked = np.array(ops.attention(q, k, v, 0.35, bias))
    assert np.abs(chunked - whole).max() <= 1e-6 * np.abs(whole).max()


def test_chunked_attention_memory_stays_bounded():
    """24576 tokens of one head: 2.25 GiB of scores, computed in 64 MiB chunks."""
    from lavit_mlx import ops

    tokens = 24576
    q = mx.random.normal((1, 1, tokens, 16), key=mx.random.key(0))
    mx.eval(q)
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    out = ops.attention(q, q, q, 0.25)
    mx.eval(out)
    assert mx.get_peak_memory() - base < 0.3 * tokens * tokens * 4
    rows = np.array(q[0, 0, :64] * 0.25) @ np.array(q[0, 0]).T  # (64, tokens) reference rows
    weights = np.exp(rows - rows.max(axis=1, keepdims=True))
    reference = (weights / weights.sum(axis=1, keepdims=True)) @ np.array(q[0, 0])
    assert max_rel(out[0, 0, :64], reference) <= 1e-5
