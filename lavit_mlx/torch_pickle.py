"""Reading PyTorch pickles safely: `torch.load(..., weights_only=True)` and nothing else.

torch is imported only when a pickle is met, so MLX folders need no torch.

A `.bin` file of the release is a pickle. Unpickling arbitrary objects can run code, so
only tensors (and the containers around them) are accepted; anything else is refused
with a message naming the file.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Union

from .errors import CheckpointError, MissingDependencyError


def require_torch(purpose: str = "reading"):
    """torch, or a one-line error saying what needs it: "reading" released `.bin`
    pickles, or "writing" PyTorch checkpoints (`--to torch`)."""
    try:
        import torch
    except ImportError:
        if purpose == "writing":
            raise MissingDependencyError(
                "writing PyTorch checkpoints (--to torch) needs torch: pip install 'lavit-mlx[torch]'"
            ) from None
        raise MissingDependencyError(
            "reading PyTorch .bin checkpoints needs torch: pip install 'lavit-mlx[torch]', "
            "or convert the checkpoint once with `lavit convert` on a machine that has it"
        ) from None
    return torch


def tensor_to_mx(tensor):
    """A CPU torch tensor as an mx.array of the same dtype (bfloat16 included)."""
    import mlx.core as mx

    torch = require_torch()
    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
        return mx.array(tensor.view(torch.int16).numpy()).view(mx.bfloat16)
    return mx.array(tensor.numpy())


def load_pickle(path: Union[str, Path]):
    """torch.load with weights_only=True (and mmap when the file allows it)."""
    torch = require_torch()
    path = Path(path)
    try:
        mmap = zipfile.is_zipfile(path)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) (\S+)", text)
        if found:
            raise CheckpointError(
                f"{path}: refused to unpickle: the file holds a Python object ({found.group(1)}), "
                "not only tensors; only weights are ever loaded"
            ) from None
        detail = re.search(r"WeightsUnpickler error:\s*(.+)", text)
        reason = detail.group(1).strip() if detail else "unreadable pickle"
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({reason})") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({message})") from None


def read_torch_file(path: Union[str, Path], keys=None):  # -> dict of mx.array | mx.array
    """A pickled state dict as {key: mx.array}, or a pickled bare tensor as an mx.array.

    With `keys`, only those entries are converted (the file is memory-mapped, so the
    others are never read from disk).
    """
    torch = require_torch()
    obj = load_pickle(path)
    if isinstance(obj, torch.Tensor):
        return tensor_to_mx(obj)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict of tensors, found {type(obj).__name__}")
    out = {}
    for key, value in obj.items():
        if keys is not None and key not in keys:
            continue
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
        out[str(key)] = tensor_to_mx(value)
    return out




class LazyTensors:
    """The tensors of one weight file, read one at a time.

    `.bin` pickles are memory-mapped (zip format) and `.safetensors` opened with
    `safe_open`, so converting a file tensor by tensor keeps memory near one tensor,
    not the whole file.
    """

    def __init__(self, path: Union[str, Path]):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"missing weight file {self.path}")
        if self.path.suffix == ".safetensors":
            require_torch()
            from safetensors import safe_open

            try:
                self._handle = safe_open(str(self.path), framework="pt")
            except Exception as exc:
                raise CheckpointError(f"{self.path}: not a readable safetensors file ({exc})") from None
            self.shapes = {k: tuple(self._handle.get_slice(k).get_shape()) for k in self._handle.keys()}
            self._state = None
        else:
            torch = require_torch()
            state = load_pickle(self.path)
            if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
                state = state["state_dict"]
            if isinstance(state, torch.Tensor):
                state = {"": state}
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                raise CheckpointError(f"{self.path}: expected a state dict of tensors")
            self._state, self._handle = state, None
            self.shapes = {k: tuple(v.shape) for k, v in state.items()}

    def keys(self):
        return list(self.shapes)

    def get(self, key: str):
        """One tensor as an mx.array in its stored dtype."""
        tensor = self._handle.get_tensor(key) if self._state is None else self._state[key]
        return tensor_to_mx(tensor)

    def close(self) -> None:
        """Drop the mapping (its pages stop counting towards this process's memory)."""
        self._state = None
        self._handle = None

    def dtypes(self) -> set:
        if self._state is not None:
            return {str(v.dtype).replace("torch.", "") for v in self._state.values()}
        return {str(self._handle.get_slice(k).get_dtype()).lower() for k in self.shapes}


def mx_to_torch(array):
    """An mx.array as a CPU torch tensor of the same dtype (bfloat16 included)."""
    import mlx.core as mx
    import numpy as np

    torch = require_torch()
    if array.dtype == mx.bfloat16:
        return torch.from_numpy(np.array(array.view(mx.uint16)).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.array(array))
