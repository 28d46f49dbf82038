"""Convolutions that are fast on MLX's CPU backend (UNet, VAE): Winograd 3x3 convs,
folded nearest-upsample + conv, and matmul paths for few input or output channels.
CPU float32 only; `lavit_mlx.ops` uses MLX's own convolution elsewhere.

A conv whose working arrays (Winograd tile stacks, MLX's unfolded input) would exceed
`CONV_SINGLE_PASS_BYTES` runs over bands of output rows of `CONV_BAND_BYTES` each, one
after the other. Winograd bands start on whole tiles, so every output is computed exactly
as without bands; MLX's own conv over fewer rows may round differently in BLAS (1e-7).
`working_bytes` gives that working memory from shapes alone (memory estimates).
"""

from __future__ import annotations

import functools
import math
from fractions import Fraction

import mlx.core as mx

from .kernels import in_sequence

# A VAE at 1024^2 has 512 MiB activations; their Winograd stacks are 2-4 times that.
CONV_SINGLE_PASS_BYTES = 128 * 2**20
# Bands stay small because MLX allocates an operation's output (and its temporaries)
# when it queues it, up to `QUEUED_OPERATIONS` unfinished operations ahead.
CONV_BAND_BYTES = 32 * 2**20
QUEUED_OPERATIONS = 10
_WINOGRAD_BAND_OPERATIONS = 6  # stack, three transform/product matmuls, the reorder, the bias

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
    return winograd_tile_for(tuple(x.shape), tuple(weight.shape), stride, padding)


def winograd_tile_for(x_shape: tuple, weight_shape: tuple, stride: int = 1, padding: int = 1) -> int:
    """`winograd_tile` from shapes: x (B, H, W, in), weight (out, kh, kw, in)."""
    out_channels, kh, kw, in_channels = weight_shape
    if not (kh == kw and kh in (2, 3) and stride == 1
            and min(in_channels, out_channels) >= _WINOGRAD_MIN_CHANNELS):
        return 0
    out_h, out_w = x_shape[1] + 2 * padding - kh + 1, x_shape[2] + 2 * padding - kw + 1

    def tiles(m: int) -> int:
        return x_shape[0] * -(-out_h // m) * -(-out_w // m)

    channels = min(in_channels, out_channels)
    if _m_available(4, kh) and tiles(4) >= _WINOGRAD_MIN_TILES_4 and tiles(4) * channels >= _WINOGRAD_MIN_WORK_4:
        return 4
    if _m_available(2, kh) and tiles(2) * channels >= _WINOGRAD_MIN_WORK_2:
        return 2
    return 0


def _m_available(m: int, r: int) -> bool:
    return m + r - 2 in _WINOGRAD_POINTS


def _bands(count: int, unit_bytes: int) -> list:
    """[(start, stop)] covering range(count): one band when count units of unit_bytes fit
    CONV_SINGLE_PASS_BYTES, else bands of at most CONV_BAND_BYTES."""
    if count * unit_bytes <= CONV_SINGLE_PASS_BYTES:
        return [(0, count)]
    size = max(1, CONV_BAND_BYTES // max(1, unit_bytes))
    return [(start, min(start + size, count)) for start in range(0, count, size)]


def _queued_bytes(bands: list, unit_bytes: int, operations_per_band: int) -> int:
    """Bytes of the bands whose operations are queued at once (see QUEUED_OPERATIONS)."""
    alive = min(len(bands), 1 + -(-QUEUED_OPERATIONS // operations_per_band))
    return alive * unit_bytes * max(stop - start for start, stop in bands)


def _banded(x: mx.array, bands: list, rows, fn) -> mx.array:
    """fn(x[:, rows(start, stop)], start, stop) for each band, one after the other, joined along H."""
    if len(bands) == 1:
        start, stop = bands[0]
        return fn(x[:, rows(start, stop)], start, stop)
    pieces = [x[:, rows(start, stop)] for start, stop in bands]
    outs = in_sequence(pieces, lambda piece, i: fn(piece, *bands[i]))
    return mx.concatenate(outs, axis=1)


def winograd_stack_bytes(tiles: int, m: int, r: int, in_channels: int, out_channels: int, folded: bool = False) -> int:
    """Bytes of the largest float32 array of a Winograd F(m, r) over `tiles` tiles: the stacked
    input tiles, their transforms or the products (four parities' worth when `folded`)."""
    n = m + r - 1
    positions = max(4 * n * n, (n + 1) ** 2) if folded else n * n
    return 4 * tiles * positions * max(in_channels, out_channels)


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

    def band(rows: mx.array, start: int, stop: int) -> mx.array:
        count = stop - start  # tile rows in this band
        # Tile position (i, j) of every tile: (n^2, B * count * tiles_w * C).
        tiles = mx.stack([rows[:, i: i + m * count: m, j: j + m * tiles_w: m, :]
                          for i in range(n) for j in range(n)], axis=0).reshape(n * n, -1)
        transformed_input = (input_transform @ tiles).reshape(n * n, -1, C)  # (n^2, tiles, C)
        products = transformed_input @ transformed  # (n^2, tiles, out)
        corners = (output_transform @ products.reshape(n * n, -1)).reshape(m, m, B, count, tiles_w, out_channels)
        out = corners.transpose(2, 3, 0, 4, 1, 5).reshape(B, m * count, m * tiles_w, out_channels)
        band_h = min(out_h - m * start, m * count)
        if (m * count, m * tiles_w) != (band_h, out_w):
            out = out[:, :band_h, :out_w, :]
        return out + bias if bias is not None else out

    bands = _bands(tiles_h, winograd_stack_bytes(B * tiles_w, m, r, C, out_channels))
    return _banded(padded, bands, lambda start, stop: slice(m * start, m * stop + r - 1), band)


def _direct_conv(x: mx.array, weight: mx.array, stride: int, padding: int) -> mx.array:
    """mx.conv2d; in bands of output rows when its unfolded input would exceed CONV_SINGLE_PASS_BYTES."""
    out_channels, kh, kw, in_channels = weight.shape
    B, H, W, _ = x.shape
    out_h = (H + 2 * padding - kh) // stride + 1
    out_w = (W + 2 * padding - kw) // stride + 1
    bands = _bands(out_h, 4 * B * out_w * kh * kw * in_channels)
    if len(bands) == 1:
        return mx.conv2d(x, weight, stride=stride, padding=padding)
    padded = mx.pad(x, [(0, 0), (padding, padding), (padding, padding), (0, 0)])
    return _banded(padded, bands, lambda start, stop: slice(stride * start, stride * (stop - 1) + kh),
                   lambda rows, start, stop: mx.conv2d(rows, weight, stride=stride))


def working_bytes(x_shape: tuple, weight_shape: tuple, stride: int = 1, padding: int = 0,
                  upsample: bool = False) -> int:
    """Bytes of a conv's float32 working arrays beyond its input and output, from shapes:
    `conv2d`, or `upsample2x_conv3x3` when `upsample`. A Winograd band holds its tile
    stack, the transformed stack and the products at once, next to the padded input;
    banded, the bands queued together count (QUEUED_OPERATIONS)."""
    B, H, W, C = x_shape
    out_channels, kh, kw, _ = weight_shape
    padded = 4 * B * (H + 2 * padding + 1) * (W + 2 * padding + 1) * C
    if upsample:
        m = winograd_tile_for((B, H + 1, W + 1, C), (out_channels, 2, 2, C), 1, 0)
        if m:
            unit = winograd_stack_bytes(B * -(-W // m), m, 2, C, out_channels, folded=True)
            bands = _bands(-(-H // m), unit)
            return 3 * _queued_bytes(bands, unit, _WINOGRAD_BAND_OPERATIONS) + 2 * 4 * B * (H + 2 + m) * (W + 2 + m) * C
        # Four folded 2x2 convs, each unfolding (B, H, W, 4 C), and their stacked outputs.
        return padded + 4 * B * H * W * (4 * C + 4 * out_channels)
    if kh == kw == 1 and stride == 1 and padding == 0:
        return 0
    m = winograd_tile_for(x_shape, weight_shape, stride, padding)
    out_h = (H + 2 * padding - kh) // stride + 1
    out_w = (W + 2 * padding - kw) // stride + 1
    if m:
        unit = winograd_stack_bytes(B * -(-out_w // m), m, kh, C, out_channels)
        bands = _bands(-(-out_h // m), unit)
        return 3 * _queued_bytes(bands, unit, _WINOGRAD_BAND_OPERATIONS) + padded
    if stride == 1 and out_channels <= _SHIFT_MAX_OUT and H * W >= _SHIFT_MIN_PIXELS and 2 * padding == kh - 1:
        return padded + kh * kw * 4 * B * H * (W + 2 * padding) * out_channels  # flattened rows, each tap's product
    if stride == 1 and kh * kw * C <= _IM2COL_MAX_DEPTH:
        return padded + 4 * B * out_h * out_w * kh * kw * C
    unit = 4 * B * out_w * kh * kw * C  # MLX's unfolded input, per output row
    bands = _bands(out_h, unit)
    # Each band's conv also copies its rows padded; MLX pads the whole input once more.
    return _queued_bytes(bands, unit + unit // (kh * kw), 1) + 2 * padded


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
    if (stride == 1 and out_channels <= _SHIFT_MAX_OUT and H * W >= _SHIFT_MIN_PIXELS
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
    if stride == 1 and kh * kw * in_channels <= _IM2COL_MAX_DEPTH:
        # Few input channels (the UNet's conv_in): MLX's conv is slow there; unfold and matmul.
        out_h, out_w = H + 2 * padding - kh + 1, W + 2 * padding - kw + 1
        padded = mx.pad(x, [(0, 0), (padding, padding), (padding, padding), (0, 0)])
        columns = mx.concatenate([padded[:, i:i + out_h, j:j + out_w, :] for i in range(kh) for j in range(kw)],
                                 axis=-1).reshape(-1, kh * kw * in_channels)  # (pixels, taps x in)
        w = weight.reshape(out_channels, -1).T
        y = mx.addmm(bias, columns, w) if bias is not None else columns @ w
        return y.reshape(B, out_h, out_w, out_channels)
    y = _direct_conv(x, weight, stride, padding)
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
        kernels = get(("folded-winograd", m))

        def band(rows: mx.array, start: int, stop: int) -> mx.array:
            count = stop - start  # tile rows in this band
            windows = mx.stack([rows[:, i: i + m * count: m, j: j + m * tiles_w: m, :]
                                for i in range(n + 1) for j in range(n + 1)], axis=0).reshape((n + 1) ** 2, -1)
            transformed_input = (parity_input @ windows).reshape(4 * n * n, -1, C)  # (4 n^2, tiles, C)
            products = transformed_input @ kernels  # (4 n^2, tiles, out)
            corners = (parity_output @ products.reshape(4 * n * n, -1)).reshape(
                2, 2, m, m, B, count, tiles_w, out_channels)  # (a, b, y, x, B, tile row, tile col, out)
            # Output pixel (2 (m ti + y) + a, 2 (m tj + x) + b).
            out = corners.transpose(4, 5, 2, 0, 6, 3, 1, 7).reshape(B, 2 * m * count, 2 * m * tiles_w, out_channels)
            band_h = min(H - m * start, m * count)
            if (m * count, m * tiles_w) != (band_h, W):
                out = out[:, :2 * band_h, :2 * W, :]
            return out + bias if bias is not None else out

        bands = _bands(tiles_h, winograd_stack_bytes(B * tiles_w, m, 2, C, out_channels, folded=True))
        return _banded(padded, bands, lambda start, stop: slice(m * start, m * stop + n), band)
    kernels = get(("folded", 0))
    parts = [_direct_conv(padded[:, a:a + H + 1, b:b + W + 1, :], kernels[2 * a + b], 1, 0)
             for a in range(2) for b in range(2)]  # each (B, H, W, out)
    out = mx.stack(parts, axis=3).reshape(B, H, W, 2, 2, -1)  # (B, H, W, a, b, out)
    out = out.transpose(0, 1, 3, 2, 4, 5).reshape(B, 2 * H, 2 * W, -1)
    return out + bias if bias is not None else out
