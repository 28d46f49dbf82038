"""GELU and softmax that are fast on MLX's CPU backend.

MLX's CPU kernels for `erf` and `exp` call scalar libm: 10-25 ns per element, 40x
slower than PyTorch's vectorised ones, which made GELU and softmax cost as much as the
matmuls of a ViT block. On the CPU these functions use polynomial forms that MLX fuses
into one vectorised kernel with `mx.compile`:

- erf(x) = x P(x^2) / Q(x^2) on |x| <= 3.9 (erf(3.9) = 1 - 3.5e-8), a rational minimax
  fit made for this project; |error| <= 4e-7 in float32 (libm: 3e-8).
- exp(x) = 2^k exp(r), r = x - k ln 2 in [-ln2/2, ln2/2], exp(r) by its degree-7 Taylor
  polynomial (relative error < 3e-9), 2^k built in the float's exponent bits.

On a GPU the native operations are used: they are fast and exact there. If the CPU
compiler for `mx.compile` is unavailable, the uncompiled forms still avoid libm.
"""

from __future__ import annotations

import math

import mlx.core as mx

_ERF_CLAMP = 3.9
_ERF_P = (1.12837918e00, 1.92157537e-01, 5.56343067e-02, 4.19399410e-03, 4.09690526e-04, 6.75065067e-06)
_ERF_Q = (1.0, 5.03628748e-01, 1.17179805e-01, 1.62256773e-02, 1.41246405e-03, 7.22897641e-05, 2.57653042e-07)

# ln 2 split in two (Cody-Waite) so that r = x - k ln2 stays exact for |k| up to 127.
_LN2_HI = 0.693145751953125
_LN2_LO = 1.428606820309417e-06
_LOG2E = 1.0 / math.log(2.0)
_EXP_TAYLOR = tuple(1.0 / math.factorial(n) for n in range(8))


def _horner(t: mx.array, coefficients) -> mx.array:
    result = mx.full(t.shape, coefficients[-1], t.dtype)
    for c in reversed(coefficients[:-1]):
        result = result * t + c
    return result


def _erf_poly(x: mx.array) -> mx.array:
    x = mx.clip(x, -_ERF_CLAMP, _ERF_CLAMP)
    t = x * x
    return x * _horner(t, _ERF_P) / _horner(t, _ERF_Q)


def _gelu_poly(x: mx.array) -> mx.array:
    return 0.5 * x * (1.0 + _erf_poly(x * (1.0 / math.sqrt(2.0))))


def _exp_poly(x: mx.array) -> mx.array:
    x = mx.clip(x, -87.0, 88.0)
    k = mx.floor(x * _LOG2E + 0.5)
    r = (x - k * _LN2_HI) - k * _LN2_LO
    scale = mx.left_shift((k.astype(mx.int32) + 127), 23).view(mx.float32)  # 2^k
    return _horner(r, _EXP_TAYLOR) * scale


def _softmax_poly(x: mx.array) -> mx.array:
    e = _exp_poly(x - mx.max(x, axis=-1, keepdims=True))
    return e / mx.sum(e, axis=-1, keepdims=True)


def _compiled(fn):
    """`mx.compile(fn)` with a fallback to `fn` if this machine cannot compile kernels."""
    state = {"fn": None}

    def call(x):
        if state["fn"] is None:
            try:
                compiled = mx.compile(fn)
                mx.eval(compiled(mx.zeros((4,), mx.float32)))
                state["fn"] = compiled
            except Exception:  # no C++ compiler for MLX's CPU JIT
                state["fn"] = fn
        return state["fn"](x)

    return call


_gelu_cpu = _compiled(_gelu_poly)
_exp_cpu = _compiled(_exp_poly)
_softmax_cpu = _compiled(_softmax_poly)


def _on_cpu(x: mx.array) -> bool:
    return mx.default_device() == mx.cpu and x.dtype == mx.float32


def gelu(x: mx.array) -> mx.array:
    """Exact (erf) GELU."""
    return _gelu_cpu(x) if _on_cpu(x) else 0.5 * x * (1.0 + mx.erf(x * (1.0 / math.sqrt(2.0))))


def exp(x: mx.array) -> mx.array:
    return _exp_cpu(x) if _on_cpu(x) else mx.exp(x)


def softmax(x: mx.array) -> mx.array:
    """Softmax over the last axis."""
    return _softmax_cpu(x) if _on_cpu(x) else mx.softmax(x, axis=-1, precise=True)


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    """softmax(q k^T * scale) v for (B, heads, N, head_dim) inputs."""
    if not _on_cpu(q):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)
    return softmax((q * scale) @ k.transpose(0, 1, 3, 2)) @ v


# ---------------------------------------------------------------------------------------
# Convolutional-network pieces (UNet, VAE): SiLU, GroupNorm, masked attention.
# SiLU's sigmoid and GroupNorm's normalisation are elementwise chains that MLX fuses into
# one kernel under `mx.compile`; the exp inside the sigmoid is the polynomial one above.


def _silu_poly(x: mx.array) -> mx.array:
    # x * sigmoid(x); exp(-x) saturates at 2^127 (clip above), so no inf/nan for any x.
    return x / (1.0 + _exp_poly(-x))


_silu_cpu = _compiled(_silu_poly)


def silu(x: mx.array) -> mx.array:
    """x * sigmoid(x)."""
    return _silu_cpu(x) if _on_cpu(x) else x * mx.sigmoid(x)


def _group_norm_fn(num_groups: int, eps: float, apply_silu: bool, fast_exp: bool):
    def fn(x, weight, bias):
        shape = x.shape
        # channels-last: (B, ..., C) -> (B, positions, groups, C/groups); torch's groups are
        # runs of consecutive channels, which this reshape keeps.
        grouped = x.reshape(shape[0], -1, num_groups, shape[-1] // num_groups)
        mean = mx.mean(grouped, axis=(1, 3), keepdims=True)
        centred = grouped - mean
        var = mx.mean(centred * centred, axis=(1, 3), keepdims=True)
        y = (centred * mx.rsqrt(var + eps)).reshape(shape) * weight + bias
        if apply_silu:
            y = y / (1.0 + _exp_poly(-y)) if fast_exp else y * mx.sigmoid(y)
        return y

    return fn


_GROUP_NORM_CACHE: dict = {}


def group_norm(
    x: mx.array, weight: mx.array, bias: mx.array, num_groups: int, eps: float, apply_silu: bool = False
) -> mx.array:
    """torch.nn.GroupNorm on channels-last input (B, ..., C), optionally followed by SiLU."""
    fast = _on_cpu(x)
    key = (num_groups, float(eps), apply_silu, fast)
    fn = _GROUP_NORM_CACHE.get(key)
    if fn is None:
        plain = _group_norm_fn(num_groups, eps, apply_silu, fast)
        try:
            fn = mx.compile(plain)
            mx.eval(fn(mx.zeros((1, 1, num_groups), x.dtype), mx.ones((num_groups,), x.dtype),
                       mx.zeros((num_groups,), x.dtype)))
        except Exception:  # no C++ compiler for MLX's CPU JIT
            fn = plain
        _GROUP_NORM_CACHE[key] = fn
    return fn(x, weight, bias)


def attention_with_bias(
    q: mx.array, k: mx.array, v: mx.array, scale: float, bias: mx.array | None
) -> mx.array:
    """softmax(q k^T * scale + bias) v for (B, heads, N, head_dim) inputs.

    `bias` is additive and broadcasts against the scores (B, heads, N, L), e.g. a padding
    bias of shape (B, 1, 1, L).
    """
    if bias is None:
        return attention(q, k, v, scale)
    if not _on_cpu(q):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=bias.astype(q.dtype))
    return softmax((q * scale) @ k.transpose(0, 1, 3, 2) + bias) @ v


def conv2d(x: mx.array, weight: mx.array, bias: mx.array | None, stride: int = 1, padding: int = 0) -> mx.array:
    """torch-style conv2d on NHWC input with an (out, kh, kw, in) weight, plus bias."""
    out_channels, kh, kw, in_channels = weight.shape
    if kh == kw == 1 and stride == 1 and padding == 0:
        # A 1x1 conv is a matmul over channels.
        flat = x.reshape(-1, in_channels)
        w = weight.reshape(out_channels, in_channels).T
        y = mx.addmm(bias, flat, w) if bias is not None else flat @ w
        return y.reshape(*x.shape[:-1], out_channels)
    y = mx.conv2d(x, weight, stride=stride, padding=padding)
    return y + bias if bias is not None else y
