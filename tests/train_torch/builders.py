"""Tiny starting points for the PyTorch trainers' tests: a LaVIT folder in the released layout
(EVA, tokenizer, VQ decoders written by the mirror, random weights), its MLX conversion, a
shapes-world text tokenizer, diffusers VAE/scheduler folders, caption manifests."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lavit_mlx.config import EVAConfig, TokenizerConfig, VQDecoderConfig, mlp_width
from lavit_mlx.layout import RELEASE_FILES

from support.data_builders import image_bytes, write_manifest

WIDTH, HEADS, CODEBOOK = 32, 2, 32
EVA = EVAConfig(width=WIDTH, depth=1, num_heads=HEADS, mlp_dim=mlp_width(WIDTH), patch_size=7, image_size=28,
                head_dim_out=WIDTH)
TOKENIZER = TokenizerConfig(width=WIDTH, merger_depth=1, num_heads=HEADS, mlp_dim=mlp_width(WIDTH),
                            codebook_size=CODEBOOK, code_dim=8)
HIGHRES = VQDecoderConfig(highres=True, width=WIDTH, depth=1, num_heads=HEADS, mlp_dim=mlp_width(WIDTH), code_dim=8,
                          num_patches=EVA.num_patches, feature_dim=WIDTH, context_dims=(16, 16), pooled_dim=16)
# the YAML of a tokenizer run of these sizes (heads as the folder's)
TOKENIZER_MODEL = {"merger_depth": 1, "num_heads": HEADS, "codebook_size": CODEBOOK, "code_dim": 8,
                   "highres_decoder": {"width": WIDTH, "depth": 1, "num_heads": HEADS, "context_dims": [16, 16],
                                       "pooled_dim": 16}}
VAE = {"in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 2,
       "up_block_types": ["UpDecoderBlock2D"] * 2, "block_out_channels": [8, 16], "layers_per_block": 1,
       "latent_channels": 4, "norm_num_groups": 4, "sample_size": 16}
UNET = {"sample_size": 8, "in_channels": 4, "out_channels": 4, "block_out_channels": [16, 32],
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "layers_per_block": 1, "norm_num_groups": 8,
        "attention_head_dim": 4, "addition_time_embed_dim": 4}
SCHEDULER = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
             "beta_schedule": "scaled_linear", "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
             "prediction_type": "epsilon"}


def _randomize(module: torch.nn.Module, std: float = 0.2) -> None:
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name or "ln_" in name or "in_conv.0" in name:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.05)
            else:
                p.normal_(0.0, std)


def release_folder(out: Path, seed: int = 0) -> Path:
    """EVA + tokenizer + high-res VQ decoder in the released layout."""
    from lavit_train.models.eva_vit import EVAVisionTransformer
    from lavit_train.models.visual_tokenizer import DynamicVisualTokenizer, l2_normalize
    from lavit_train.models.vq_decoder import VQDecoder

    torch.manual_seed(seed)
    modules = {"eva": EVAVisionTransformer(EVA), "tokenizer": DynamicVisualTokenizer(TOKENIZER),
               "highres_decoder": VQDecoder(HIGHRES)}
    for name, module in modules.items():
        _randomize(module, 0.2 if name == "eva" else 0.1)
        if name == "tokenizer":
            with torch.no_grad():
                module.quantize.embedding.weight.copy_(l2_normalize(module.quantize.embedding.weight))
                # about half of the patches kept at the start
                pixels = torch.randn(8, 3, EVA.image_size, EVA.image_size)
                logprobs = module.token_predictor(modules["eva"](pixels)[:, 1:])
                margin = (logprobs[..., 0] - logprobs[..., 1]).flatten()
                module.token_predictor.out_conv[-1].bias.add_(torch.tensor([-float(margin.median()), 0.0]))
        path = out / RELEASE_FILES[name]
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(module.state_dict(), path)
    return out


def pixel_folder(out: Path, seed: int = 0) -> Path:
    """A diffusers pixel-decoding folder without a UNet: vae/ and scheduler/."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    AutoencoderKL(**VAE).save_pretrained(out / "vae")
    (out / "scheduler").mkdir(parents=True, exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER))
    return out


def mlx_folder(release: Path, out: Path, components=("eva",)) -> Path:
    """The MLX conversion of some of a release folder's components."""
    from lavit_convert.to_mlx import ConvertOptions, convert_to_mlx

    convert_to_mlx(release, out, ConvertOptions(components=list(components), vision_heads=HEADS))
    return out


def text_tokenizer(out: Path) -> Path:
    """The shapes world's 256-piece sentencepiece model (its folder)."""
    from lavit_mlx.shapes import train_text_tokenizer

    return train_text_tokenizer(out).parent


def manifest(folder: Path, count: int, name: str = "train.jsonl") -> Path:
    """`count` caption lines with coloured 16x12 pictures and a `uid` (the tests' sample id)."""
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(count):
        (images / f"{i:05d}.png").write_bytes(image_bytes(i, size=(16, 12)))
        lines.append({"image": f"images/{i:05d}.png", "text": f"a picture number {i % 7}", "uid": i,
                      "num_objects": i % 3})
    return write_manifest(folder, lines, name)
