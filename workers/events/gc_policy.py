"""Python's cyclic garbage collector, kept off the event consumer's hot path:
automatic collection off while it runs (`tune_gc`), collections between batches
instead (`BetweenBatches`).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable

MIDDLE_COLLECTION_EVERY = 50  # batches
FULL_COLLECTION_EVERY_S = 60.0


def tune_gc() -> None:
    """Keep Python's cyclic collector off the hot path (measured 25-35% faster).

    Everything alive after start-up (modules, SQLAlchemy metadata, pydantic schemas)
    is frozen out of the collector's scans, and automatic collection is off: a batch
    allocates hundreds of thousands of short-lived objects, nearly all freed by
    reference counting, and a collection triggered mid-batch would scan the batch's
    live objects again and again. `BetweenBatches` collects between batches instead,
    when those objects are gone.
    """
    gc.collect()
    gc.freeze()
    gc.disable()


class BetweenBatches:
    """Collect between batches, once the batch's objects are gone.

    The young generation after every batch, the middle one every
    `MIDDLE_COLLECTION_EVERY` batches, everything once a minute. A full collection
    scans every object the worker keeps (the world cache: 5 ms at 10k players, 17-28
    ms at 200k, measured), and found nothing to free in a drain of 40,000 entries:
    counted in batches, it ran every few hundred milliseconds at live rates, a
    stall of its own each time.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.batches = 0
        self.last_full = clock()

    def collect(self) -> int:
        """One batch done: collect the generation due; returns the generation."""
        self.batches += 1
        now = self.clock()
        if now - self.last_full >= FULL_COLLECTION_EVERY_S:
            self.last_full = now
            generation = 2
        elif self.batches % MIDDLE_COLLECTION_EVERY == 0:
            generation = 1
        else:
            generation = 0
        gc.collect(generation)
        return generation
