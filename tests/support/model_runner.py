"""One test runner for every component (in the spirit of mlx-lm's `model_test_runner` and
diffusers' `ModelTesterMixin`): float32 and half precision, batch > 1 against one row at
a time, save and reload, a gradient check, and the cache path where there is one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map

from lavit_mlx import ops

from . import max_rel

# Half precision against float32 (max abs / max |ref|): about 10 and 5 units of rounding
# of float16 (2^-11) and bfloat16 (2^-8) after a few layers.
HALF_TOL = {"float16": 5e-3, "bfloat16": 3e-2}


@dataclass
class ModelCase:
    """How to build a component, feed it and read its output.

    `inputs(batch)` gives the positional inputs for a batch; `output(module, *inputs)`
    runs it and returns one array whose first axis is the batch.
    """

    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int], Sequence]
    output: Callable[..., mx.array]
    half_tol: dict = field(default_factory=lambda: dict(HALF_TOL))
    # differentiate w.r.t. these parameter names (a path prefix of the module's tree)
    grad_params: Sequence[str] = ()
    grad_tol: float = 5e-2
    cache_check: Optional[Callable[[nn.Module], None]] = None


def _randomize(module: nn.Module, seed: int = 0) -> None:
    """Small random weights, norms near one (a freshly built module is mostly zeros)."""
    flat = tree_flatten(module.parameters())
    keys = mx.random.split(mx.random.key(seed), len(flat))
    new = []
    for i, (name, value) in enumerate(flat):
        if not mx.issubdtype(value.dtype, mx.floating):
            new.append((name, value))
            continue
        noise = mx.random.normal(value.shape, key=keys[i]) * 0.05
        new.append((name, 1.0 + noise if ("norm" in name and name.endswith("weight")) else noise))
    module.load_weights(new)
    mx.eval(module.parameters())


def build(case: ModelCase) -> nn.Module:
    module = case.build()
    _randomize(module)
    return module.eval()


def check_float32_and_batch(case: ModelCase) -> None:
    module = build(case)
    batch = [mx.array(x) if isinstance(x, np.ndarray) else x for x in case.inputs(3)]
    out = case.output(module, *batch)
    assert out.dtype == mx.float32 and out.shape[0] == 3, (case.name, out.dtype, out.shape)
    assert bool(mx.all(mx.isfinite(out))), case.name
    for row in range(3):
        alone = case.output(module, *[x[row:row + 1] for x in batch])  # every input slices by batch
        assert max_rel(alone, out[row:row + 1]) <= 1e-5, (case.name, row)


def check_half_precision(case: ModelCase) -> None:
    module = build(case)
    inputs = case.inputs(2)
    reference = case.output(module, *inputs)
    for name, dtype in (("float16", mx.float16), ("bfloat16", mx.bfloat16)):
        half = build(case)
        half.set_dtype(dtype)
        with ops.native_ops():  # the GPU's code path, at the GPU's dtype
            out = case.output(half, *[x.astype(dtype) if mx.issubdtype(x.dtype, mx.floating) else x for x in inputs])
        assert max_rel(out.astype(mx.float32), reference) <= case.half_tol[name], (case.name, name)


def check_save_reload(case: ModelCase, folder: Path) -> None:
    module = build(case)
    inputs = case.inputs(2)
    path = folder / f"{case.name}.safetensors"
    module.save_weights(str(path))
    again = case.build()
    again.load_weights(str(path), strict=True)
    again.eval()
    assert np.array_equal(np.array(case.output(module, *inputs)), np.array(case.output(again, *inputs))), case.name


def check_gradient(case: ModelCase) -> None:
    """The directional derivative from `nn.value_and_grad` against central differences."""
    module = build(case)
    inputs = case.inputs(2)
    probe = mx.random.normal(case.output(module, *inputs).shape, key=mx.random.key(1))

    def loss(model):
        return mx.sum(case.output(model, *inputs) * probe)

    _, grads = nn.value_and_grad(module, loss)(module)
    flat_grads = dict(tree_flatten(grads))
    names = [n for n in flat_grads if any(n.startswith(p) for p in case.grad_params)] or list(flat_grads)[:4]
    params = dict(tree_flatten(module.parameters()))
    direction = {n: mx.random.normal(params[n].shape, key=mx.random.key(7 + i)) for i, n in enumerate(names)}
    analytic = sum(float(mx.sum(flat_grads[n] * direction[n])) for n in names)
    scale = max(float(mx.max(mx.abs(params[n]))) for n in names)
    eps = 1e-3 * max(scale, 1e-2)

    def shifted(sign: float) -> float:
        moved = build(case)
        moved.load_weights([(n, params[n] + sign * eps * direction[n]) for n in names], strict=False)
        return float(loss(moved))

    numeric = (shifted(1.0) - shifted(-1.0)) / (2 * eps)
    assert abs(analytic - numeric) <= case.grad_tol * max(abs(numeric), 1e-3), (case.name, analytic, numeric)


def run_all(case: ModelCase, folder: Path) -> None:
    check_float32_and_batch(case)
    check_half_precision(case)
    check_save_reload(case, folder)
    check_gradient(case)
    if case.cache_check is not None:
        case.cache_check(build(case))


__all__ = ["ModelCase", "run_all", "build", "tree_map"]
