"""The cached Winograd / folded kernels of the diffusion convs (issue 9): cached in eval
mode only, once per weight, dropped when the weight is replaced, bounded, releasable."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest

import lavit_mlx.models.diffusion_blocks as blocks
from lavit_mlx.cpu.conv import winograd_tile
from lavit_mlx.models.diffusion_blocks import Conv2d, DerivedWeights, Upsample2D, release_derived_weights

CHANNELS = 64  # the smallest width the CPU kernels run as Winograd


@pytest.fixture(autouse=True)
def on_cpu():
    previous = mx.default_device()
    mx.set_default_device(mx.cpu)
    yield
    mx.set_default_device(previous)


@pytest.fixture
def transforms(monkeypatch):
    """Every derived form computed, by key."""
    made = []
    real = blocks.derived_weights

    def counting(weight, key):
        made.append(key)
        return real(weight, key)

    monkeypatch.setattr(blocks, "derived_weights", counting)
    return made


def conv(seed: int = 0, module=Conv2d) -> nn.Module:
    layer = Conv2d(CHANNELS, CHANNELS, 3, padding=1) if module is Conv2d else Upsample2D(CHANNELS)
    target = layer if module is Conv2d else layer.conv
    target.weight = 0.05 * mx.random.normal(target.weight.shape, key=mx.random.key(seed))
    target.bias = 0.1 * mx.random.normal(target.bias.shape, key=mx.random.key(seed + 100))
    return layer.eval()


def fresh_like(layer: nn.Module) -> nn.Module:
    """A new module of the same kind holding the same parameters: no cache to go stale."""
    other = conv(999, type(layer)).eval()
    other.update(layer.parameters())
    return other


def reference(layer: Conv2d, x: mx.array) -> mx.array:
    return mx.conv2d(x, layer.weight, padding=1) + layer.bias


def max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def test_shapes_run_as_winograd():
    layer, x = conv(), mx.random.normal((1, 64, 64, CHANNELS))
    assert winograd_tile(x, layer.weight, 1, 1) > 0  # the tests below exercise the cached path


def test_eval_caches_once_and_reuses(transforms):
    layer, x = conv(), mx.random.normal((1, 64, 64, CHANNELS))
    first = layer(x)
    second = layer(x)
    assert len(transforms) == 1 and list(layer.derived.values) == transforms
    assert max_diff(first, second) == 0.0
    assert max_diff(first, reference(layer, x)) < 1e-4


def test_nothing_is_cached_while_training(transforms):
    layer, x = conv(), mx.random.normal((1, 64, 64, CHANNELS))
    layer(x)
    assert layer.derived.values and len(transforms) == 1
    layer.train()
    for _ in range(3):
        out = layer(x)
    assert len(transforms) == 4  # afresh every call
    assert not layer.derived.values and layer.derived.nbytes == 0  # the eval-mode form was dropped too
    assert max_diff(out, reference(layer, x)) < 1e-4

    # gradients through the uncached transform are the direct conv's
    def loss(model, inputs):
        return (model(inputs) ** 2).mean()

    grad = nn.value_and_grad(layer, loss)(layer, x)[1]["weight"]
    direct = mx.grad(lambda w: ((mx.conv2d(x, w, padding=1) + layer.bias) ** 2).mean())(layer.weight)
    assert max_diff(grad, direct) < 1e-5 * max(1.0, float(mx.abs(direct).max()))
    assert not layer.derived.values


@pytest.mark.parametrize("kind", [Conv2d, Upsample2D])
def test_a_weight_assigned_anew_is_not_served_a_stale_form(transforms, kind):
    layer, x = conv(module=kind), mx.random.normal((1, 64, 64, CHANNELS))
    target = layer if kind is Conv2d else layer.conv
    layer(x)
    assert target.derived.values
    target.weight = 0.05 * mx.random.normal(target.weight.shape, key=mx.random.key(7))
    assert not target.derived.values  # dropped at once: no old form kept until the next call
    made = len(transforms)
    out = layer(x)
    assert len(transforms) == made + 1
    assert max_diff(out, fresh_like(layer)(x)) < 1e-5


def test_an_optimizer_step_invalidates(transforms):
    layer, x = conv(), mx.random.normal((1, 64, 64, CHANNELS))
    before = layer(x)
    optimizer = optim.SGD(learning_rate=0.5)

    def loss(model, inputs):
        return (model(inputs) ** 2).mean()

    _, grads = nn.value_and_grad(layer, loss)(layer, x)
    optimizer.update(layer, grads)  # `update` assigns new arrays, as in a training loop
    mx.eval(layer.parameters())
    after = layer(x)
    assert max_diff(after, before) > 1e-3  # the step changed the output
    assert max_diff(after, fresh_like(layer)(x)) < 1e-5
    assert max_diff(after, reference(layer, x)) < 1e-4

    # load_weights goes through the same assignment
    new = [("weight", 0.05 * mx.random.normal(layer.weight.shape, key=mx.random.key(11))), ("bias", layer.bias)]
    layer.load_weights(new)
    assert not layer.derived.values
    assert max_diff(layer(x), fresh_like(layer)(x)) < 1e-5


def test_same_identity_other_shape_or_dtype_is_not_reused(transforms):
    cache = DerivedWeights()
    weight = 0.05 * mx.random.normal((CHANNELS, 3, 3, CHANNELS))
    cache.get(weight, ("winograd", 2))
    cache.get(weight, ("winograd", 2))
    assert len(transforms) == 1
    cache.get(weight.astype(mx.float16), ("winograd", 2))  # another array: recomputed
    assert len(transforms) == 2
    cache._signature = ((1, 2, 3), mx.float32)  # as if the array had changed shape under the same identity
    cache.get(weight, ("winograd", 2))
    assert len(transforms) == 3


def test_in_place_changes_are_released_explicitly():
    layer, x = conv(), mx.random.normal((1, 64, 64, CHANNELS))
    layer(x)
    layer.weight += 0.01  # `+=` on the attribute assigns it again: seen
    assert not layer.derived.values
    layer(x)
    weight = layer.weight
    weight += 0.01  # in place on the array itself: the identity stays, nothing can tell
    assert layer.weight is weight and layer.derived.values
    assert release_derived_weights(layer) > 0
    assert not layer.derived.values
    assert max_diff(layer(x), fresh_like(layer)(x)) < 1e-5


def test_the_cache_is_bounded_and_does_not_keep_the_weight(monkeypatch):
    monkeypatch.setattr(blocks, "derived_weights", lambda weight, key: mx.zeros((4,)))
    cache = DerivedWeights()
    weight = mx.ones((CHANNELS, 3, 3, CHANNELS))
    for m in range(10):
        cache.get(weight, ("winograd", m))
    assert len(cache.values) == DerivedWeights.MAX_FORMS
    assert list(cache.values) == [("winograd", m) for m in range(6, 10)]
    import weakref

    alive = weakref.ref(weight)
    del weight
    assert alive() is None  # the cache holds no strong reference to the weight
    assert cache.get(mx.ones((CHANNELS, 3, 3, CHANNELS)), ("winograd", 9)) is not None
    assert len(cache.values) == 1  # a new weight starts a new cache


def test_unloading_a_component_releases_its_kernels(official_checkpoint):
    import lavit_mlx

    model = lavit_mlx.load(official_checkpoint, vision_heads=2)
    decoder = model.pixel_decoder(False)
    layers = [m for m in decoder.unet.modules() + decoder.vae.modules() if isinstance(m, Conv2d) and m.weight.shape[1] == 3]
    for layer in layers:
        layer.cached(("folded", 0))
    assert all(layer.derived.values for layer in layers)
    model.unload("lowres_pixel")
    assert "lowres_pixel" not in model.loaded
    assert not any(layer.derived.values for layer in layers)  # even though `decoder` is still held
