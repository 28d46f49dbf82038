"""Names of the released checkpoint layout (rain1011/LaVIT-7B-v2, reference section 2)
and the strict key/shape rule every loader applies to it (`check_state`).

Pure Python, shared by the MLX loader (`lavit_mlx.checkpoint`) and the PyTorch training
path (`lavit_train`), neither of which should need the other's framework.
"""

import re
from typing import Callable, Dict, Mapping, Optional, Sequence

from .errors import CheckpointError

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



def check_state(
    expected: Mapping[str, Sequence[int]],
    found: Mapping[str, Sequence[int]],
    source: str,
    known_extra: Optional[Callable[[str], bool]] = None,
) -> None:
    """The strict-loading rule of both loaders (MLX `weights.load_strict`, PyTorch
    `lavit_train.checkpoint.load_state_strict`): every key the model has, with its exact
    shape, and no key that belongs nowhere.

    Args:
        expected: {key: shape} of the model's parameters.
        found: {key: shape} of the weights to load.
        source: the file or folder the weights came from, named in the error.
        known_extra: accepts the harmless extras the release is known to carry.

    Raises:
        CheckpointError: one line naming the first missing key, then the first key of the
            wrong shape, then the first unexpected key (and how many more of that kind).
    """
    missing = [k for k in expected if k not in found]
    wrong = [
        (k, tuple(found[k]), tuple(expected[k]))
        for k in expected
        if k in found and tuple(found[k]) != tuple(expected[k])
    ]
    unexpected = [k for k in found if k not in expected and not (known_extra and known_extra(k))]

    def more(items):
        return f" (and {len(items) - 1} more)" if len(items) > 1 else ""

    if missing:
        raise CheckpointError(f"{source}: missing key {missing[0]!r}{more(missing)}")
    if wrong:
        key, got, want = wrong[0]
        raise CheckpointError(f"{source}: key {key!r} has shape {got}, the model expects {want}{more(wrong)}")
    if unexpected:
        raise CheckpointError(
            f"{source}: unexpected key {unexpected[0]!r}{more(unexpected)} belongs to no known component"
        )


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
