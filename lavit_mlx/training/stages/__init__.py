"""One module per training stage; importing this package registers their config sections.

Each module defines a `Stage` subclass and calls `config.register_stage(name, ModelSection,
LossSection, train_defaults)` at import.
"""

from __future__ import annotations

from ...errors import LaVITError

_BUILDERS: dict = {}


def stage_builder(name: str):
    """Decorator: `name`'s Stage class (built as `cls(config, world)`)."""

    def register(cls):
        _BUILDERS[name] = cls
        return cls

    return register


def build_stage(config, world):
    if config.stage not in _BUILDERS:
        raise LaVITError(f"the {config.stage!r} stage is not available in this installation")
    return _BUILDERS[config.stage](config, world)

from . import encoder  # noqa: E402,F401  (registers the encoder stage)
from . import tokenizer  # noqa: E402,F401  (registers the tokenizer stage)
from . import llm  # noqa: E402,F401  (stage 2, the unified LLM)
from . import vae  # noqa: E402,F401  (registers `lavit train vae`)
from . import pixel  # noqa: E402,F401  (registers `lavit train pixel`)
