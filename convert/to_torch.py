"""MLX folder -> the released PyTorch layout, with the official key names.

The output is what `lavit_train` resumes from and what the official code loads: `.bin`
pickles readable by `torch.load(weights_only=True)` (the UNet too, since the official
code loads it with `use_safetensors=False`), the VAE as safetensors, diffusers configs,
the LLaMA as transformers shards with an index. Conv weights go back from MLX's OHWI to
OIHW; quantized layers are dequantized (lossy: only unquantized weights round-trip
bit-exactly). Components are written one at a time.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, Dict, Optional

import mlx.core as mx

from lavit_mlx.checkpoint import Checkpoint
from lavit_mlx.errors import LaVITError
from lavit_mlx.layout import MAX_SHARD_BYTES, MLX_FORMAT, RELEASE_FILES, RELEASE_FOLDERS
from lavit_mlx.weights import read_sharded, read_weights

from .torch_io import mx_to_torch, require_torch
from .writer import copy_files, nbytes, staged_folder

TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json",
                   "generation_config.json")


def dequantize_all(weights: Dict[str, mx.array], quantization: Optional[dict]) -> Dict[str, mx.array]:
    """Replace each quantized layer (weight, scales, biases) by its float weight."""
    if not quantization:
        return weights
    out = dict(weights)
    for key in [k for k in weights if k.endswith(".scales")]:
        stem = key[: -len(".scales")]
        out[f"{stem}.weight"] = mx.dequantize(
            weights[f"{stem}.weight"], weights[key], weights[f"{stem}.biases"],
            group_size=quantization["group_size"], bits=quantization["bits"],
        ).astype(weights[key].dtype)
        del out[key], out[f"{stem}.biases"]
    return out


def to_torch_layout(weights: Dict[str, mx.array]) -> dict:
    """MLX arrays -> torch tensors; 4-D conv weights (O, kh, kw, I) -> (O, I, kh, kw)."""
    return {k: mx_to_torch(v.transpose(0, 3, 1, 2) if v.ndim == 4 else v) for k, v in weights.items()}


def _save_bin(state: dict, path: Path) -> None:
    torch = require_torch("writing")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.contiguous() for k, v in state.items()}, path)


def _write_llm(ckpt: Checkpoint, out: Path, safetensors: bool) -> None:
    source = ckpt.folder("llm")
    config = json.loads((source / "config.json").read_text())
    quantization = config.pop("quantization", None)
    config.pop("quantization_config", None)
    out.mkdir(parents=True, exist_ok=True)
    shards = sorted(source.glob("model*.safetensors"))
    # Collect into output shards of at most MAX_SHARD_BYTES, one input shard at a time
    # (a quantized layer's parts always sit in the same input shard).
    groups, current, size = [], {}, 0
    for shard in shards:
        weights = dequantize_all(read_weights(shard), quantization)
        for key, value in weights.items():
            if current and size + nbytes(value) > MAX_SHARD_BYTES:
                groups.append(current)
                current, size = {}, 0
            current[key] = value
            size += nbytes(value)
    if current:
        groups.append(current)
    count = len(groups)
    weight_map, total = {}, 0
    for i, group in enumerate(groups, start=1):
        if safetensors:
            name = "model.safetensors" if count == 1 else f"model-{i:05d}-of-{count:05d}.safetensors"
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in to_torch_layout(group).items()}, str(out / name),
                      metadata={"format": "pt"})
        else:
            name = "pytorch_model.bin" if count == 1 else f"pytorch_model-{i:05d}-of-{count:05d}.bin"
            _save_bin(to_torch_layout(group), out / name)
        weight_map.update({k: name for k in group})
        total += sum(nbytes(v) for v in group.values())
    if count > 1:
        index = "model.safetensors.index.json" if safetensors else "pytorch_model.bin.index.json"
        (out / index).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config["torch_dtype"] = config.get("torch_dtype", "float16")
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)


def _write_pixel(ckpt: Checkpoint, component: str, out: Path) -> None:
    source = ckpt.folder(component)
    quantization = ckpt.quantization(component)
    for sub in ("unet", "vae"):
        weights = read_sharded(source / sub / f"{MLX_FORMAT['pixel_weights']}.safetensors")
        state = to_torch_layout(dequantize_all(weights, quantization))
        (out / sub).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / sub / "config.json", out / sub / "config.json")
        if sub == "unet":  # the official code loads the UNet with use_safetensors=False
            _save_bin(state, out / sub / "diffusion_pytorch_model.bin")
        else:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in state.items()}, str(out / sub / "diffusion_pytorch_model.safetensors"))
    copy_files(source / "scheduler", out / "scheduler")
    if component == "lowres_pixel":
        uncond = read_weights(source / "uncond_embeddings.safetensors")["uncond_embeddings"]
        _save_bin_tensor(mx_to_torch(uncond), out / "uncond_embeddings.bin")


def _save_bin_tensor(tensor, path: Path) -> None:
    torch = require_torch("writing")
    torch.save(tensor.contiguous(), path)


def convert_to_torch(src, out, force: bool = False, safetensors: bool = False,
                     progress: Optional[Callable[[str], None]] = None) -> list:
    """Write an MLX folder back in the released layout; returns the components written.

    Quantized components are dequantized (the quantization error stays); `progress` is
    told so, with the component's bits.
    """
    require_torch("writing")
    ckpt = Checkpoint.open(src)
    if ckpt.kind != "mlx":
        raise LaVITError(f"{src} is not an MLX folder (convert a released checkpoint with `lavit convert SRC OUT`)")
    for group, quantization in (ckpt.stored.get("quantization") or {}).items():
        if quantization and progress:
            progress(f"note: the {group} weights are stored {quantization['bits']}-bit; they are dequantized "
                     "(the quantization error stays, the output is not the original model)")
    written = []
    with staged_folder(Path(out), force) as staging:
        for component in ("eva", "tokenizer", "understanding", "lowres_decoder", "highres_decoder"):
            if not ckpt.has(component):
                continue
            if progress:
                progress(component)
            weights = dequantize_all(ckpt.weights(component), ckpt.quantization(component))
            _save_bin(to_torch_layout(weights), staging / RELEASE_FILES[component])
            written.append(component)
        if ckpt.has("llm"):
            if progress:
                progress("llm")
            _write_llm(ckpt, staging / RELEASE_FOLDERS["llm"], safetensors)
            written.append("llm")
        for component in ("highres_pixel", "lowres_pixel"):
            if ckpt.has(component):
                if progress:
                    progress(component)
                _write_pixel(ckpt, component, staging / RELEASE_FOLDERS[component])
                written.append(component)
    return written
