"""Random LaVIT checkpoints in the released layout, at any size.

Written by the PyTorch mirror with the official keys, as `.bin` pickles like the
release (float16 or bfloat16). Tests use them as fixtures of other sizes and dtypes than
`official-tiny`; benchmarks use them at full size.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from lavit_mlx.config import EVAConfig, TokenizerConfig, mlp_width
from lavit_mlx.layout import RELEASE_FILES

from .models.eva_vit import EVAVisionTransformer
from .models.visual_tokenizer import DynamicVisualTokenizer


@dataclass
class TinySpec:
    width: int = 64
    heads: int = 4
    eva_depth: int = 2
    merger_depth: int = 1
    codebook_size: int = 16384
    code_dim: int = 32
    llm_hidden: int = 48
    vocab_size: int = 48386
    dtype: torch.dtype = torch.bfloat16
    seed: int = 0
    keep_fraction: float = 0.4  # bias the selector towards keeping this share of patches

    def eva_config(self) -> EVAConfig:
        return EVAConfig(width=self.width, depth=self.eva_depth, num_heads=self.heads,
                         mlp_dim=mlp_width(self.width), head_dim_out=self.width)

    def tokenizer_config(self) -> TokenizerConfig:
        return TokenizerConfig(width=self.width, merger_depth=self.merger_depth, num_heads=self.heads,
                               mlp_dim=mlp_width(self.width), codebook_size=self.codebook_size,
                               code_dim=self.code_dim)


def _randomize(module: torch.nn.Module, std: float = 0.05) -> None:
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name or "ln_" in name or "in_conv.0" in name:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.05)
            else:
                p.normal_(0.0, std)


def _save(state: dict, path: Path, dtype: torch.dtype) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().to(dtype).contiguous() for k, v in state.items()}, path)


def build_vision(spec: TinySpec):
    """(eva, tokenizer, understanding) mirror modules with random weights, in float32."""
    torch.manual_seed(spec.seed)
    eva = EVAVisionTransformer(spec.eva_config()).eval()
    tokenizer = DynamicVisualTokenizer(spec.tokenizer_config()).eval()
    understanding = DynamicVisualTokenizer(spec.tokenizer_config(), quantizer=False,
                                           llm_hidden=spec.llm_hidden).eval()
    for module in (eva, tokenizer, understanding):
        _randomize(module)
    with torch.no_grad():
        codebook = tokenizer.quantize.embedding.weight
        codebook.copy_(torch.nn.functional.normalize(codebook, dim=-1))
        # Calibrate the keep bias on random images so that about `keep_fraction` is kept.
        generator = torch.Generator().manual_seed(spec.seed)
        pixels = torch.randn(4, 3, eva.config.image_size, eva.config.image_size, generator=generator)
        head = tokenizer.token_predictor.out_conv[-1]
        head.weight.mul_(20.0)
        logprobs = tokenizer.token_predictor(eva(pixels)[:, 1:])
        margin = (logprobs[..., 0] - logprobs[..., 1]).flatten()
        head.bias.add_(torch.tensor([-float(margin.quantile(1.0 - spec.keep_fraction)), 0.0]))
        understanding.token_predictor.load_state_dict(tokenizer.token_predictor.state_dict())
    return eva, tokenizer, understanding


def write_release_checkpoint(out: Path, spec: TinySpec = TinySpec()) -> Path:
    """Write the vision side of a release-layout checkpoint (EVA, tokenizer, understanding
    weights, `language_model/config.json`) to `out`; returns `out`."""
    out = Path(out)
    eva, tokenizer, understanding = build_vision(spec)
    _save(eva.state_dict(), out / RELEASE_FILES["eva"], spec.dtype)
    _save(tokenizer.state_dict(), out / RELEASE_FILES["tokenizer"], spec.dtype)
    visual = {k: v for k, v in understanding.state_dict().items() if not k.startswith("token_predictor.")}
    _save(visual, out / RELEASE_FILES["understanding"], spec.dtype)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": spec.llm_hidden,
        "intermediate_size": 4 * spec.llm_hidden, "num_attention_heads": 4, "num_hidden_layers": 2,
        "num_key_value_heads": 4, "rms_norm_eps": 1e-5, "vocab_size": spec.vocab_size,
        "max_position_embeddings": 512, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
    }
    (out / "language_model" / "config.json").write_text(json.dumps(config, indent=2))
    return out


def write_training_fixture(out: Path, width: int = 64, heads: int = 4, image_size: int = 56, patch: int = 14,
                           codebook: int = 256, images: int = 64, seed: int = 0) -> dict:
    """Starting points of the three training stages at a small size, for benchmarks and smoke runs.

    Writes `release/` (EVA, tokenizer, high-res VQ decoder in the released layout, float32),
    `pixel/` (a small diffusers VAE and a DDIM scheduler config), `text/` (a 256-piece
    sentencepiece model) and `data/train.jsonl` with `images` random pictures.

    Returns:
        {"release", "pixel", "text", "data", "model", "unet"}: paths, and the `model:` keys of a
        tokenizer run and the UNet sizes of a pixel run at this size.
    """
    import io

    import numpy as np
    from diffusers import AutoencoderKL
    from PIL import Image

    from lavit_mlx.config import VQDecoderConfig
    from lavit_mlx.shapes import train_text_tokenizer

    from .models.vq_decoder import VQDecoder

    out = Path(out)
    torch.manual_seed(seed)
    eva_config = EVAConfig(width=width, depth=2, num_heads=heads, mlp_dim=mlp_width(width), patch_size=patch,
                           image_size=image_size, head_dim_out=width)
    tokenizer_config = TokenizerConfig(width=width, merger_depth=2, num_heads=heads, mlp_dim=mlp_width(width),
                                       codebook_size=codebook, code_dim=16)
    decoder_config = VQDecoderConfig(highres=True, width=width, depth=2, num_heads=heads, mlp_dim=mlp_width(width),
                                     code_dim=16, num_patches=eva_config.num_patches, feature_dim=width,
                                     context_dims=(32, 32), pooled_dim=32)
    modules = {"eva": EVAVisionTransformer(eva_config), "tokenizer": DynamicVisualTokenizer(tokenizer_config),
               "highres_decoder": VQDecoder(decoder_config)}
    for name, module in modules.items():
        _randomize(module)
        _save(module.state_dict(), out / "release" / RELEASE_FILES[name], torch.float32)
    vae = {"block_out_channels": [16, 32], "down_block_types": ["DownEncoderBlock2D"] * 2,
           "up_block_types": ["UpDecoderBlock2D"] * 2, "latent_channels": 4, "norm_num_groups": 8}
    AutoencoderKL(**vae).save_pretrained(out / "pixel" / "vae")
    scheduler = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
                 "beta_end": 0.012, "beta_schedule": "scaled_linear", "prediction_type": "epsilon"}
    (out / "pixel" / "scheduler").mkdir(parents=True, exist_ok=True)
    (out / "pixel" / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    text = train_text_tokenizer(out / "text").parent
    rng = np.random.default_rng(seed)
    (out / "data" / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(images):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (image_size, image_size, 3), dtype=np.uint8)).save(buffer, "PNG")
        (out / "data" / "images" / f"{i:05d}.png").write_bytes(buffer.getvalue())
        lines.append(json.dumps({"image": f"images/{i:05d}.png", "text": f"a picture number {i % 9}"}))
    (out / "data" / "train.jsonl").write_text("\n".join(lines) + "\n")
    model = {"merger_depth": 2, "num_heads": heads, "codebook_size": codebook, "code_dim": 16,
             "highres_decoder": {"width": width, "depth": 2, "num_heads": heads, "context_dims": [32, 32],
                                 "pooled_dim": 32}}
    unet = {"block_out_channels": [32, 64], "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "layers_per_block": 1, "norm_num_groups": 8,
            "attention_head_dim": 8, "addition_time_embed_dim": 8, "sample_size": 16}
    return {"release": out / "release", "pixel": out / "pixel", "text": text, "data": out / "data" / "train.jsonl",
            "model": model, "unet": unet}
