"""PyTorch pickles and tensors for the converters: the safe reader lives in
`lavit_mlx.torch_pickle` (inference reads released `.bin` files without this package)."""

from lavit_mlx.torch_pickle import LazyTensors, load_pickle, mx_to_torch, read_torch_file, require_torch, tensor_to_mx

__all__ = ["LazyTensors", "load_pickle", "mx_to_torch", "read_torch_file", "require_torch", "tensor_to_mx"]
