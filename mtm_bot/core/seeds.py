"""The seed a job generates with: random, or fixed by MTM_SEED for reproducible runs."""

from __future__ import annotations

import hashlib
import random


def choose_seed(fixed: int | None, derived_from: str | None = None) -> int:
    """A random seed, or `fixed`. A job built on a track (Reroll, Redo, …) names itself in `derived_from`
    (its job id): with a fixed seed it gets one drawn from both, so each take is new yet replays the same
    (the fixed seed itself would repeat the track it builds on)."""
    if fixed is None:
        return random.randrange(2**31)
    if derived_from is None:
        return fixed
    digest = hashlib.blake2b(f"{fixed}:{derived_from}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big") & 0x7FFFFFFF
