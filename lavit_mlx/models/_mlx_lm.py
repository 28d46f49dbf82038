"""mlx-lm's model modules without its package's import-time cost.

`mlx_lm/__init__.py` imports its converter, `generate` and `utils`, and through them
transformers (and torch, when it is installed): 1.5 to 4 s before the first caption, for
code inference never runs. Inference needs only `mlx_lm.models`. When mlx_lm has not been
imported yet, `prepare()` registers the package without running its `__init__`; the first
use of any other attribute of `mlx_lm` (e.g. `mlx_lm.load`) runs it then (a module
`__getattr__`, PEP 562), so every other user of mlx-lm in the process sees the package as
usual. Submodules (`mlx_lm.tuner.utils`, `mlx_lm.utils`) import normally either way.
"""

from __future__ import annotations

import importlib.util
import sys


def prepare() -> None:
    if "mlx_lm" in sys.modules:
        return
    spec = importlib.util.find_spec("mlx_lm")
    if spec is None or spec.loader is None or not spec.submodule_search_locations:
        return  # not installed: the import below gives the usual error
    module = importlib.util.module_from_spec(spec)
    state = {"ran": False}

    def __getattr__(name: str):
        if state["ran"]:
            raise AttributeError(f"module 'mlx_lm' has no attribute {name!r}")
        state["ran"] = True
        spec.loader.exec_module(module)  # the real __init__, once
        return getattr(module, name)

    module.__getattr__ = __getattr__
    sys.modules["mlx_lm"] = module
