"""The operations LaVIT's models call: one facade over two backends.

In float32 on MLX's CPU device the fast kernels of `lavit_mlx.cpu` run (polynomial
GELU/exp/SiLU, fused GroupNorm, Winograd convolutions; see their modules for why);
anywhere else (a GPU, half precision) MLX's own operations do. Models never look at the
device themselves. Every function here is differentiable and safe inside `mx.compile`.

Attention whose (B, heads, N, L) scores would exceed `ATTENTION_SINGLE_PASS_BYTES` runs
over query chunks of at most `ATTENTION_CHUNK_BYTES` of scores, on the CPU and on a GPU
alike (MLX's `scaled_dot_product_attention` materialises the scores for head sizes its
fused kernel lacks): a 1024^2 SDXL latent has 16384 tokens, and the full (tokens x
tokens) matrix of one head is 1 GiB. A single array larger than memory is never a
clean error in MLX: its CPU allocator hands a failed `malloc` to the kernel, which
segfaults.
"""

from __future__ import annotations

import math
import threading
from contextlib import contextmanager
from typing import Callable, Optional

import mlx.core as mx

from .cpu import conv as _conv
from .cpu import kernels as _kernels

ATTENTION_SINGLE_PASS_BYTES = 256 * 2**20  # scores up to this size: one pass, as tuned
# Chunks stay small because MLX allocates each operation's output when it queues it, up
# to ~10 operations ahead of the one running: several chunks are alive at once.
ATTENTION_CHUNK_BYTES = 64 * 2**20
POLICY_EPS = 1e-6  # the merger's masked softmax (official `softmax_with_policy`)

_state = threading.local()


def cpu_kernels(x: mx.array) -> bool:
    """Whether `x` is computed by the CPU kernels (float32 on the CPU device)."""
    return x.dtype == mx.float32 and mx.default_device() == mx.cpu and not getattr(_state, "native", False)


@contextmanager
def native_ops():
    """Use MLX's native operations even on the CPU (tests of the GPU code path)."""
    previous = getattr(_state, "native", False)
    _state.native = True
    try:
        yield
    finally:
        _state.native = previous


# ------------------------------------------------------------------------- activations
def gelu(x: mx.array) -> mx.array:
    """Exact (erf) GELU."""
    if cpu_kernels(x):
        return _kernels.gelu(x)
    return 0.5 * x * (1.0 + mx.erf(x * (1.0 / math.sqrt(2.0))))


def silu(x: mx.array) -> mx.array:
    if cpu_kernels(x):
        return _kernels.silu(x)
    return x * mx.sigmoid(x)


def geglu(hidden: mx.array, gate: mx.array) -> mx.array:
    """hidden * gelu(gate), diffusers' GEGLU."""
    if cpu_kernels(hidden):
        return _kernels.geglu(hidden, gate)
    return hidden * gelu(gate)


def exp(x: mx.array) -> mx.array:
    """e^x; on the CPU x is clamped to [-30, 20] (a VAE's std from its clamped logvar)."""
    if cpu_kernels(x):
        return _kernels.exp(x)
    return mx.exp(x)


def softmax(x: mx.array) -> mx.array:
    """Softmax over the last axis."""
    if cpu_kernels(x):
        return _kernels.softmax(x)
    return mx.softmax(x, axis=-1, precise=True)


def group_norm(x: mx.array, weight: mx.array, bias: mx.array, num_groups: int, eps: float,
               apply_silu: bool = False) -> mx.array:
    """torch.nn.GroupNorm on channels-last input (B, ..., C), optionally followed by SiLU."""
    if cpu_kernels(x):
        return _kernels.group_norm(x, weight, bias, num_groups, eps, apply_silu)
    B, C = x.shape[0], x.shape[-1]
    # Statistics in float32, as torch's GroupNorm: in float16 the squares of activations
    # past 256 overflow, the variance becomes inf and the whole group normalises to 0.
    grouped = x.reshape(B, -1, num_groups, C // num_groups).astype(mx.float32)
    mean = mx.mean(grouped, axis=(1, 3), keepdims=True)
    var = mx.var(grouped, axis=(1, 3), keepdims=True)
    y = ((grouped - mean) * mx.rsqrt(var + eps)).reshape(x.shape).astype(x.dtype) * weight + bias
    return y * mx.sigmoid(y) if apply_silu else y


# ------------------------------------------------------------------------- attention
def query_chunk_rows(q: mx.array, keys: int, itemsize: int = 4) -> int:
    """Query rows per attention chunk: all N when the (B, heads, N, keys) scores fit one pass."""
    B, H, N, _ = q.shape
    per_row = max(1, B * H * keys * itemsize)
    if per_row * N <= ATTENTION_SINGLE_PASS_BYTES:
        return N
    return max(1, ATTENTION_CHUNK_BYTES // per_row)


def _query_chunks(q: mx.array, keys: int, fn: Callable[[mx.array, slice], mx.array], itemsize: int = 4) -> mx.array:
    """fn(q_chunk, rows) over query chunks (see `query_chunk_rows`), one after the other."""
    N = q.shape[2]
    rows = query_chunk_rows(q, keys, itemsize)
    if rows >= N:
        return fn(q, slice(0, N))
    starts = range(0, N, rows)
    chunks = [q[:, :, start:start + rows] for start in starts]
    outs = _kernels.in_sequence(chunks, lambda chunk, i: fn(chunk, slice(starts[i], starts[i] + rows)))
    return mx.concatenate(outs, axis=2)


def _rows(bias: Optional[mx.array], rows: slice) -> Optional[mx.array]:
    """The bias (broadcastable to (B, heads, N, L)) for a slice of query rows."""
    if bias is None or bias.ndim < 2 or bias.shape[-2] == 1:
        return bias
    return bias[..., rows, :]


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, bias: Optional[mx.array] = None) -> mx.array:
    """softmax(q k^T * scale + bias) v for (B, heads, N, head_dim) inputs.

    `bias` is additive and broadcasts against the scores (B, heads, N, L), e.g. a padding
    bias (B, 1, 1, L).
    """
    itemsize = 4 if cpu_kernels(q) else q.dtype.size
    if query_chunk_rows(q, k.shape[2], itemsize) < q.shape[2]:
        # Every chunk reads all keys and values: lay out head-split views once, not per chunk.
        k, v = mx.contiguous(k), mx.contiguous(v)
    if not cpu_kernels(q):
        mask = None if bias is None else bias.astype(q.dtype)
        return _query_chunks(q, k.shape[2], lambda qc, rows: mx.fast.scaled_dot_product_attention(
            qc, k, v, scale=scale, mask=_rows(mask, rows)), itemsize)
    return _query_chunks(q, k.shape[2], lambda qc, rows: _kernels.attention(qc, k, v, scale, _rows(bias, rows)))


def policy_attention(q: mx.array, k: mx.array, v: mx.array, scale: float, visible: mx.array) -> mx.array:
    """The token merger's attention: a softmax weighted by `visible` (broadcastable to the
    scores (B, heads, N, L)), with the release's epsilon terms:
    p = (e^(a - max a) * visible + eps / L) / (sum(e^(a - max a) * visible) + eps), in float32.

    The max is over all columns, visible or not, exactly as `softmax_with_policy`.
    """
    length = k.shape[2]

    def attend(qc: mx.array, rows: slice) -> mx.array:
        return policy_probabilities(qc, k, scale, _rows(visible, rows)) @ v

    return _query_chunks(q, length, attend)


def policy_probabilities(q: mx.array, k: mx.array, scale: float, visible: mx.array) -> mx.array:
    """The merger's attention weights (B, heads, N, L) (see `policy_attention`)."""
    length = k.shape[2]
    scores = (q @ k.transpose(0, 1, 3, 2)) * scale
    if cpu_kernels(scores):
        weights = _kernels.exp_from_max(scores)
    else:
        weights = mx.exp(scores - mx.max(scores, axis=-1, keepdims=True))
    weights = weights * visible
    return (weights + POLICY_EPS / length) / (mx.sum(weights, axis=-1, keepdims=True) + POLICY_EPS)


# ------------------------------------------------------------------------- convolutions
def conv2d(x: mx.array, weight: mx.array, bias: Optional[mx.array], stride: int = 1, padding: int = 0,
           cached: Optional[Callable] = None) -> mx.array:
    """torch-style conv2d on NHWC input with an (out, kh, kw, in) weight, plus bias.

    `cached(key)` returns a derived form of `weight` (`lavit_mlx.cpu.conv.derived_weights`)
    from the caller's cache (CPU only).
    """
    if cpu_kernels(x):
        return _conv.conv2d(x, weight, bias, stride, padding, cached)
    y = mx.conv2d(x, weight, stride=stride, padding=padding)
    return y + bias if bias is not None else y


def upsample2x_conv3x3(x: mx.array, weight: mx.array, bias: Optional[mx.array],
                       cached: Optional[Callable] = None) -> mx.array:
    """conv2d(nearest_upsample_2x(x), weight, padding=1) + bias for NHWC x."""
    if cpu_kernels(x):
        return _conv.upsample2x_conv3x3(x, weight, bias, cached)
    B, H, W, C = x.shape
    up = mx.broadcast_to(x[:, :, None, :, None, :], (B, H, 2, W, 2, C)).reshape(B, 2 * H, 2 * W, C)
    return conv2d(up, weight, bias, padding=1)
