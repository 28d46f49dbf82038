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

from pathlib import Path
from typing import Callable, Optional

from .errors import CheckpointError
from .layout import KNOWN_EXTRAS, PURPOSE, RELEASE_FILES, RELEASE_FOLDERS
from .weights import Weights, read_weights


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
