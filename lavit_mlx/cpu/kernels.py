"""Elementwise math that is fast on MLX's CPU backend: GELU, softmax, SiLU, GroupNorm,
GEGLU and softmax attention.

MLX's CPU kernels for `erf`, `exp` and `sigmoid` call scalar libm: 10-25 ns per
element, 40x slower than PyTorch's vectorised ones, which made GELU and softmax cost as
much as the matmuls of a ViT block. On the CPU these functions use polynomial forms
that MLX fuses into one compiled loop (`mx.compile`), written so that the compiler can
vectorise it (see below), and large passes are split over two threads:

- erf(x) = x P(x^2) / Q(x^2) on |x| <= 3.9 (erf(3.9) = 1 - 3.5e-8), a rational minimax
  fit made for this project; |error| <= 4e-7 in float32 (libm: 3e-8);
- e^t = (e^(t/32))^32 with e^(t/32) from its degree-9 Taylor polynomial.

These are the CPU implementations only; `lavit_mlx.ops` decides where they apply (float32
on the CPU) and uses MLX's native operations elsewhere. Kernels are compiled once per
module-level function (never per call). Without a C++ compiler for MLX's CPU JIT the
same forms run uncompiled (slower, still no libm).
"""

from __future__ import annotations

import math
from typing import Callable, List, Sequence

import mlx.core as mx

_ERF_CLAMP = 3.9
_ERF_P = (1.12837918e00, 1.92157537e-01, 5.56343067e-02, 4.19399410e-03, 4.09690526e-04, 6.75065067e-06)
_ERF_Q = (1.0, 5.03628748e-01, 1.17179805e-01, 1.62256773e-02, 1.41246405e-03, 7.22897641e-05, 2.57653042e-07)


# ---------------------------------------------------------------------------------------
# Convolutional-network pieces (UNet, VAE): SiLU, GroupNorm, softmax attention with an
# additive bias, convolutions.
#
# MLX compiles a fused elementwise graph into one C++ loop built with plain -O3 (SSE2,
# no FMA) that runs on one thread. A floor, a bit cast, `maximum`/`minimum`/`clip` (their
# NaN test) or `where` keep that loop from vectorising or split it, so the kernels below
# use only +, -, *, / and abs: clamps are written with abs, and exps are
# e^t = (e^(t/32))^32 with e^(t/32) from its degree-9 Taylor polynomial (|t/32| <= 0.94:
# truncation < 2e-9 before squaring; float32 rounding makes it ~5e-6 relative after,
# i.e. ~1e-6 in sigmoid and nothing that matters in softmax weights). Large
# elementwise passes are split in two halves that run on two CPU streams (two threads).

_EXP_SQUARINGS = 5
_SMALL_EXP_TAYLOR = tuple(1.0 / math.factorial(n) for n in range(10))
_SILU_CLAMP = 20.0  # sigmoid(-20) = 2e-9: beyond this x * sigmoid(x) is x or 0 in float32 terms
_SOFTMAX_FLOOR = -30.0  # e^-30 = 9e-14 of the row maximum's weight
_SPLIT_MIN_ELEMENTS = 1 << 18  # below this, a second thread costs more than it saves


def _poly(t: mx.array, coefficients) -> mx.array:
    """sum_n c_n t^n by Horner's rule, starting from the array (one fused loop once compiled)."""
    result = t * coefficients[-1] + coefficients[-2]
    for c in reversed(coefficients[:-2]):
        result = result * t + c
    return result


def _at_most(x: mx.array, bound: float) -> mx.array:
    """min(x, bound) with + and abs (exact up to one rounding of x + bound)."""
    return 0.5 * ((x + bound) - mx.abs(x - bound))


def _at_least(x: mx.array, bound: float) -> mx.array:
    return 0.5 * ((x + bound) + mx.abs(x - bound))


def _exp_by_squaring(t: mx.array) -> mx.array:
    """e^t for t in [-30, 20] with multiplies and adds only."""
    e = _poly(t * (1.0 / 2**_EXP_SQUARINGS), _SMALL_EXP_TAYLOR)
    for _ in range(_EXP_SQUARINGS):
        e = e * e
    return e


def _silu_fast(x: mx.array) -> mx.array:
    # Only large positive x needs the bound: for x << 0, e^-x overflows to inf and x / inf = -0.
    return x / (1.0 + _exp_by_squaring(-_at_most(x, _SILU_CLAMP)))


def _softmax_weights(scores: mx.array, row_max: mx.array) -> mx.array:
    """Unnormalised softmax weights e^(scores - row_max), scores <= row_max."""
    return _exp_by_squaring(_at_least(scores - row_max, _SOFTMAX_FLOOR))


def _gelu_gate(hidden: mx.array, gate: mx.array) -> mx.array:
    """hidden * gelu(gate), exact (erf) GELU with the rational erf of `_erf_poly` above."""
    z = gate * (1.0 / math.sqrt(2.0))
    z = _at_least(_at_most(z, _ERF_CLAMP), -_ERF_CLAMP)
    t = z * z
    return hidden * (0.5 * gate * (1.0 + z * _poly(t, _ERF_P) / _poly(t, _ERF_Q)))


def _affine(x, scale, shift):
    return x * scale + shift


def _affine_silu(x, scale, shift):
    return _silu_fast(x * scale + shift)


def _centred_square(x, mean):
    d = x - mean
    return d * d


_KERNELS: dict = {}


def _compiler_available() -> bool:
    if "available" not in _KERNELS:
        try:
            mx.eval(mx.compile(lambda a: a * 2.0 + 1.0)(mx.ones((2,), mx.float32)))
            _KERNELS["available"] = True
        except Exception:  # no C++ compiler for MLX's CPU JIT
            _KERNELS["available"] = False
    return _KERNELS["available"]


def _kernel(fn):
    """`mx.compile(fn)`, made once per function; `fn` itself where no compiler is available."""
    compiled = _KERNELS.get(fn)
    if compiled is None:
        compiled = _KERNELS[fn] = mx.compile(fn) if _compiler_available() else fn
    return compiled


_STREAMS: dict = {}


def _side_stream():
    if "side" not in _STREAMS:
        _STREAMS["side"] = mx.new_stream(mx.cpu)
    return _STREAMS["side"]


def _elementwise(fn, x: mx.array, *args: mx.array) -> mx.array:
    """Compiled `fn(x, *args)`; when large, its halves along one axis run on two threads.

    The axis is 1, or for a single-row axis 1 (one attention head) the next one before
    the last. Each arg has x's shape (split with it) or size 1 along that axis (broadcast).
    """
    kernel = _kernel(fn)
    axis = 1 if x.ndim < 3 or x.shape[1] >= 2 else next((a for a in range(2, x.ndim - 1) if x.shape[a] >= 2), 1)
    if x.size < _SPLIT_MIN_ELEMENTS or x.ndim < 2 or x.shape[axis] < 2:
        return kernel(x, *args)
    half = x.shape[axis] // 2

    def part(a: mx.array, second: bool) -> mx.array:
        if a.ndim < 2 or a.shape[axis] == 1:
            return a
        index = (slice(None),) * axis + (slice(half, None) if second else slice(None, half),)
        return a[index]

    first = kernel(part(x, False), *[part(a, False) for a in args])
    with mx.stream(_side_stream()):
        second = kernel(part(x, True), *[part(a, True) for a in args])
    return mx.concatenate([first, second], axis=axis)


def in_sequence(pieces: Sequence[mx.array], fn: Callable[[mx.array, int], mx.array]) -> List[mx.array]:
    """[fn(piece, i)], each computed only after the previous result (`mx.depends`).

    MLX schedules independent pieces side by side (breadth first), so without the chain
    the intermediates of many pieces would be alive together.
    """
    results: List[mx.array] = []
    for i, piece in enumerate(pieces):
        if results:
            piece = mx.depends(piece, results[-1])
        results.append(fn(piece, i))
    return results


def silu(x: mx.array) -> mx.array:
    """x * sigmoid(x)."""
    return _elementwise(_silu_fast, x)


def _spatial_sum(x: mx.array) -> mx.array:
    """(B, H, W, C) or (B, N, C) -> (B, C); summed in two levels to keep float32 error small."""
    return x.sum(axis=2).sum(axis=1) if x.ndim == 4 else x.sum(axis=1)


def group_norm(
    x: mx.array, weight: mx.array, bias: mx.array, num_groups: int, eps: float, apply_silu: bool = False
) -> mx.array:
    """torch.nn.GroupNorm on channels-last input (B, ..., C), optionally followed by SiLU.

    torch's groups are runs of consecutive channels. Statistics are two-pass (mean, then
    the mean of centred squares); the normalisation becomes one per-channel
    scale-and-shift, fused with the SiLU.
    """
    B, C = x.shape[0], x.shape[-1]
    per_group = C // num_groups
    count = (x.size // (B * C)) * per_group  # elements per (batch, group)

    def per_channel(group_values):  # (B, groups) -> (B, 1, ..., 1, C)
        return mx.repeat(group_values, per_group, axis=-1).reshape(B, *([1] * (x.ndim - 2)), C)

    mean = _spatial_sum(x).reshape(B, num_groups, per_group).sum(axis=-1) / count  # (B, groups)
    mean_c = per_channel(mean)
    var = _spatial_sum(_kernel(_centred_square)(x, mean_c)).reshape(B, num_groups, per_group).sum(axis=-1) / count
    scale = per_channel(mx.rsqrt(var + eps)) * weight
    shift = bias - mean_c * scale
    return _elementwise(_affine_silu if apply_silu else _affine, x, scale, shift)


def _attention_rows(q: mx.array, k: mx.array, v: mx.array, scale: float, bias: mx.array | None) -> mx.array:
    scores = (q * scale) @ k.transpose(0, 1, 3, 2)  # (B, heads, N, L)
    if bias is not None:
        scores = scores + bias
    weights = _kernel(_softmax_weights)(scores, mx.max(scores, axis=-1, keepdims=True))
    # Normalise the (N, head_dim) output rather than the (N, L) weights: fewer divisions.
    return (weights @ v) / mx.sum(weights, axis=-1, keepdims=True)


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, bias: mx.array | None = None) -> mx.array:
    """softmax(q k^T * scale + bias) v for (B, heads, N, head_dim) inputs.

    `bias` (optional) is additive and broadcasts against the scores (B, heads, N, L),
    e.g. a padding bias of shape (B, 1, 1, L). When large, the two halves of the heads
    (else of the batch, else of the queries) run on two threads, each computing its own
    scores, row maxima and sums: no full-size copy joins them, only the outputs.
    """
    B, H, N, _ = q.shape
    if B * H * N * k.shape[2] < _SPLIT_MIN_ELEMENTS or max(B, H, N) < 2:
        return _attention_rows(q, k, v, scale, bias)
    axis = 1 if H >= 2 else 0 if B >= 2 else 2
    half = q.shape[axis] // 2
    if bias is not None:
        bias = bias.reshape((1,) * (4 - bias.ndim) + tuple(bias.shape))

    def part(a: mx.array | None, second: bool, follows_queries: bool = True) -> mx.array | None:
        if a is None or a.shape[axis] == 1 or not follows_queries:
            return a
        index = (slice(None),) * axis + (slice(half, None) if second else slice(None, half),)
        return a[index]

    def half_attention(second: bool) -> mx.array:
        shared = axis != 2  # keys and values split with heads or batch, not with query rows
        return _attention_rows(part(q, second), part(k, second, shared), part(v, second, shared), scale,
                               part(bias, second))

    first = half_attention(False)
    with mx.stream(_side_stream()):
        second = half_attention(True)
    return mx.concatenate([first, second], axis=axis)


def geglu(hidden: mx.array, gate: mx.array) -> mx.array:
    """hidden * gelu(gate) (exact GELU), the gated activation of diffusers' GEGLU."""
    return _elementwise(_gelu_gate, hidden, gate)


def _gelu_fast(x: mx.array) -> mx.array:
    z = x * (1.0 / math.sqrt(2.0))
    z = _at_least(_at_most(z, _ERF_CLAMP), -_ERF_CLAMP)
    t = z * z
    return 0.5 * x * (1.0 + z * _poly(t, _ERF_P) / _poly(t, _ERF_Q))


def gelu(x: mx.array) -> mx.array:
    """Exact (erf) GELU."""
    return _elementwise(_gelu_fast, x)


def _clamped_exp(x: mx.array) -> mx.array:
    return _exp_by_squaring(_at_least(_at_most(x, 20.0), -30.0))


def exp(x: mx.array) -> mx.array:
    """e^x for x clamped to [-30, 20], e.g. a VAE's std from its clamped logvar."""
    return _elementwise(_clamped_exp, x)


def exp_from_max(scores: mx.array) -> mx.array:
    """e^(scores - max over the last axis), the unnormalised softmax weights."""
    return _elementwise(_softmax_weights, scores, mx.max(scores, axis=-1, keepdims=True))


def softmax(x: mx.array) -> mx.array:
    """Softmax over the last axis."""
    weights = exp_from_max(x)
    return weights / mx.sum(weights, axis=-1, keepdims=True)


def kernel_cache_size() -> int:
    """Number of compiled kernels held (constant once every kernel has run once)."""
    return len(_KERNELS)
