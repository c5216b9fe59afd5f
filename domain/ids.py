"""Event ids that sort by time (UUID version 7, RFC 9562).

The worker records every applied `event_id` in an index (the idempotency record).
Random ids (version 4) land on a random page of it, so each one dirties a page of
its own at the commit; ids that start with their millisecond land next to the last
ones, and a batch's ids share a few pages. Any UUID is valid in an event: producers
that make their own ids lose nothing but this.
"""

from __future__ import annotations

import os
import time
import uuid

_MS_BITS = 48
_VERSION = 7 << 76
_VARIANT = 0b10 << 62
_VERSION_MASK = 0xF << 76
_VARIANT_MASK = 0b11 << 62


def new_event_id(now_ns: int | None = None) -> uuid.UUID:
    """A fresh UUID version 7: the Unix millisecond, then 74 random bits."""
    ms = (time.time_ns() if now_ns is None else now_ns) // 1_000_000
    value = (ms & ((1 << _MS_BITS) - 1)) << 80 | int.from_bytes(os.urandom(10), "big")
    value = (value & ~_VERSION_MASK & ~_VARIANT_MASK) | _VERSION | _VARIANT
    return uuid.UUID(int=value)
