"""Building blocks shared by the UNet and the VAE, with diffusers semantics and key names:
convolutions (CPU kernels cached per conv in eval mode), GroupNorm, ResnetBlock2D, down/up samplers,
attention, the transformer block of the UNet, and reading diffusers model folders.

Follows diffusers 0.42 `models/resnet.py`, `models/attention.py`,
`models/attention_processor.py`, `models/transformers/transformer_2d.py`. Activations are
channels-last (NHWC). The heavy operations go through `lavit_mlx.ops` (CPU kernels in float32 on the CPU,
MLX's own operations elsewhere).
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import CheckpointError, LaVITError
from ..weights import Weights, read_json
from .. import ops
from ..cpu.conv import derived_weights
from .layers import merge_heads, split_heads

# diffusers' padding bias for masked-out context tokens (unet_2d_condition.py).
MASK_BIAS = -10000.0
# Fixed by diffusers whatever the config: GroupNorm eps of the transformer input norm,
# LayerNorm eps of the transformer blocks, the GEGLU width multiplier, the sinusoid base.
TRANSFORMER_GROUP_NORM_EPS = 1e-6
TRANSFORMER_LAYER_NORM_EPS = 1e-5
FEED_FORWARD_MULT = 4


def as_mx(x, dtype=None) -> mx.array:
    x = x if isinstance(x, mx.array) else mx.array(np.asarray(x))
    return x if dtype is None else x.astype(dtype)


# --------------------------------------------------------------------------- building blocks
class DerivedWeights:
    """CPU re-arrangements of a conv kernel (`lavit_mlx.cpu.conv.derived_weights`, the Winograd
    and folded forms), kept per key for the weight array they were made from.

    Correct and bounded:
    - only in eval mode: `Conv2d.cached` asks for a fresh form while the module trains
      (its weight changes every step, and under `mx.compile` or `value_and_grad` it is
      a tracer) and the cache is emptied then;
    - the forms belong to one weight, recognised by identity (a weak reference: the old
      weight is not kept alive), shape and dtype; any other weight empties the cache,
      and `Conv2d` empties it as soon as its weight is assigned anew (`conv.weight = w`,
      `update`, `load_weights`, an optimizer step), so a replaced weight's forms do not
      linger until the next call. Changing an array in place (`conv.weight += d`,
      `conv.weight[...] = v`) keeps its identity and cannot be seen: `release()` then
      (or `release_derived_weights(module)`);
    - at most `MAX_FORMS` forms (one per Winograd tile size met, least recently used
      dropped first).

    A plain object, not an array container, so MLX does not count it as a parameter.
    Winograd forms take (n/r)^2 times the kernel's memory: 16/9 for F(2x2, 3x3), 4x for
    F(4x4, 3x3).
    """

    MAX_FORMS = 4

    def __init__(self):
        self._weight = None  # weakref.ref to the weight the forms belong to
        self._signature = None  # (shape, dtype) of that weight
        self.values: "OrderedDict[tuple, object]" = OrderedDict()

    def get(self, weight: mx.array, key: tuple, cache: bool = True):
        """The form `key` of `weight`; with `cache` False (training) computed afresh, nothing kept."""
        if not cache:
            self.release()
            return derived_weights(weight, key)
        signature = (tuple(weight.shape), weight.dtype)
        if self._weight is None or self._weight() is not weight or self._signature != signature:
            self.release()
            self._weight, self._signature = weakref.ref(weight), signature
        value = self.values.get(key)
        if value is None:
            value = self.values[key] = derived_weights(weight, key)
            while len(self.values) > self.MAX_FORMS:
                self.values.popitem(last=False)
        else:
            self.values.move_to_end(key)
        return value

    def release(self) -> int:
        """Drop every form; returns the bytes they held."""
        held = self.nbytes
        self._weight = self._signature = None
        self.values = OrderedDict()
        return held

    @property
    def nbytes(self) -> int:
        arrays = [a for v in self.values.values() for a in (v if isinstance(v, (list, tuple)) else [v])]
        return sum(a.nbytes for a in arrays)


def release_derived_weights(module) -> int:
    """Drop the cached conv forms of every `Conv2d` in `module` (an `nn.Module`, or any
    object whose `unet`/`vae` are, such as a `PixelDecoder`); returns the bytes freed."""
    if not isinstance(module, nn.Module):
        return sum(release_derived_weights(getattr(module, name)) for name in ("unet", "vae")
                   if isinstance(getattr(module, name, None), nn.Module))
    return sum(m.derived.release() for m in module.modules() if isinstance(m, Conv2d))


class Conv2d(nn.Module):
    """A torch-style 2-D convolution on NHWC input; `weight` is (out, kh, kw, in) as MLX stores it.

    On the CPU, large 3x3 convolutions run as Winograd convolutions (see lavit_mlx.cpu.conv),
    whose transformed kernels are cached in eval mode (`DerivedWeights`).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, bias: bool = True):
        super().__init__()
        self.derived = DerivedWeights()
        self.stride = stride
        self.padding = padding
        self.weight = mx.zeros((out_channels, kernel_size, kernel_size, in_channels))
        if bias:
            self.bias = mx.zeros((out_channels,))

    def __setitem__(self, key, value):
        # every way of assigning a parameter (attribute, `update`, `load_weights`) lands here
        if key == "weight" and "derived" in self.__dict__:
            self.derived.release()
        super().__setitem__(key, value)

    def __delitem__(self, key):
        if key == "weight" and "derived" in self.__dict__:
            self.derived.release()
        super().__delitem__(key)

    def cached(self, key: tuple):
        """The derived form `key` of the weight: cached in eval mode, afresh while training."""
        return self.derived.get(self.weight, key, cache=not self.training)

    def __call__(self, x: mx.array) -> mx.array:
        return ops.conv2d(x, self.weight, self.get("bias"), self.stride, self.padding, self.cached)


class GroupNorm(nn.Module):
    """torch.nn.GroupNorm (affine) over channels-last input; `silu=True` fuses the activation."""

    def __init__(self, num_groups: int, num_channels: int, eps: float):
        super().__init__()
        self.num_groups = num_groups
        self.eps = eps
        self.weight = mx.ones((num_channels,))
        self.bias = mx.zeros((num_channels,))

    def __call__(self, x: mx.array, silu: bool = False) -> mx.array:
        return ops.group_norm(x, self.weight, self.bias, self.num_groups, self.eps, silu)


class ResnetBlock2D(nn.Module):
    """diffusers `ResnetBlock2D` with time_scale_shift 'default' (temb added after conv1)."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: Optional[int], groups: int,
                 eps: float, output_scale_factor: float = 1.0):
        super().__init__()
        self.output_scale_factor = output_scale_factor
        self.norm1 = GroupNorm(groups, in_channels, eps)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        if temb_channels is not None:
            self.time_emb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = GroupNorm(groups, out_channels, eps)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.conv_shortcut = Conv2d(in_channels, out_channels, 1)

    def __call__(self, x: mx.array, temb_act: Optional[mx.array] = None) -> mx.array:
        """x: (B, H, W, C); temb_act: silu(time embedding), (B, temb_channels)."""
        h = self.conv1(self.norm1(x, silu=True))
        if temb_act is not None:
            h = h + self.time_emb_proj(temb_act)[:, None, None, :]
        h = self.conv2(self.norm2(h, silu=True))  # dropout: identity at inference
        if "conv_shortcut" in self:
            x = self.conv_shortcut(x)
        out = x + h
        return out if self.output_scale_factor == 1.0 else out / self.output_scale_factor


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv; with padding 0, diffusers pads one row/column at the bottom/right."""

    def __init__(self, channels: int, padding: int):
        super().__init__()
        self.pad_bottom_right = padding == 0
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=padding)

    def __call__(self, x: mx.array) -> mx.array:
        if self.pad_bottom_right:
            x = mx.pad(x, [(0, 0), (0, 1), (0, 1), (0, 0)])
        return self.conv(x)


def upsample_nearest(x: mx.array, size: Optional[tuple] = None) -> mx.array:
    """torch's `interpolate(mode='nearest')` on NHWC: 2x, or to `size` = (H, W)."""
    B, H, W, C = x.shape
    if size is None or tuple(size) == (2 * H, 2 * W):
        x = mx.broadcast_to(x[:, :, None, :, None, :], (B, H, 2, W, 2, C))
        return x.reshape(B, 2 * H, 2 * W, C)
    out_h, out_w = size
    # torch's nearest: source index floor(dst * in / out).
    rows = mx.array((np.arange(out_h) * H) // out_h)
    cols = mx.array((np.arange(out_w) * W) // out_w)
    return mx.take(mx.take(x, rows, axis=1), cols, axis=2)


class Upsample2D(nn.Module):
    """Nearest 2x upsampling, then a 3x3 conv (as four folded 2x2 convs on the CPU, see lavit_mlx.cpu.conv)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def __call__(self, x: mx.array, size: Optional[tuple] = None) -> mx.array:
        B, H, W, _ = x.shape
        if size is not None and tuple(size) != (2 * H, 2 * W):
            return self.conv(upsample_nearest(x, size))
        return ops.upsample2x_conv3x3(x, self.conv.weight, self.conv.get("bias"), self.conv.cached)


@dataclass
class UNetContext:
    """A conditioning projected once: each cross-attention's keys and values, and the mask bias.

    Made by `UNet2DConditionModel.prepare_context`; pass it as `encoder_hidden_states` to
    reuse the projections across denoising steps (they do not depend on the latents).
    """

    keys_values: dict  # id(cross-attention module) -> (k, v), each (B, heads, L, head_dim)
    bias: Optional[mx.array]  # (B, 1, 1, L) additive mask bias, or None
    batch: int


class Attention(nn.Module):
    """diffusers `Attention` (processor AttnProcessor2_0) without norms: q/k/v, softmax, `to_out.0`."""

    def __init__(self, query_dim: int, heads: int, dim_head: int, context_dim: Optional[int] = None,
                 bias: bool = False):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.scale = dim_head ** -0.5
        self.to_q = nn.Linear(query_dim, inner, bias=bias)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=bias)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=bias)
        self.to_out = [nn.Linear(inner, query_dim)]  # to_out.1 is dropout

    def project_context(self, context: mx.array) -> tuple:
        """(k, v) of a (B, L, context_dim) context, each (B, heads, L, head_dim)."""
        return split_heads(self.to_k(context), self.heads), split_heads(self.to_v(context), self.heads)

    def __call__(self, x: mx.array, context=None, bias: Optional[mx.array] = None) -> mx.array:
        """x: (B, N, query_dim); context: (B, L, context_dim), a UNetContext, or None (self-attention);
        bias: additive, (B, 1, 1, L)."""
        if isinstance(context, UNetContext):
            k, v = context.keys_values[id(self)]
        else:
            k, v = self.project_context(x if context is None else context)
        q = split_heads(self.to_q(x), self.heads)  # (B, heads, N, head_dim)
        return self.to_out[0](merge_heads(ops.attention(q, k, v, self.scale, bias)))


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def __call__(self, x: mx.array) -> mx.array:
        hidden, gate = mx.split(self.proj(x), 2, axis=-1)
        return ops.geglu(hidden, gate)


class Dropout(nn.Module):
    """Placeholder that keeps diffusers' list indices (`ff.net.2`); identity at inference."""

    def __call__(self, x: mx.array) -> mx.array:
        return x


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.net = [GEGLU(dim, dim * FEED_FORWARD_MULT), Dropout(), nn.Linear(dim * FEED_FORWARD_MULT, dim)]

    def __call__(self, x: mx.array) -> mx.array:
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        dim_head = dim // heads
        self.norm1 = nn.LayerNorm(dim, eps=TRANSFORMER_LAYER_NORM_EPS)
        self.attn1 = Attention(dim, heads, dim_head)
        self.norm2 = nn.LayerNorm(dim, eps=TRANSFORMER_LAYER_NORM_EPS)
        self.attn2 = Attention(dim, heads, dim_head, context_dim)
        self.norm3 = nn.LayerNorm(dim, eps=TRANSFORMER_LAYER_NORM_EPS)
        self.ff = FeedForward(dim)

    def __call__(self, x: mx.array, context: mx.array, context_bias: Optional[mx.array]) -> mx.array:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context, context_bias)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    """GroupNorm, `proj_in` (Linear or 1x1 conv), transformer blocks, `proj_out`, residual."""

    def __init__(self, channels: int, heads: int, depth: int, context_dim: int, groups: int,
                 use_linear_projection: bool):
        super().__init__()
        self.norm = GroupNorm(groups, channels, TRANSFORMER_GROUP_NORM_EPS)
        # A 1x1 conv is the same map as a Linear; only the stored weight shape differs.
        proj = (lambda: nn.Linear(channels, channels)) if use_linear_projection else (
            lambda: Conv2d(channels, channels, 1))
        self.proj_in = proj()
        self.transformer_blocks = [BasicTransformerBlock(channels, heads, context_dim) for _ in range(depth)]
        self.proj_out = proj()

    def __call__(self, x: mx.array, context: mx.array, context_bias: Optional[mx.array]) -> mx.array:
        B, H, W, C = x.shape
        h = self.proj_in(self.norm(x)).reshape(B, H * W, C)  # (B, tokens, C), raster order
        for block in self.transformer_blocks:
            h = block(h, context, context_bias)
        return self.proj_out(h.reshape(B, H, W, C)) + x


# --------------------------------------------------------------------------- UNet blocks
# diffusers passes `resnet_out_scale_factor` only to block types not supported here, so
# these blocks' resnets keep output scale 1 whatever the config says.


def sanitize_conv_weights(model: nn.Module, weights: Weights, source_layout: str) -> Weights:
    if source_layout not in ("torch", "mlx"):
        raise LaVITError(f"source_layout={source_layout!r}: expected 'torch' or 'mlx'")
    expected = {k: tuple(v.shape) for k, v in _flat_parameters(model).items() if v.ndim == 4}
    out = {}
    for key, value in weights.items():
        want = expected.get(key)
        if want is not None and value.ndim == 4:
            # (O, I, kh, kw) -> (O, kh, kw, I), copied: a strided view would be re-copied by every conv.
            converted = mx.contiguous(value.transpose(0, 2, 3, 1))
            fits_as_is, fits_converted = tuple(value.shape) == want, tuple(converted.shape) == want
            if fits_converted and (not fits_as_is or source_layout == "torch"):
                value = converted
        out[key] = value
    return out


def _flat_parameters(model: nn.Module) -> dict:
    from mlx.utils import tree_flatten

    return dict(tree_flatten(model.parameters()))


DIFFUSERS_STEM = "diffusion_pytorch_model"


def load_diffusers_model(folder: Path, model_cls, config_cls, what: str, dtype: mx.Dtype = mx.float32,
                         source_layout: str = "torch", stem: Optional[str] = None,
                         quantization: Optional[dict] = None):
    """A diffusers model folder (config.json + weights) -> `model_cls`, through the one
    loading path (`loading.load_component`). The weights' file stem follows the layout
    (`diffusion_pytorch_model` for diffusers files, `diffusion_mlx_model` for ours) unless given."""
    from ..layout import MLX_FORMAT
    from ..loading import load_component, read_diffusers_weights

    folder = Path(folder)
    if stem is None:  # ours are diffusion_mlx_model.*; MLX-layout weights under diffusers' name also load
        mlx_stem = MLX_FORMAT["pixel_weights"]
        stem = mlx_stem if source_layout == "mlx" and any(
            (folder / f"{mlx_stem}{suffix}").is_file() for suffix in (".safetensors", ".bin")) else DIFFUSERS_STEM
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder}: no config.json for the {what}")
    model = model_cls(config_cls.from_dict(read_json(folder / "config.json")))
    weights = read_diffusers_weights(folder, stem, what)
    return load_component(model, weights, str(folder), torch_layout=source_layout == "torch",
                          quantization=quantization, dtype=dtype)
