"""Where each component's weights live in a checkpoint folder.

The released layout (rain1011/LaVIT-7B-v2, LAVIT_REFERENCE.md section 2):

    language_model/            LLaMA shards, index, config.json, tokenizer.model
    language_model/visual_weight.bin           merger + vit_proj for understanding
    visual_tokenizer/eva_vitg_psz14.bin        EVA-CLIP ViT-g/14
    visual_tokenizer/tokenizer_encoder.bin     selector, merger, quantizer
    visual_tokenizer/tokenizer_decoder.bin     low-res VQ decoder
    visual_tokenizer/highres_tokenizer_decoder.bin  high-res VQ decoder
    highres_pixel_decoding/{unet,vae,scheduler}/    SDXL-shaped diffusers folders
    pixel_decoding/{unet,vae,scheduler}/, pixel_decoding/uncond_embeddings.bin

This module only names files and reads them; building modules is `lavit.py`'s job.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Dict, Optional

from .errors import CheckpointError
from .weights import Weights, read_weights

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


class Checkpoint:
    """A LaVIT checkpoint folder in the released layout."""

    kind = "release"

    def __init__(self, path: Path):
        self.path = Path(path)

    @classmethod
    def open(cls, path) -> "Checkpoint":
        path = Path(path).expanduser()
        if not path.exists():
            raise CheckpointError(f"checkpoint folder not found: {path}")
        if not path.is_dir():
            raise CheckpointError(f"{path}: not a folder (expected a LaVIT checkpoint folder)")
        known = [p for p in list(RELEASE_FILES.values()) + list(RELEASE_FOLDERS.values())
                 if (path / p).exists()]
        if not known:
            raise CheckpointError(
                f"{path}: not a LaVIT checkpoint folder (found neither visual_tokenizer/ nor "
                "language_model/ of the released layout)"
            )
        return cls(path)

    def describe(self) -> str:
        return f"released LaVIT layout (PyTorch pickles) at {self.path}"

    def file(self, component: str) -> Path:
        path = self.path / RELEASE_FILES[component]
        if not path.is_file():
            raise CheckpointError(
                f"checkpoint {self.path} is missing {RELEASE_FILES[component]} "
                f"(needed for {PURPOSE[component]})"
            )
        return path

    def folder(self, component: str) -> Path:
        path = self.path / RELEASE_FOLDERS[component]
        if not path.is_dir():
            raise CheckpointError(
                f"checkpoint {self.path} is missing {RELEASE_FOLDERS[component]}/ "
                f"(needed for {PURPOSE[component]})"
            )
        return path

    def has(self, component: str) -> bool:
        if component in RELEASE_FILES:
            return (self.path / RELEASE_FILES[component]).is_file()
        return (self.path / RELEASE_FOLDERS[component]).is_dir()

    def weights(self, component: str, keys: Optional[set] = None) -> Weights:
        return read_weights(self.file(component), keys=keys)

    def known_extra(self, component: str) -> Optional[Callable[[str], bool]]:
        return KNOWN_EXTRAS.get(component)
