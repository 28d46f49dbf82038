"""The MLX AutoencoderKL against the official fixture and against diffusers' AutoencoderKL."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from lavit_mlx.errors import CheckpointError
from lavit_mlx.models.vae import AutoencoderKL, VAEConfig, load_vae
from lavit_mlx.weights import load_strict, read_weights

TOL = 1e-4  # float32 end to end; measured ~2e-6


def max_rel(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("folder,key", [("pixel_decoding", "vae_lowres_decoded"),
                                        ("highres_pixel_decoding", "vae_highres_decoded")])
def test_fixture_decode(official_tiny, folder, key):
    from safetensors.numpy import load_file

    expected = load_file(str(official_tiny / "expected.safetensors"))
    vae = load_vae(official_tiny / "checkpoint" / folder / "vae")
    images = vae.decode(expected["unet_latents"] / vae.scaling_factor)
    assert images.shape == expected[key].shape
    assert max_rel(images, expected[key]) <= TOL


# ------------------------------------------------------------------------- against diffusers
CASES = {
    # Three levels, two layers per block, quant convs, mid attention; non-square images.
    "three_levels": dict(block_out_channels=(16, 32, 32), layers_per_block=2, image=(2, 24, 16)),
    # No quant convs, no mid-block attention, other latent width, one level of downsampling.
    # Wide enough and large enough for the CPU's Winograd convolutions and folded upsampling.
    "winograd_sizes": dict(block_out_channels=(64, 64), layers_per_block=1, image=(1, 64, 64)),
    "no_quant_no_attention": dict(block_out_channels=(16, 32), layers_per_block=1, latent_channels=3,
                                  use_quant_conv=False, use_post_quant_conv=False,
                                  mid_block_add_attention=False, image=(3, 16, 16)),
}


def diffusers_config(case: dict) -> dict:
    n = len(case["block_out_channels"])
    config = {k: v for k, v in case.items() if k != "image"}
    config.update(down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                  norm_num_groups=8, scaling_factor=0.5)
    return config


@pytest.fixture(scope="module")
def diffusers_vaes(tmp_path_factory):
    """name -> (torch model, folder written by save_pretrained, images, reference dict)."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    built = {}
    for seed, (name, case) in enumerate(CASES.items()):
        torch.manual_seed(seed)
        model = diffusers.AutoencoderKL(**diffusers_config(case)).eval()
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if "norm" in param_name:
                    param.add_(0.2 * torch.randn_like(param))
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(str(folder))
        batch, height, width = case["image"]
        images = np.random.default_rng(seed).uniform(-1, 1, (batch, 3, height, width)).astype(np.float32)
        with torch.no_grad():
            posterior = model.encode(torch.from_numpy(images)).latent_dist
            latents = posterior.mean
            reference = dict(mean=latents.numpy(), std=posterior.std.numpy(),
                             decoded=model.decode(latents).sample.numpy())
        built[name] = (folder, images, reference)
    return built


@pytest.mark.parametrize("name", list(CASES))
def test_encode_decode_match_diffusers(name, diffusers_vaes):
    folder, images, reference = diffusers_vaes[name]
    vae = load_vae(folder)
    if name == "winograd_sizes":
        from lavit_mlx.cpu import conv as cpu_conv

        full_size = mx.zeros((1, 64, 64, 64))
        assert cpu_conv.winograd_tile(full_size, vae.decoder.up_blocks[-1].resnets[0].conv1.weight, 1, 1) == 4
    posterior = vae.encode(images)
    assert max_rel(posterior.mean, reference["mean"]) <= TOL
    assert max_rel(posterior.std, reference["std"]) <= TOL
    decoded = vae.decode(reference["mean"])
    assert decoded.dtype == mx.float32
    assert max_rel(decoded, reference["decoded"]) <= TOL


def test_sample_uses_mean_and_std(diffusers_vaes):
    folder, images, _ = diffusers_vaes["three_levels"]
    posterior = load_vae(folder).encode(images)
    key = mx.random.key(3)
    noise = mx.random.normal(posterior.mean.shape, key=key)
    expected = posterior.mean + posterior.std * noise
    assert np.allclose(np.array(posterior.sample(key)), np.array(expected), atol=1e-6)


def test_legacy_attention_names_load(diffusers_vaes):
    """Checkpoints from before diffusers 0.14 name the mid-block attention query/key/value/proj_attn."""
    folder, images, reference = diffusers_vaes["three_levels"]
    legacy_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    legacy = {}
    for key, value in read_weights(folder / "diffusion_pytorch_model.safetensors").items():
        for new, old in legacy_names.items():
            key = key.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        legacy[key] = value
    assert "decoder.mid_block.attentions.0.proj_attn.weight" in legacy
    vae = AutoencoderKL(VAEConfig.from_dict(diffusers_config(CASES["three_levels"])))
    load_strict(vae, vae.sanitize(legacy), "legacy")
    assert max_rel(vae.decode(reference["mean"]), reference["decoded"]) <= TOL


def test_ambiguous_conv_follows_source_layout(diffusers_vaes, tmp_path):
    """encoder.conv_in (3x3 over 3 channels) has the same shape in both layouts."""
    folder, images, reference = diffusers_vaes["three_levels"]
    vae = load_vae(folder)
    converted = dict(tree_flatten(vae.parameters()))
    key = "encoder.conv_in.weight"
    assert converted[key].shape == (16, 3, 3, 3)
    # Read as MLX layout, converted weights pass through unchanged (idempotent) ...
    again = vae.sanitize(converted, source_layout="mlx")
    assert all(np.array_equal(np.array(again[k]), np.array(converted[k])) for k in converted)
    # ... read as torch layout, the ambiguous kernel would be transposed a second time.
    assert not np.array_equal(np.array(vae.sanitize(converted)[key]), np.array(converted[key]))
    mx.save_safetensors(str(tmp_path / "diffusion_pytorch_model.safetensors"), converted)
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    reloaded = load_vae(tmp_path, source_layout="mlx")
    assert max_rel(reloaded.encode(images).mean, reference["mean"]) <= TOL


@pytest.mark.parametrize("key,value", [
    ("down_block_types", ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]),
    ("up_block_types", ["UpDecoderBlock2D", "AttnUpDecoderBlock2D"]),
    ("act_fn", "relu"),
])
def test_unsupported_config_value_is_named(key, value):
    config = dict(block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D"] * 2,
                  up_block_types=["UpDecoderBlock2D"] * 2)
    config[key] = value
    with pytest.raises(CheckpointError, match=key):
        VAEConfig.from_dict(config)


def test_missing_weights_file_is_named(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model"):
        load_vae(tmp_path)


def test_native_op_path_matches_diffusers(diffusers_vaes, monkeypatch):
    """The path taken on a GPU (MLX's own conv, GroupNorm, sigmoid, attention), forced on the CPU."""

    from lavit_mlx import ops

    monkeypatch.setattr(ops, "cpu_kernels", lambda x: False)
    folder, images, reference = diffusers_vaes["winograd_sizes"]
    vae = load_vae(folder)
    assert max_rel(vae.encode(images).mean, reference["mean"]) <= TOL
    assert max_rel(vae.decode(reference["mean"]), reference["decoded"]) <= TOL


def test_load_vae_reads_the_mlx_layout_folders_this_project_writes():
    """`load_vae(folder, source_layout="mlx")` finds `diffusion_mlx_model.safetensors` (the
    stem of every folder this project writes), not only diffusers' file name."""
    from lavit_mlx.models.vae import load_vae
    from lavit_mlx.zoo import bundled_model

    folder = bundled_model() / "highres_pixel_decoding" / "vae"
    vae = load_vae(folder, source_layout="mlx")
    assert vae.config.latent_channels == json.loads((folder / "config.json").read_text())["latent_channels"]
