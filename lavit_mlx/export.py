"""Writing built components into an MLX folder (docs/mlx-format.md), e.g. at the end of a
training stage, so that `lavit_mlx.load(folder)` and every command read them.

`save_components(folder, config, {"tokenizer": module, ...})` writes each component's
weights (official key names, MLX layout), merges its config into the folder's
config.json (other components already there are kept), and rewrites the manifest. Every
file is written to a temporary name and renamed, so a folder is never left half-written
per file; a model built stage by stage accumulates in one folder.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .checkpoint import sha256
from .config import COMPONENT_FIELDS, LaVITConfig
from .errors import LaVITError
from .layout import MLX_FORMAT, RELEASE_FOLDERS

TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json")


def _atomic_safetensors(path: Path, arrays: Dict[str, mx.array]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".safetensors", dir=path.parent)
    os.close(handle)
    try:
        mx.save_safetensors(temporary, arrays, metadata={"format": "mlx"})
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def atomic_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as stream:
            stream.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _weights(module: nn.Module, dtype: Optional[mx.Dtype]) -> Dict[str, mx.array]:
    out = {}
    for key, value in tree_flatten(module.parameters()):
        if dtype is not None and mx.issubdtype(value.dtype, mx.floating):
            value = value.astype(dtype)
        out[key] = value
    return out


def _read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        return {"format": MLX_FORMAT["name"], "format_version": MLX_FORMAT["version"], "components": []}
    stored = json.loads(path.read_text())
    if stored.get("format") != MLX_FORMAT["name"]:
        raise LaVITError(f"{path}: not a lavit-mlx folder; refusing to write into it")
    return stored


def save_components(folder, config: LaVITConfig, modules: Dict[str, nn.Module], dtype: Optional[mx.Dtype] = None,
                    text_tokenizer: Optional[Path] = None) -> Path:
    """Write components into the MLX folder `folder` (created if needed).

    Args:
        config: the model's config; the entries of the written components (and the token
            ids) are merged into the folder's config.json.
        modules: component name -> built module: 'eva', 'tokenizer', 'understanding',
            'lowres_decoder', 'highres_decoder' (their modules), 'llm' (a `LanguageModel`),
            'highres_pixel' / 'lowres_pixel' (a `PixelDecoder`).
        dtype: cast floating weights to this (None: as they are).
        text_tokenizer: a folder with the sentencepiece `tokenizer.model` (and its
            tokenizer_config.json) for the LLM.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stored = _read_config(folder)
    for name, module in modules.items():
        if name in MLX_FORMAT["files"] and name != "codebook":
            weights = _weights(module, dtype)
            _atomic_safetensors(folder / MLX_FORMAT["files"][name], weights)
            if name == "tokenizer":
                codebook = weights["quantize.embedding.weight"].astype(mx.float32)
                _atomic_safetensors(folder / MLX_FORMAT["files"]["codebook"], {"quantize.embedding.weight": codebook})
        elif name == "llm":
            _save_llm(folder / RELEASE_FOLDERS["llm"], module, config, dtype, text_tokenizer)
        elif name in ("highres_pixel", "lowres_pixel"):
            _save_pixel(folder / RELEASE_FOLDERS[name], module, name, config, dtype)
        else:
            raise LaVITError(f"unknown component {name!r}")
        field = COMPONENT_FIELDS.get(name, name)
        stored[field] = config.to_dict()[field]
        if name == "understanding":
            stored["understanding_dim"] = config.understanding_dim
        if name not in stored["components"]:
            stored["components"].append(name)
    stored["token_ids"] = config.token_ids.to_dict()
    stored.setdefault("quantization", config.quantization.to_dict())
    stored["format_version"] = MLX_FORMAT["version"]
    atomic_text(folder / "config.json", json.dumps(stored, indent=2))
    write_manifest(folder)
    return folder


def _save_llm(folder: Path, lm, config: LaVITConfig, dtype, text_tokenizer: Optional[Path]) -> None:
    _atomic_safetensors(folder / "model.safetensors", _weights(lm.model, dtype))
    llm_config = config.llm.to_hf()
    atomic_text(folder / "config.json", json.dumps(llm_config, indent=2))
    if text_tokenizer is not None:
        for name in TOKENIZER_FILES:
            source = Path(text_tokenizer) / name
            if source.is_file() and source.resolve() != (folder / name).resolve():
                shutil.copyfile(source, folder / name)
    if not (folder / "tokenizer.model").is_file():
        raise LaVITError(f"{folder}: the LLM needs its text tokenizer (tokenizer.model): pass text_tokenizer")


def _save_pixel(folder: Path, decoder, name: str, config: LaVITConfig, dtype) -> None:
    part = config.component(name)
    for sub, module, sub_config in (("unet", decoder.unet, part.unet), ("vae", decoder.vae, part.vae)):
        _atomic_safetensors(folder / sub / f"{MLX_FORMAT['pixel_weights']}.safetensors",
                            _weights(module, dtype if sub == "unet" else None))
        atomic_text(folder / sub / "config.json", json.dumps(sub_config, indent=2))
    atomic_text(folder / "scheduler" / "scheduler_config.json", json.dumps(part.scheduler, indent=2))
    if name == "lowres_pixel":
        _atomic_safetensors(folder / "uncond_embeddings.safetensors",
                            {"uncond_embeddings": decoder.uncond_embeddings.astype(mx.float32)})


def write_manifest(folder: Path) -> Path:
    """A sha256 and size of every file in `folder` (except the manifest itself)."""
    folder = Path(folder)
    name = MLX_FORMAT["manifest"]
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != name and not p.name.startswith(".")):
        files[str(path.relative_to(folder))] = {"bytes": path.stat().st_size, "sha256": sha256(path)}
    atomic_text(folder / name, json.dumps({"files": files}, indent=2))
    return folder / name
