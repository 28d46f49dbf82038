"""Resolving a conversion source: a local folder or a Hugging Face repo id.

For a repo id only the files the requested components need are fetched (the release is
~26 GB; text-to-image alone does not need the 4 GB EVA encoder). `HF_HUB_OFFLINE=1` is
honoured: the files must then already be in the Hugging Face cache.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable, List

from lavit_mlx.errors import LaVITError

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# Files of the released layout each component needs (the codebook is always needed).
PATTERNS = {
    "eva": ["visual_tokenizer/eva_vitg_psz14.bin"],
    "tokenizer": [],
    "understanding": ["language_model/visual_weight.bin"],
    "lowres_decoder": ["visual_tokenizer/tokenizer_decoder.bin"],
    "highres_decoder": ["visual_tokenizer/highres_tokenizer_decoder.bin"],
    "llm": ["language_model/config.json", "language_model/pytorch_model*.bin", "language_model/*.bin.index.json",
            "language_model/model*.safetensors", "language_model/*.safetensors.index.json",
            "language_model/tokenizer*", "language_model/special_tokens_map.json",
            "language_model/generation_config.json"],
    "highres_pixel": [f"highres_pixel_decoding/{sub}/*" for sub in ("unet", "vae", "scheduler")],
    "lowres_pixel": [f"pixel_decoding/{sub}/*" for sub in ("unet", "vae", "scheduler")]
    + ["pixel_decoding/uncond_embeddings.bin"],
}
ALWAYS = ["visual_tokenizer/tokenizer_encoder.bin", "language_model/config.json"]


def allow_patterns(components: Iterable[str]) -> List[str]:
    patterns = list(ALWAYS)
    for component in components:
        patterns += PATTERNS[component]
    return sorted(set(patterns))


def resolve_source(src: str, components: Iterable[str]) -> Path:
    """A local folder as is; a repo id downloaded (or found in the cache when offline)."""
    path = Path(src).expanduser()
    if path.exists():
        return path
    if not REPO_ID.match(src):
        raise LaVITError(f"{src}: no such folder (nor a Hugging Face repo id like rain1011/LaVIT-7B-v2)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    try:
        folder = snapshot_download(src, allow_patterns=allow_patterns(components), local_files_only=offline,
                                   cache_dir=os.environ.get("HF_HUB_CACHE") or None)
    except RepositoryNotFoundError:
        raise LaVITError(f"{src}: no such repository on the Hugging Face Hub (or it is private)") from None
    except GatedRepoError:
        raise LaVITError(f"{src}: gated repository; log in with `hf auth login` after accepting its terms") from None
    except LocalEntryNotFoundError:
        if offline:
            raise LaVITError(f"{src} is not in the Hugging Face cache and HF_HUB_OFFLINE is set") from None
        raise LaVITError(f"could not reach the Hugging Face Hub to fetch {src} (offline?)") from None
    except (HfHubHTTPError, OSError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise LaVITError(f"could not fetch {src} from the Hugging Face Hub: {message}") from None
    return Path(folder)
