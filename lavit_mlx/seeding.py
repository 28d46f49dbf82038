"""Seeds: one way to check them, draw them and turn them into MLX keys.

Every random choice of LaVIT (token selection, LLM sampling, initial latents, training
noise) starts from a user-visible integer seed in 0..2^32-1, so that a printed seed
reproduces a run; a seed outside that range is a one-line error, not a crash in MLX.
"""

from __future__ import annotations

import os
from typing import Optional

MAX_SEED = 2**32 - 1


def check_seed(seed, flag: str = "--seed") -> int:
    """`seed` as an int, or a LaVITError naming the flag when it is not in 0..2^32-1."""
    from .errors import LaVITError

    if isinstance(seed, bool) or not isinstance(seed, int) and not (hasattr(seed, "__index__")):
        raise LaVITError(f"{flag} {seed!r}: expected an integer in 0..{MAX_SEED}")
    seed = int(seed)
    if not 0 <= seed <= MAX_SEED:
        raise LaVITError(f"{flag} {seed}: expected an integer in 0..{MAX_SEED}")
    return seed


def new_seed() -> int:
    """A fresh random seed (printed or stored by the caller so that the run can be repeated)."""
    return int.from_bytes(os.urandom(4), "little")


def resolve_seed(seed: Optional[int], flag: str = "--seed") -> int:
    """The given seed (checked), or a new one."""
    return new_seed() if seed is None else check_seed(seed, flag)


def key(seed: int):
    """The MLX PRNG key of a (checked) seed."""
    import mlx.core as mx

    return mx.random.key(check_seed(seed))
