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

import functools
import math
from fractions import Fraction

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
    """Compiled `fn(x, *args)`; when large, its halves along axis 1 run on two threads.

    Each arg has x's shape (split with it) or size 1 along axis 1 (broadcast).
    """
    kernel = _kernel(fn)
    if x.size < _SPLIT_MIN_ELEMENTS or x.ndim < 2 or x.shape[1] < 2:
        return kernel(x, *args)
    half = x.shape[1] // 2

    def part(a: mx.array, second: bool) -> mx.array:
        if a.ndim < 2 or a.shape[1] == 1:
            return a
        return a[:, half:] if second else a[:, :half]

    first = kernel(part(x, False), *[part(a, False) for a in args])
    with mx.stream(_side_stream()):
        second = kernel(part(x, True), *[part(a, True) for a in args])
    return mx.concatenate([first, second], axis=1)


def silu(x: mx.array) -> mx.array:
    """x * sigmoid(x)."""
    return _elementwise(_silu_fast, x) if _on_cpu(x) else x * mx.sigmoid(x)


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

    if not _on_cpu(x):
        grouped = x.reshape(B, -1, num_groups, per_group)
        mean = mx.mean(grouped, axis=(1, 3), keepdims=True)
        var = mx.var(grouped, axis=(1, 3), keepdims=True)
        y = ((grouped - mean) * mx.rsqrt(var + eps)).reshape(x.shape) * weight + bias
        return y * mx.sigmoid(y) if apply_silu else y
    mean = _spatial_sum(x).reshape(B, num_groups, per_group).sum(axis=-1) / count  # (B, groups)
    mean_c = per_channel(mean)
    var = _spatial_sum(_kernel(_centred_square)(x, mean_c)).reshape(B, num_groups, per_group).sum(axis=-1) / count
    scale = per_channel(mx.rsqrt(var + eps)) * weight
    shift = bias - mean_c * scale
    return _elementwise(_affine_silu if apply_silu else _affine, x, scale, shift)


def attention_with_bias(
    q: mx.array, k: mx.array, v: mx.array, scale: float, bias: mx.array | None
) -> mx.array:
    """softmax(q k^T * scale + bias) v for (B, heads, N, head_dim) inputs.

    `bias` (optional) is additive and broadcasts against the scores (B, heads, N, L),
    e.g. a padding bias of shape (B, 1, 1, L).
    """
    if not _on_cpu(q):
        mask = None if bias is None else bias.astype(q.dtype)
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    scores = (q * scale) @ k.transpose(0, 1, 3, 2)  # (B, heads, N, L)
    if bias is not None:
        scores = scores + bias
    weights = _elementwise(_softmax_weights, scores, mx.max(scores, axis=-1, keepdims=True))
    # Normalise the (N, head_dim) output rather than the (N, L) weights: fewer divisions.
    return (weights @ v) / mx.sum(weights, axis=-1, keepdims=True)


def geglu(hidden: mx.array, gate: mx.array) -> mx.array:
    """hidden * gelu(gate) (exact GELU), the gated activation of diffusers' GEGLU."""
    if not _on_cpu(hidden):
        return hidden * (0.5 * gate * (1.0 + mx.erf(gate * (1.0 / math.sqrt(2.0)))))
    return _elementwise(_gelu_gate, hidden, gate)


# Winograd minimal filtering F(m x m, r x r) (Lavin & Gray 2016): each m x m output tile
# of a valid r x r correlation is A^T [(G g G^T) * (B^T d B)] A over its n x n input tile d
# (n = m + r - 1), i.e. n^2 products per tile instead of m^2 r^2, done as n^2 matmuls of
# (tiles, in) x (in, out); the tile transforms are matmuls too (Kronecker products of the
# 1-D ones on the stacked tile positions). The matrices come from the Cook-Toom construction on the
# points below (and infinity). F(2x2, 3x3) (0, +-1) stays within ~1e-6 of the direct
# convolution in float32, F(4x4, 3x3) (0, +-1, +-2) within ~1e-5 and takes 4x fewer
# products than direct; small maps or few channels use MLX's own convolution, as the
# transforms then cost more than they save.
_WINOGRAD_POINTS = {2: (1, -1), 3: (0, 1, -1), 4: (0, 1, -1, 2), 5: (0, 1, -1, 2, -2)}  # by count
# Where Winograd beats MLX's convolution (measured on 2 cores; "work" = tiles x min(in, out)):
_WINOGRAD_MIN_TILES_4 = 32  # F(4x4) below this: the n^2 thin matmuls lose
_WINOGRAD_MIN_WORK_4 = 10240
_WINOGRAD_MIN_WORK_2 = 40960
_WINOGRAD_MIN_CHANNELS = 64
_IM2COL_MAX_DEPTH = 64  # kernel taps x input channels up to which an explicit im2col matmul wins
_SHIFT_MAX_OUT = 16  # output channels up to which a large map uses one matmul per kernel tap
_SHIFT_MIN_PIXELS = 4096


@functools.lru_cache(maxsize=None)
def winograd_matrices(m: int, r: int) -> tuple:
    """(A^T (m x n), G (n x r), B^T (n x n)) of F(m, r) as nested tuples of floats."""
    points = [Fraction(p) for p in _WINOGRAD_POINTS[m + r - 2]]

    def times(a, b):  # product of polynomials given by ascending coefficients
        out = [Fraction(0)] * (len(a) + len(b) - 1)
        for i, x in enumerate(a):
            for j, y in enumerate(b):
                out[i + j] += x * y
        return out

    def vanishing(skip=None):  # prod (x - p) over the points, except `skip`
        poly = [Fraction(1)]
        for j, p in enumerate(points):
            if j != skip:
                poly = times(poly, [-p, Fraction(1)])
        return poly

    n = m + r - 1
    a_t = [[p ** i for p in points] + [Fraction(int(i == m - 1))] for i in range(m)]
    g = [[p ** k / math.prod(p - q for q in points if q != p) for k in range(r)] for p in points]
    g.append([Fraction(int(k == r - 1)) for k in range(r)])
    b_t = [vanishing(j) + [Fraction(0)] for j in range(n - 1)] + [vanishing()]
    as_float = lambda rows: tuple(tuple(float(x) for x in row) for row in rows)  # noqa: E731
    return as_float(a_t), as_float(g), as_float(b_t)


@functools.lru_cache(maxsize=None)
def _winograd_tile_transforms(m: int, r: int) -> tuple:
    """(B^T (x) B^T, A^T (x) A^T): the input and output transforms of F(m, r) for a whole
    tile flattened row-major, (n^2, n^2) and (m^2, n^2). Applied as matmuls: BLAS runs them
    vectorised on all threads, where a compiled elementwise kernel would run on one."""
    a_t, _, b_t = winograd_matrices(m, r)
    a_t, b_t = mx.array(a_t, dtype=mx.float32), mx.array(b_t, dtype=mx.float32)

    def kron(a: mx.array) -> mx.array:
        return (a[:, None, :, None] * a[None, :, None, :]).reshape(a.shape[0] ** 2, a.shape[1] ** 2)

    return kron(b_t), kron(a_t)


def winograd_weights(weight: mx.array, m: int) -> mx.array:
    """(out, r, r, in) kernel -> (n^2, in, out): G g G^T of F(m, r) for each tile position, row-major."""
    r = weight.shape[1]
    _, g, _ = winograd_matrices(m, r)
    g = mx.array(g, dtype=mx.float32)
    u = mx.einsum("ai,oijc,bj->abco", g, weight.astype(mx.float32), g).astype(weight.dtype)  # (n, n, in, out)
    return mx.contiguous(u.reshape(-1, *u.shape[2:]))


def winograd_tile(x: mx.array, weight: mx.array, stride: int = 1, padding: int = 1) -> int:
    """The output tile size m (4 or 2) Winograd should use for this conv, or 0 for a direct conv."""
    out_channels, kh, kw, in_channels = weight.shape
    if not (_on_cpu(x) and kh == kw and kh in (2, 3) and stride == 1
            and min(in_channels, out_channels) >= _WINOGRAD_MIN_CHANNELS):
        return 0
    out_h, out_w = x.shape[1] + 2 * padding - kh + 1, x.shape[2] + 2 * padding - kw + 1

    def tiles(m: int) -> int:
        return x.shape[0] * -(-out_h // m) * -(-out_w // m)

    channels = min(in_channels, out_channels)
    if _m_available(4, kh) and tiles(4) >= _WINOGRAD_MIN_TILES_4 and tiles(4) * channels >= _WINOGRAD_MIN_WORK_4:
        return 4
    if _m_available(2, kh) and tiles(2) * channels >= _WINOGRAD_MIN_WORK_2:
        return 2
    return 0


def _m_available(m: int, r: int) -> bool:
    return m + r - 2 in _WINOGRAD_POINTS


def winograd_correlate(padded: mx.array, transformed: mx.array, m: int, r: int, bias: mx.array | None,
                       out_h: int, out_w: int) -> mx.array:
    """Valid r x r correlation of NHWC `padded` with F(m, r); `transformed` from `winograd_weights`.

    `padded` may be larger than out + r - 1 (extra rows/columns are not read).
    """
    B, _, _, C = padded.shape
    n = m + r - 1
    out_channels = transformed.shape[-1]
    tiles_h, tiles_w = -(-out_h // m), -(-out_w // m)
    need_h, need_w = m * tiles_h + r - 1, m * tiles_w + r - 1
    if padded.shape[1] < need_h or padded.shape[2] < need_w:  # whole tiles
        padded = mx.pad(padded, [(0, 0), (0, max(0, need_h - padded.shape[1])),
                                 (0, max(0, need_w - padded.shape[2])), (0, 0)])
    input_transform, output_transform = _winograd_tile_transforms(m, r)
    # Tile position (i, j) of every tile: (n^2, B * tiles_h * tiles_w * C).
    tiles = mx.stack([padded[:, i: i + m * tiles_h: m, j: j + m * tiles_w: m, :]
                      for i in range(n) for j in range(n)], axis=0).reshape(n * n, -1)
    transformed_input = (input_transform @ tiles).reshape(n * n, -1, C)  # (n^2, tiles, C)
    products = transformed_input @ transformed  # (n^2, tiles, out)
    corners = (output_transform @ products.reshape(n * n, -1)).reshape(m, m, B, tiles_h, tiles_w, out_channels)
    out = corners.transpose(2, 3, 0, 4, 1, 5).reshape(B, m * tiles_h, m * tiles_w, out_channels)
    if (m * tiles_h, m * tiles_w) != (out_h, out_w):
        out = out[:, :out_h, :out_w, :]
    return out + bias if bias is not None else out


def derived_weights(weight: mx.array, key: tuple):
    """A CPU re-arrangement of a conv kernel, by key: ('winograd', m) for `winograd_weights`,
    ('folded', 0) for `subpixel_kernels`, ('folded-winograd', m) for the Winograd forms of
    those stacked over the four parities, (4 n^2, in, out)."""
    kind, m = key
    if kind == "winograd":
        return winograd_weights(weight, m)
    if kind == "folded":
        return subpixel_kernels(weight)
    return mx.concatenate([winograd_weights(k, m) for k in subpixel_kernels(weight)], axis=0)


def conv2d(x: mx.array, weight: mx.array, bias: mx.array | None, stride: int = 1, padding: int = 0,
           cached=None) -> mx.array:
    """torch-style conv2d on NHWC input with an (out, kh, kw, in) weight, plus bias.

    `cached(key)` returns `derived_weights(weight, key)` from the caller's cache; without
    it they are computed per call.
    """
    out_channels, kh, kw, in_channels = weight.shape
    if kh == kw == 1 and stride == 1 and padding == 0:
        # A 1x1 conv is a matmul over channels.
        flat = x.reshape(-1, in_channels)
        w = weight.reshape(out_channels, in_channels).T
        y = mx.addmm(bias, flat, w) if bias is not None else flat @ w
        return y.reshape(*x.shape[:-1], out_channels)
    m = winograd_tile(x, weight, stride, padding)
    if m:
        transformed = cached(("winograd", m)) if cached else winograd_weights(weight, m)
        padded = mx.pad(x, [(0, 0), (padding, padding), (padding, padding), (0, 0)])
        return winograd_correlate(padded, transformed, m, kh, bias, x.shape[1], x.shape[2])
    B, H, W, _ = x.shape
    if (_on_cpu(x) and stride == 1 and out_channels <= _SHIFT_MAX_OUT and H * W >= _SHIFT_MIN_PIXELS
            and 2 * padding == kh - 1 == kw - 1):
        # Few output channels on a large map (the VAE's conv_out): MLX unfolds kh*kw copies of
        # the input for one thin matmul. Instead, on the padded image flattened to rows of
        # width W + 2p, tap (i, j) of every output pixel is the same row offset i (W + 2p) + j:
        # one matmul per tap over a contiguous slice, summed; the 2p extra columns are dropped.
        row = W + 2 * padding
        flat = mx.pad(x, [(0, 0), (padding, padding + 1), (padding, padding), (0, 0)]).reshape(B, -1, in_channels)
        total = None
        for i in range(kh):
            for j in range(kw):
                tap = flat[:, i * row + j: i * row + j + H * row, :] @ weight[:, i, j, :].T  # (B, H * row, out)
                total = tap if total is None else total + tap
        y = total.reshape(B, H, row, out_channels)[:, :, :W, :]
        return y + bias if bias is not None else y
    if _on_cpu(x) and stride == 1 and kh * kw * in_channels <= _IM2COL_MAX_DEPTH:
        # Few input channels (the UNet's conv_in): MLX's conv is slow there; unfold and matmul.
        out_h, out_w = H + 2 * padding - kh + 1, W + 2 * padding - kw + 1
        padded = mx.pad(x, [(0, 0), (padding, padding), (padding, padding), (0, 0)])
        columns = mx.concatenate([padded[:, i:i + out_h, j:j + out_w, :] for i in range(kh) for j in range(kw)],
                                 axis=-1).reshape(-1, kh * kw * in_channels)  # (pixels, taps x in)
        w = weight.reshape(out_channels, -1).T
        y = mx.addmm(bias, columns, w) if bias is not None else columns @ w
        return y.reshape(B, out_h, out_w, out_channels)
    y = mx.conv2d(x, weight, stride=stride, padding=padding)
    return y + bias if bias is not None else y


# Nearest 2x upsampling followed by a 3x3 conv (padding 1) equals, for each output parity
# (row a, column b), a 2x2 conv on the low-resolution input: output row 2i + a reads
# upsampled rows 2i + a - 1 .. 2i + a + 1, i.e. input rows (i - 1, i) for a = 0 and
# (i, i + 1) for a = 1, so kernel rows fold as [w0, w1 + w2] and [w0 + w1, w2]. That is
# 16 instead of 36 multiply-adds per input pixel and channel pair, and no 4x-sized
# upsampled copy to unfold; large maps run the 2x2 convs as Winograd F(m, 2).
_ROW_FOLDS = (((0,), (1, 2)), ((0, 1), (2,)))


def subpixel_kernels(weight: mx.array) -> list:
    """The four folded (out, 2, 2, in) kernels of a (out, 3, 3, in) kernel, ordered (a, b) row-major."""

    def fold(w: mx.array, axis: int, groups) -> mx.array:
        taps = [mx.take(w, mx.array(i), axis=axis) for i in range(3)]  # each drops `axis`
        return mx.stack([sum(taps[i] for i in group) for group in groups], axis=axis)

    return [fold(fold(weight, 1, _ROW_FOLDS[a]), 2, _ROW_FOLDS[b]) for a in range(2) for b in range(2)]


@functools.lru_cache(maxsize=None)
def _folded_winograd_transforms(m: int) -> tuple:
    """Input (4 n^2, (n+1)^2) and output (4 m^2, 4 n^2) transforms of the four parities' F(m, 2)
    on one shared tile grid: parity (a, b) reads the n x n window at offset (a, b) of an
    (n + 1) x (n + 1) window. Rows are ordered (a, b, tile position)."""
    input_transform, output_transform = _winograd_tile_transforms(m, 2)
    n = m + 1
    window = mx.arange((n + 1) ** 2).reshape(n + 1, n + 1)
    blocks = []
    for a in range(2):
        for b in range(2):
            columns = window[a:a + n, b:b + n].reshape(-1)  # window positions this parity reads
            placed = mx.zeros((n * n, (n + 1) ** 2), mx.float32)
            blocks.append(placed.at[:, columns].add(input_transform))
    parity_input = mx.concatenate(blocks, axis=0)
    parity_output = mx.zeros((4 * m * m, 4 * n * n), mx.float32)
    for p in range(4):
        parity_output = parity_output.at[p * m * m:(p + 1) * m * m, p * n * n:(p + 1) * n * n].add(output_transform)
    return parity_input, parity_output


def upsample2x_conv3x3(x: mx.array, weight: mx.array, bias: mx.array | None, cached=None) -> mx.array:
    """conv2d(nearest_upsample_2x(x), weight, padding=1) + bias for NHWC x.

    `cached(key)` as for `conv2d`.
    """
    B, H, W, C = x.shape
    if not _on_cpu(x):
        up = mx.broadcast_to(x[:, :, None, :, None, :], (B, H, 2, W, 2, C)).reshape(B, 2 * H, 2 * W, C)
        return conv2d(up, weight, bias, padding=1)
    get = cached or (lambda key: derived_weights(weight, key))
    padded = mx.pad(x, [(0, 0), (1, 1), (1, 1), (0, 0)])
    m = winograd_tile(padded[:, 1:, 1:, :], weight[:, :2, :2, :], padding=0)  # valid 2x2 over (H + 1, W + 1)
    if m:
        # All four parities' F(m, 2) at once, on one grid of (m + 2) x (m + 2) windows.
        n, out_channels = m + 1, weight.shape[0]
        tiles_h, tiles_w = -(-H // m), -(-W // m)
        need_h, need_w = m * tiles_h + n, m * tiles_w + n
        padded = mx.pad(padded, [(0, 0), (0, need_h - padded.shape[1]), (0, need_w - padded.shape[2]), (0, 0)])
        parity_input, parity_output = _folded_winograd_transforms(m)
        windows = mx.stack([padded[:, i: i + m * tiles_h: m, j: j + m * tiles_w: m, :]
                            for i in range(n + 1) for j in range(n + 1)], axis=0).reshape((n + 1) ** 2, -1)
        transformed_input = (parity_input @ windows).reshape(4 * n * n, -1, C)  # (4 n^2, tiles, C)
        products = transformed_input @ get(("folded-winograd", m))  # (4 n^2, tiles, out)
        corners = (parity_output @ products.reshape(4 * n * n, -1)).reshape(
            2, 2, m, m, B, tiles_h, tiles_w, out_channels)  # (a, b, y, x, B, tile row, tile col, out)
        # Output pixel (2 (m ti + y) + a, 2 (m tj + x) + b).
        out = corners.transpose(4, 5, 2, 0, 6, 3, 1, 7).reshape(B, 2 * m * tiles_h, 2 * m * tiles_w, out_channels)
        if (m * tiles_h, m * tiles_w) != (H, W):
            out = out[:, :2 * H, :2 * W, :]
    else:
        kernels = get(("folded", 0))
        parts = [mx.conv2d(padded[:, a:a + H + 1, b:b + W + 1, :], kernels[2 * a + b])
                 for a in range(2) for b in range(2)]  # each (B, H, W, out)
        out = mx.stack(parts, axis=3).reshape(B, H, W, 2, 2, -1)  # (B, H, W, a, b, out)
        out = out.transpose(0, 1, 3, 2, 4, 5).reshape(B, 2 * H, 2 * W, -1)
    return out + bias if bias is not None else out
