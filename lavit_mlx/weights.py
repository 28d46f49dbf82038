"""Weight files in and out of MLX modules, strictly.

`.safetensors` are read by MLX itself. `.bin` pickles are read by `lavit_mlx.torch_pickle`
(torch, `weights_only=True`), imported only when such a file is met, so this package
runs without torch on MLX-format folders.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Dict, Mapping, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .errors import CheckpointError
from .layout import check_state

Weights = Dict[str, mx.array]


def read_weights(path: Path, keys: Optional[set] = None) -> Weights:
    """Read a `.bin`/`.pt`/`.pth` pickle or a `.safetensors` file as {key: mx.array}.

    Args:
        keys: read only these keys (others are left on disk where the format allows).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing weight file {path}")
    if path.suffix == ".safetensors":
        try:
            weights = dict(mx.load(str(path)))
        except Exception as exc:  # mlx raises plain ValueError/RuntimeError on bad files
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
        return {k: v for k, v in weights.items() if keys is None or k in keys}
    from .torch_pickle import read_torch_file

    weights = read_torch_file(path, keys=keys)
    if isinstance(weights, mx.array):
        raise CheckpointError(f"{path}: expected a state dict, found a single tensor")
    return weights


def read_json(path: Path) -> dict:
    """A checkpoint's JSON file (config, index); a bad one is a one-line CheckpointError."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None


def read_sharded(path: Path, keys: Optional[set] = None) -> Weights:
    """Read `path`, or the shards listed in `path.index.json` when it was split."""
    path = Path(path)
    if path.is_file():
        return read_weights(path, keys=keys)
    index = Path(str(path) + ".index.json")
    if not index.is_file():
        raise CheckpointError(f"missing weight file {path}")
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index}: not a valid shard index ({exc})") from None
    weights: Weights = {}
    for shard in sorted(set(weight_map.values())):
        wanted = None if keys is None else {k for k in keys if weight_map.get(k) == shard}
        if wanted is not None and not wanted:
            continue
        part = read_weights(path.parent / shard, keys=wanted)
        missing = [k for k, s in weight_map.items() if s == shard and k not in part and (keys is None or k in keys)]
        if missing:
            raise CheckpointError(f"{path.parent / shard}: missing key {missing[0]!r} listed in {index.name}")
        weights.update(part)
    return weights


def read_tensor(path: Path) -> mx.array:
    """Read a file that holds one tensor (e.g. `uncond_embeddings.bin`)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing weight file {path}")
    if path.suffix == ".safetensors":
        weights = read_weights(path)
        if len(weights) != 1:
            raise CheckpointError(f"{path}: expected one tensor, found {len(weights)}")
        return next(iter(weights.values()))
    from .torch_pickle import read_torch_file

    tensor = read_torch_file(path)
    if not isinstance(tensor, mx.array):
        raise CheckpointError(f"{path}: expected a single tensor, found a state dict")
    return tensor


def shapes(weights: Mapping[str, mx.array]) -> Dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in weights.items()}


def load_strict(
    module: nn.Module,
    weights: Mapping[str, mx.array],
    source: str,
    known_extra: Optional[Callable[[str], bool]] = None,
    dtype: Optional[mx.Dtype] = mx.float32,
) -> nn.Module:
    """Load `weights` into `module`, requiring every parameter with its exact shape.

    Keys the module does not have are an error unless `known_extra(key)` accepts them
    (the harmless extras the release is known to carry). Errors name the key and
    `source` (the file or folder the weights came from).
    """
    expected = dict(tree_flatten(module.parameters()))
    check_state(shapes(expected), shapes(weights), source, known_extra)
    loaded = [
        (k, weights[k].astype(dtype) if dtype is not None and mx.issubdtype(weights[k].dtype, mx.floating) else weights[k])
        for k in expected
    ]
    module.load_weights(loaded, strict=True)
    mx.eval(module.parameters())
    # MLX builds modules in training mode; loaded weights are for inference until a
    # trainer says otherwise (the tokenizer samples its selection in training mode)
    return module.eval()
