"""Names of the released checkpoint layout (rain1011/LaVIT-7B-v2, reference section 2).

Pure Python, shared by the MLX loader (`lavit_mlx.checkpoint`) and the PyTorch training
path (`lavit_train`), neither of which should need the other's framework.
"""

import re
from typing import Callable, Dict

RELEASE_FILES = {
    "eva": "visual_tokenizer/eva_vitg_psz14.bin",
    "tokenizer": "visual_tokenizer/tokenizer_encoder.bin",
    "understanding": "language_model/visual_weight.bin",
    "lowres_decoder": "visual_tokenizer/tokenizer_decoder.bin",
    "highres_decoder": "visual_tokenizer/highres_tokenizer_decoder.bin",
}

RELEASE_FOLDERS = {
    "llm": "language_model",
    "highres_pixel": "highres_pixel_decoding",
    "lowres_pixel": "pixel_decoding",
}

# What each component is used for, to say why a missing file matters.
PURPOSE = {
    "eva": "the EVA-CLIP image encoder",
    "tokenizer": "the visual tokenizer and its codebook",
    "understanding": "image understanding (caption, ask)",
    "lowres_decoder": "low-res pixel decoding",
    "highres_decoder": "high-res pixel decoding",
    "llm": "the language model",
    "highres_pixel": "high-res pixel decoding",
    "lowres_pixel": "low-res pixel decoding",
}

_TOKENIZER_PARTS = r"(token_predictor|causal_encoder|encode_task_layer|quantize|vit_proj)\."

# Harmless extras the release may carry (the official code loads these files with
# strict=False); any other unknown key is an error.
KNOWN_EXTRAS: Dict[str, Callable[[str], bool]] = {
    # The full DynamicVisualTokenizer state dict minus the ViT may include vit_proj.
    "tokenizer": lambda k: re.match(r"vit_proj\.", k) is not None,
    # A copy of other tokenizer parts next to the merger and projection.
    "understanding": lambda k: re.match(_TOKENIZER_PARTS, k) is not None,
    # Old transformers checkpoints saved rotary buffers.
    "llm": lambda k: k.endswith("rotary_emb.inv_freq"),
}

# The MLX folder format written by `lavit convert` (docs/mlx-format.md).
MLX_FORMAT = {
    "name": "lavit-mlx",
    "version": 2,  # 2: the nested LaVITConfig at the top level of config.json
    "readable_versions": (1, 2),
    # one safetensors file per vision component; above MAX_SHARD_BYTES it is split into
    # NAME-0000i-of-0000n.safetensors with a NAME.safetensors.index.json weight map
    "files": {
        "eva": "eva.safetensors",
        "tokenizer": "tokenizer.safetensors",
        "understanding": "understanding.safetensors",
        "lowres_decoder": "lowres_decoder.safetensors",
        "highres_decoder": "highres_decoder.safetensors",
        "codebook": "codebook.safetensors",  # always written: text-to-image needs only this
    },
    # UNet and VAE weights in MLX layout (convs OHWI) next to their diffusers config.json
    "pixel_weights": "diffusion_mlx_model",
    # the quantization setting that applies to each component
    "quantization_group": {
        "eva": "vision", "tokenizer": "vision", "understanding": "vision",
        "lowres_decoder": "vision", "highres_decoder": "vision",
        "llm": "llm", "highres_pixel": "unet", "lowres_pixel": "unet",
    },
    "manifest": "manifest.json",
}

MAX_SHARD_BYTES = 5 * 2**30
