"""Peak memory of pixel decoding (guided UNet denoising, then the VAE), estimated from the
configs before anything heavy runs, and the memory this machine can still give.

MLX cannot report an allocation it fails to make: on the CPU its allocator hands the
failed `malloc` to the kernel, which segfaults without a message; past what is free,
the kernel's OOM killer ends the process. So a size that cannot fit must be refused
before it runs: `check_pixel_memory` raises a one-line `LaVITError` saying what to change.
`generation.check_generation_memory` does so before any generation or reconstruction
loads or runs anything heavy; `LAVIT_MEMORY_LIMIT_GB` caps the memory it counts on
("off" skips it).

The estimate follows what the models compute (`models/unet.py`, `models/vae.py`,
`models/diffusion_blocks.py`): it walks the UNet's and the VAE decoder's layers at
the latent size, keeps the UNet's skip connections alive until the up path takes them,
and adds the largest layer's working set: its input and outputs, the CPU convolutions'
working arrays (`cpu.conv.working_bytes`, Winograd bands included), the attention's
scores (one pass, or `ops.ATTENTION_CHUNK_BYTES` chunks), GEGLU's 8x-wide projection.
MLX allocates each operation's output when it queues it, a few operations ahead of
the one running, which the per-layer factors below include; they were calibrated
against the peak resident memory of real runs (README, "Pixel decoding memory"):
measured <= estimate <= 2 x measured.
"""

from __future__ import annotations

import os
import resource
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

from .errors import LaVITError

GiB = 2**30
# Guided denoising runs both branches (negative and positive) in one batch.
GUIDANCE_BRANCHES = 2
# Conditioning tokens of LaVIT's UNets (`LaVIT.decode_codes`).
CONTEXT_TOKENS = 256
# Attention in one pass holds its scores, the softmax weights and an intermediate of the
# compiled exp kernel (MLX splits fused kernels deeper than 11 operations): 3x the scores
# (measured 3.0-3.1). Chunked, about this many chunks' scores are allocated at once,
# those copies included (measured 7.5-8).
ATTENTION_PASS_COPIES = 3
ATTENTION_CHUNKS_ALIVE = 8
# Fused elementwise passes (GroupNorm+SiLU) hold their output, its two halves (two
# threads) and an intermediate of the split kernel: copies of the output size.
ELEMENTWISE_COPIES = 3
# A ResnetBlock2D: two GroupNorm+SiLU passes, the convs' outputs, the time embedding's
# sum, the shortcut, the residual sum: input and output sizes besides the larger conv's
# working arrays (measured 2.5-4.4 of each).
RESNET_COPIES = 3
# GEGLU: the (tokens, 8 C) projection, hidden * gelu(gate) with its halves and the split
# kernel's intermediates, the output: measured 29 hidden-state sizes.
FEED_FORWARD_COPIES = 29
# Process growth that does not scale with the image: OpenBLAS buffers, compiled
# kernels, the graph, the uint8 images.
RUNTIME_BYTES = 160 * 2**20
# glibc keeps freed blocks of its heap and MLX keeps a buffer cache: resident memory
# stays above MLX's active peak by this factor (measured 1.05-1.2).
RESIDENT_FACTOR = 1.25


@dataclass
class MemoryEstimate:
    """Estimated peak bytes of pixel decoding at one size (weights included)."""

    height: int
    width: int
    num_images: int
    denoise_bytes: int  # peak while the UNet denoises
    vae_bytes: int  # peak while the VAE decodes
    peak_bytes: int  # the larger of the two
    breakdown: Dict[str, int] = field(default_factory=dict)

    def describe(self) -> str:
        """'5.2 GiB (denoising 5.2 GiB, VAE 2.1 GiB)'."""
        return (f"{gib(self.peak_bytes)} (denoising {gib(self.denoise_bytes)}, "
                f"VAE decoding {gib(self.vae_bytes)})")


def gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


# ------------------------------------------------------------------------- the walk
class _Peak:
    """The largest `live + working` seen, `live` being the tensors held across layers."""

    def __init__(self):
        self.live = 0
        self.peak = 0
        self.at = ""

    def layer(self, working: int, name: str) -> None:
        if self.live + working > self.peak:
            self.peak, self.at = self.live + working, name


def _conv(x_shape, out_channels: int, kernel: int, stride: int = 1, padding: int = 0, upsample: bool = False,
          cpu: bool = True) -> int:
    """Working bytes of one conv (float32 CPU kernels; MLX's own conv on a GPU)."""
    if not cpu:
        return 0 if kernel == 1 else 2 * _nbytes(x_shape, 4)  # Metal's Winograd/unfold temporaries
    from .cpu.conv import working_bytes

    return working_bytes(tuple(x_shape), (out_channels, kernel, kernel, x_shape[-1]), stride, padding, upsample)


def _nbytes(shape, itemsize: int) -> int:
    total = itemsize
    for n in shape:
        total *= n
    return total


def _derived_bytes(x_shape, out_channels: int, upsample: bool, cpu: bool) -> int:
    """The cached Winograd form of a 3x3 conv's kernel (CPU only), for this input size."""
    if not cpu:
        return 0
    from .cpu.conv import winograd_tile_for

    B, H, W, C = x_shape
    if upsample:
        m = winograd_tile_for((B, H + 1, W + 1, C), (out_channels, 2, 2, C), 1, 0)
        return 4 * 4 * (m + 1) ** 2 * C * out_channels if m else 4 * 4 * 4 * C * out_channels
    m = winograd_tile_for(tuple(x_shape), (out_channels, 3, 3, C), 1, 1)
    return 4 * (m + 2) ** 2 * C * out_channels if m else 0


def _resnet(peak: _Peak, batch: int, h: int, w: int, c_in: int, c_out: int, itemsize: int, cpu: bool,
            name: str) -> int:
    """A ResnetBlock2D; returns the derived-kernel bytes of its two 3x3 convs."""
    x_in = _nbytes((batch, h, w, c_in), itemsize)
    out = _nbytes((batch, h, w, c_out), itemsize)
    convs = max(_conv((batch, h, w, c_in), c_out, 3, 1, 1, cpu=cpu),
                _conv((batch, h, w, c_out), c_out, 3, 1, 1, cpu=cpu))
    peak.layer(x_in + convs + RESNET_COPIES * (x_in + out), name)
    return (_derived_bytes((batch, h, w, c_in), c_out, False, cpu)
            + _derived_bytes((batch, h, w, c_out), c_out, False, cpu))


def _attention_working(batch: int, heads: int, queries: int, keys: int, itemsize: int) -> int:
    from . import ops

    scores = batch * heads * queries * keys * itemsize
    if scores <= ops.ATTENTION_SINGLE_PASS_BYTES:
        return ATTENTION_PASS_COPIES * scores
    one_row = batch * heads * keys * itemsize
    rows = max(1, ops.ATTENTION_CHUNK_BYTES // one_row)
    return min(ATTENTION_CHUNKS_ALIVE, ATTENTION_PASS_COPIES * -(-queries // rows)) * rows * one_row


def _transformer(peak: _Peak, batch: int, h: int, w: int, channels: int, heads: int, context_tokens: int,
                 itemsize: int, name: str) -> None:
    """A Transformer2DModel (its blocks run one after the other: one block's peak). The
    next stage allocates while the last one finishes, so two adjacent stages count."""
    tokens = h * w
    t = _nbytes((batch, tokens, channels), itemsize)
    around = 2 * t  # the residual input and the running hidden state
    self_attention = 5 * t + _attention_working(batch, heads, tokens, tokens, itemsize)  # norm, q, k, v, out
    cross_attention = 3 * t + _attention_working(batch, heads, tokens, context_tokens, itemsize)
    feed_forward = FEED_FORWARD_COPIES * t
    peak.layer(around + max(self_attention + cross_attention, cross_attention + feed_forward), name)


def _unet_walk(cfg, batch: int, h: int, w: int, itemsize: int, context_tokens: int, cpu: bool) -> tuple:
    """(forward peak bytes, prepared-context bytes, derived-kernel bytes, where) of one UNet call."""
    peak = _Peak()
    channels = list(cfg.block_out_channels)
    derived = 0
    context = 0
    sizes = []  # (h, w) per level; the down path rounds up as a stride-2 conv with padding 1
    for _ in channels:
        sizes.append((h, w))
        h, w = (h + 1) // 2, (w + 1) // 2
    act = lambda c, level: _nbytes((batch, *sizes[level], c), itemsize)  # noqa: E731

    # conv_in; its output is the first skip.
    peak.layer(act(cfg.in_channels, 0) + act(channels[0], 0)
               + _conv((batch, *sizes[0], cfg.in_channels), channels[0], cfg.conv_in_kernel,
                       padding=cfg.conv_in_kernel // 2, cpu=cpu), "conv_in")
    skips = []  # channels of each skip connection, in the order the down path makes them

    def keep(c: int, level: int) -> None:
        skips.append(c)
        peak.live += act(c, level)

    keep(channels[0], 0)
    c_prev = channels[0]
    for i, c in enumerate(channels):
        hi, wi = sizes[i]
        attention = cfg.down_block_types[i] == "CrossAttnDownBlock2D"
        for j in range(cfg.layers[i]):
            derived += _resnet(peak, batch, hi, wi, c_prev if j == 0 else c, c, itemsize, cpu, f"down {i} resnet")
            if attention:
                _transformer(peak, batch, hi, wi, c, cfg.heads[i], context_tokens, itemsize, f"down {i} attention")
                context += cfg.down_transformer_depths[i][j] * 2 * batch * context_tokens * c * itemsize
            keep(c, i)
        c_prev = c
        if i < len(channels) - 1:
            peak.layer(2 * act(c, i + 1) + _conv((batch, hi, wi, c), c, 3, 2, 1, cpu=cpu), f"down {i} downsample")
            keep(c, i + 1)

    # Mid block at the last level.
    last = len(channels) - 1
    c = channels[-1]
    derived += _resnet(peak, batch, *sizes[last], c, c, itemsize, cpu, "mid resnet")
    _transformer(peak, batch, *sizes[last], c, cfg.heads[-1], context_tokens, itemsize, "mid attention")
    context += cfg.mid_transformer_depth * 2 * batch * context_tokens * c * itemsize
    derived += _resnet(peak, batch, *sizes[last], c, c, itemsize, cpu, "mid resnet")

    reversed_channels = channels[::-1]
    c_x = c
    for i, c in enumerate(reversed_channels):
        level = last - i
        hi, wi = sizes[level]
        attention = cfg.up_block_types[i] == "CrossAttnUpBlock2D"
        for j in range(cfg.layers[::-1][i] + 1):
            c_skip = skips.pop()
            concatenated = act(c_x + c_skip, level)
            peak.live += concatenated  # the skip stays referenced until the resnet ran
            derived += _resnet(peak, batch, hi, wi, c_x + c_skip, c, itemsize, cpu, f"up {i} resnet")
            peak.live -= concatenated + act(c_skip, level)
            c_x = c
            if attention:
                depth = cfg.up_transformer_depths[i][j]
                _transformer(peak, batch, hi, wi, c, cfg.heads[::-1][i], context_tokens, itemsize,
                             f"up {i} attention")
                context += depth * 2 * batch * context_tokens * c * itemsize
        if i < len(channels) - 1:
            up_shape = (batch, hi, wi, c)
            peak.layer(act(c, level) + 2 * act(c, level - 1) + _conv(up_shape, c, 3, upsample=True, cpu=cpu),
                       f"up {i} upsample")
            derived += _derived_bytes(up_shape, c, True, cpu)
    c0 = channels[0]
    peak.layer(act(c0, 0) * (1 + ELEMENTWISE_COPIES) + act(cfg.out_channels, 0)
               + _conv((batch, *sizes[0], c0), cfg.out_channels, cfg.conv_out_kernel,
                       padding=cfg.conv_out_kernel // 2, cpu=cpu), "conv_out")
    return peak.peak, context, derived, peak.at


def _vae_walk(cfg, h: int, w: int, cpu: bool) -> tuple:
    """(peak bytes, derived-kernel bytes, where) of decoding one image, float32."""
    peak = _Peak()
    itemsize = 4
    channels = list(cfg.block_out_channels)[::-1]
    derived = 0
    c = channels[0]
    peak.layer(2 * _nbytes((1, h, w, c), itemsize) + _conv((1, h, w, cfg.latent_channels), c, 3, 1, 1, cpu=cpu),
               "conv_in")
    derived += _derived_bytes((1, h, w, cfg.latent_channels), c, False, cpu)
    derived += _resnet(peak, 1, h, w, c, c, itemsize, cpu, "mid resnet")
    if cfg.mid_block_add_attention:
        t = _nbytes((1, h * w, c), itemsize)
        peak.layer(6 * t + _attention_working(1, 1, h * w, h * w, itemsize), "mid attention")
    derived += _resnet(peak, 1, h, w, c, c, itemsize, cpu, "mid resnet")
    c_prev = c
    for i, c in enumerate(channels):
        for j in range(cfg.layers_per_block + 1):
            derived += _resnet(peak, 1, h, w, c_prev if j == 0 else c, c, itemsize, cpu, f"up {i} resnet")
        c_prev = c
        if i < len(channels) - 1:
            shape = (1, h, w, c)
            peak.layer(_nbytes(shape, itemsize) + 2 * 4 * _nbytes(shape, itemsize)
                       + _conv(shape, c, 3, upsample=True, cpu=cpu), f"up {i} upsample")
            derived += _derived_bytes(shape, c, True, cpu)
            h, w = 2 * h, 2 * w
    image = _nbytes((1, h, w, c), itemsize)
    peak.layer(image * (1 + ELEMENTWISE_COPIES) + _conv((1, h, w, c), cfg.out_channels, 3, 1, 1, cpu=cpu),
               "conv_out")
    return peak.peak, derived, peak.at


# ------------------------------------------------------------------------- public API
def estimate_pixel_decoding(unet_config, vae_config, height: int, width: int, num_images: int = 1,
                            dtype_bytes: int = 4, weight_bytes: int = 0, context_tokens: int = CONTEXT_TOKENS,
                            cpu: Optional[bool] = None) -> MemoryEstimate:
    """Peak memory of denoising and VAE-decoding `num_images` images of height x width.

    Args:
        unet_config, vae_config: diffusers config dicts, or `UNetConfig` / `VAEConfig`.
        height, width: the image size in pixels (multiples of the VAE's scale factor).
        num_images: images decoded together (the UNet batch is twice that: guidance).
        dtype_bytes: bytes per element of the UNet's activations (4 float32, 2 half);
            the VAE decodes in float32.
        weight_bytes: bytes of the loaded UNet and VAE parameters.
        context_tokens: conditioning tokens (256 in LaVIT).
        cpu: whether the CPU kernels run (Winograd working arrays and cached kernels);
            None: float32 and no GPU in use (`mlx.core.default_device()`).
    Returns:
        A MemoryEstimate; `breakdown` names the parts (bytes).
    """
    from .models.unet import UNetConfig
    from .models.vae import VAEConfig

    unet = unet_config if isinstance(unet_config, UNetConfig) else UNetConfig.from_dict(dict(unet_config))
    vae = vae_config if isinstance(vae_config, VAEConfig) else VAEConfig.from_dict(dict(vae_config))
    if cpu is None:
        import mlx.core as mx

        cpu = dtype_bytes == 4 and mx.default_device() == mx.cpu
    scale = 2 ** (len(vae.block_out_channels) - 1)
    h, w = height // scale, width // scale
    batch = GUIDANCE_BRANCHES * num_images

    forward, context, unet_derived, unet_at = _unet_walk(unet, batch, h, w, dtype_bytes, context_tokens, cpu)
    latents = 4 * _nbytes((batch, h, w, unet.in_channels), 4)  # latents, the scaled input, noise, the update
    vae_peak, vae_derived, vae_at = _vae_walk(vae, h, w, cpu)
    images = num_images * height * width * 3 * 5  # uint8 results plus one float32 image in flight

    def resident(active: int) -> int:
        return int(active * RESIDENT_FACTOR) + RUNTIME_BYTES

    denoise = weight_bytes + unet_derived + resident(forward + context + latents)
    decoding = weight_bytes + unet_derived + vae_derived + resident(vae_peak + images)
    breakdown = {
        "weights": weight_bytes,
        "cached_conv_kernels": unet_derived + vae_derived,
        "unet_context": context,
        f"unet_activations ({unet_at})": forward,
        f"vae_activations ({vae_at})": vae_peak,
        "runtime": RUNTIME_BYTES,
    }
    return MemoryEstimate(height, width, num_images, denoise, decoding, max(denoise, decoding), breakdown)


# The memory the check may count on, in GiB (at most what the machine has), or "off" to
# skip the check before generation (`lavit_mlx.generation.check_generation_memory`).
MEMORY_LIMIT_ENV = "LAVIT_MEMORY_LIMIT_GB"


def memory_limit() -> Optional[int]:
    """Bytes of `LAVIT_MEMORY_LIMIT_GB` (None when unset or "off"); a bad value is a
    one-line LaVITError naming the variable."""
    text = os.environ.get(MEMORY_LIMIT_ENV, "").strip()
    if not text or text.lower() == "off":
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (0 < value < float("inf")):
        raise LaVITError(f"{MEMORY_LIMIT_ENV}={text!r}: expected a number of GiB > 0, or 'off'")
    return int(value * GiB)


def memory_check_enabled() -> bool:
    """False when `LAVIT_MEMORY_LIMIT_GB=off`."""
    return os.environ.get(MEMORY_LIMIT_ENV, "").strip().lower() != "off"


def available_memory() -> int:
    """Bytes this process can still allocate: on Linux the smallest of the cgroup's
    remaining limit (v2 or v1), MemAvailable and the address-space limit (`ulimit -v`);
    on macOS the GPU's recommended working set (Metal) or the physical memory; at most
    `LAVIT_MEMORY_LIMIT_GB` when that is set."""
    if sys.platform == "darwin":
        found = _macos_memory()
    else:
        candidates = [_meminfo_available(), cgroup_available(), _address_space_left()]
        known = [c for c in candidates if c is not None]
        found = max(0, min(known)) if known else _physical_memory()
    limit = memory_limit()
    return found if limit is None else min(found, limit)


def parameter_bytes(module, itemsize: int = 4, bits: Optional[int] = None, group_size: int = 64) -> int:
    """Bytes the parameters of an unloaded module (built from its config: MLX arrays are
    lazy, nothing is allocated) will take once loaded in `itemsize`-byte floats; with
    `bits`, its Linear and Embedding layers quantized (packed weights, a scale and a bias
    per group), as `nn.quantize` does for widths divisible by `group_size`."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    total = 0
    for _, layer in tree_flatten(module.leaf_modules(), is_leaf=nn.Module.is_module):
        for name, value in tree_flatten(layer.parameters()):
            quantized = (bits and hasattr(layer, "to_quantized") and name == "weight"
                         and value.shape[-1] % group_size == 0)
            if quantized:
                total += value.size * bits // 8 + value.size // group_size * 2 * itemsize
            else:
                total += value.size * itemsize
    return total


ADVICE = "use a smaller --width/--height or --ratio, fewer -n, --low-memory, or --decoder lowres"


def check_pixel_memory(estimate: MemoryEstimate, available: Optional[int] = None, resident: int = 0,
                       kept: Sequence[Tuple[str, int]] = (), advice: str = ADVICE) -> None:
    """Raise a one-line LaVITError when `estimate` does not fit.

    Args:
        estimate: from `estimate_pixel_decoding` or `PixelDecoder.memory_estimate`.
        available: bytes available (default `available_memory()`).
        resident: bytes of the estimate already allocated (a loaded decoder's weights),
            which `available` no longer counts.
        kept: (what, bytes) held besides pixel decoding while it runs and not allocated
            yet (the LLM, kept loaded without --low-memory), named in the message.
        advice: what to change, the end of the message.
    """
    available = available_memory() if available is None else available
    others = sum(n for _, n in kept)
    needed = estimate.peak_bytes - resident + others
    if needed <= available:
        return
    images = f"{estimate.num_images} image{'s' if estimate.num_images != 1 else ''}"
    what = f"pixel decoding of {images} at {estimate.width}x{estimate.height} needs about "
    if resident:
        what += f"{gib(estimate.peak_bytes - resident)} more memory (peak {estimate.describe()}, weights loaded)"
    else:
        what += estimate.describe()
    for name, n in kept:
        what += f" plus {gib(n) if n >= GiB // 10 else f'{n / 2**20:.0f} MiB'} for {name}"
    raise LaVITError(f"{what}, but {gib(available)} is available: {advice}")


# ------------------------------------------------------------------------- platform probes
_UNLIMITED = 1 << 60


def _meminfo_available() -> Optional[int]:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _read_int(path: Path) -> Optional[int]:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text in ("", "max"):
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return value if value < _UNLIMITED else None


def cgroup_available(root: Path = Path("/sys/fs/cgroup"),
                     membership: Path = Path("/proc/self/cgroup")) -> Optional[int]:
    """limit - usage of this process's memory cgroup (v2 memory.max, v1
    memory.limit_in_bytes), None without a limit."""
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        return None
    found = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, group = parts
        group = group.lstrip("/")
        if controllers == "":  # v2
            pairs = [(root / group / "memory.max", root / group / "memory.current"),
                     (root / "memory.max", root / "memory.current")]
        elif "memory" in controllers.split(","):  # v1
            base = root / "memory"
            pairs = [(base / group / "memory.limit_in_bytes", base / group / "memory.usage_in_bytes"),
                     (base / "memory.limit_in_bytes", base / "memory.usage_in_bytes")]
        else:
            continue
        for limit_path, usage_path in pairs:
            limit = _read_int(limit_path)
            if limit is not None:
                found.append(limit - (_read_int(usage_path) or 0))
                break
    return min(found) if found else None


def _address_space_left() -> Optional[int]:
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY or soft >= _UNLIMITED:
        return None
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return soft - int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return soft


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def _macos_memory() -> int:
    mx = sys.modules.get("mlx.core")  # only if the process already uses MLX
    if mx is not None:
        try:
            info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
            size = int(info.get("max_recommended_working_set_size", 0))
            if size:
                return size
        except Exception:  # no Metal device (a CPU-only build)
            pass
    return _physical_memory()
