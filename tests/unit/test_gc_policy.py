"""The event consumer's collections between batches: which generation, when."""

from __future__ import annotations

import gc

import pytest

from usermgmt.workers.events import gc_policy
from usermgmt.workers.events.gc_policy import (
    FULL_COLLECTION_EVERY_S,
    MIDDLE_COLLECTION_EVERY,
    BetweenBatches,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_young_each_batch_middle_every_few_and_everything_once_a_minute(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    collected: list[int] = []
    monkeypatch.setattr(gc_policy.gc, "collect", lambda generation=2: collected.append(generation))
    clock = FakeClock()
    collector = BetweenBatches(clock)
    for _ in range(MIDDLE_COLLECTION_EVERY * 3):
        clock.now += 0.005
        collector.collect()
    assert collected.count(2) == 0, "150 batches in 0.75 s: no full collection"
    assert collected.count(1) == 3
    assert collected.count(0) == MIDDLE_COLLECTION_EVERY * 3 - 3
    clock.now += FULL_COLLECTION_EVERY_S
    assert collector.collect() == 2
    assert collector.collect() == 0, "the minute counts again from the full collection"
    clock.now += FULL_COLLECTION_EVERY_S - 0.001
    assert collector.collect() == 0
    clock.now += 0.001
    assert collector.collect() == 2


def test_a_cycle_made_in_a_batch_is_freed_by_the_young_collection() -> None:
    gc.disable()
    try:
        freed: list[str] = []

        class Node:
            def __init__(self) -> None:
                self.other: Node | None = None

            def __del__(self) -> None:
                freed.append("node")

        a, b = Node(), Node()
        a.other, b.other = b, a
        del a, b
        assert freed == []  # reference counting alone cannot free a cycle
        assert BetweenBatches().collect() == 0
        assert freed == ["node", "node"]
    finally:
        gc.enable()
