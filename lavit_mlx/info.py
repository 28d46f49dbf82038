"""What `lavit info --model` reports about a checkpoint: its format and components, the
LLM's size and weight memory at each precision, the special ids and the head count.

Everything is computed from the config and file headers; no weights are loaded.
"""

from __future__ import annotations

import mlx.nn as nn
from mlx.utils import tree_flatten

from .config import RELEASE_VISION_HEADS, RELEASE_VISION_WIDTH
from .errors import CheckpointError
from .layout import PURPOSE


def describe(model) -> dict:
    """{label: text} for a `LaVIT`."""
    checkpoint, config = model.checkpoint, model.config
    info = {"checkpoint": checkpoint.describe()}
    present = [name for name in PURPOSE if checkpoint.has(name)]
    absent = [name for name in PURPOSE if name not in present]
    info["components"] = ", ".join(present) or "none"
    if absent:
        info["missing"] = ", ".join(absent)
    if config.llm is not None:
        llm = config.llm
        info["llm"] = f"llama, hidden {llm.hidden_size}, {llm.num_hidden_layers} layers, vocab {llm.vocab_size}"
        info["llm memory"] = llm_memory_line(config.llm, model.group_size)
    ids = config.token_ids
    info["token ids"] = (
        f"[IMG]={ids.image_start} [/IMG]={ids.image_end} visual={ids.visual_offset}..{ids.vocab_size - 1}"
    )
    info["vision heads"] = vision_heads_line(model)
    return info


def vision_heads_line(model) -> str:
    """Where the vision head count comes from: stored, given, the release's, or unknown."""
    config = model.config
    parts = [c for c in (config.vision, config.tokenizer, config.highres_decoder, config.lowres_decoder) if c]
    if not parts:
        return "not needed (no vision component)"
    if model.checkpoint.kind == "mlx":
        return f"{parts[0].num_heads} (stored in the MLX folder)"
    if model.vision_heads is not None:
        return f"{model.vision_heads} (given)"
    if all(p.width == RELEASE_VISION_WIDTH for p in parts):
        return f"{RELEASE_VISION_HEADS} (the release's, for its width {RELEASE_VISION_WIDTH})"
    width = next(p.width for p in parts if p.width != RELEASE_VISION_WIDTH)
    return f"unknown: the width {width} is not the release's, pass --vision-heads"


def llm_memory_line(llm_config, group_size: int = 64) -> str:
    """LLM weight memory at float32/float16/8-bit/4-bit (counted on the unmaterialised model)."""
    from .models.llm import build_llama

    try:
        model = build_llama(llm_config)
    except (CheckpointError, TypeError, ValueError) as exc:
        return f"unknown ({exc})"
    float_bytes = sum(v.size for _, v in tree_flatten(model.parameters()))
    parts = [f"float32 {4 * float_bytes / 2**30:.2f} GiB", f"float16 {2 * float_bytes / 2**30:.2f} GiB"]
    for bits in (8, 4):
        total = 0
        for _, layer in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module):
            for name, value in tree_flatten(layer.parameters()):
                quantizable = hasattr(layer, "to_quantized") and name == "weight" and value.shape[-1] % group_size == 0
                # packed weights + a float16 scale and bias per group
                total += value.size * bits / 8 + value.size / group_size * 4 if quantizable else value.size * 2
        parts.append(f"{bits}-bit {total / 2**30:.2f} GiB")
    return ", ".join(parts)
