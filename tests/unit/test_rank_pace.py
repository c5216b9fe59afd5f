"""A rank refresh behind its pace writes a few slices between two batches (`step`) and
makes the event consumer read fewer entries at a time (`read_size`), so under a backlog
it still ends in time."""

from __future__ import annotations

import time
from array import array
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import pytest
import structlog

from usermgmt.persistence.ranking import RankSnapshot
from usermgmt.workers.events import ranks as ranks_module
from usermgmt.workers.events.ranks import MIN_READ, PACE_SHARE, RankRefresher
from usermgmt.workers.runtime.metrics import Metrics

INTERVAL_S = 30.0
CONFIGURED = 5_000


def refresher() -> RankRefresher:
    store: Any = SimpleNamespace(engine=None)
    return RankRefresher(store, INTERVAL_S, structlog.get_logger(), Metrics())


def being_written(ranks: RankRefresher, rows: int, written: int, elapsed_s: float) -> None:
    """A snapshot of `rows` taken `elapsed_s` ago, `written` of them written so far."""
    ranks.snapshot = RankSnapshot(ids=array("q", range(rows)))
    ranks.written = written
    ranks.started = time.perf_counter() - elapsed_s


def sizes(ranks: RankRefresher, reads: int) -> list[int]:
    return [ranks.read_size(CONFIGURED) for _ in range(reads)]


def test_without_a_refresh_every_read_takes_the_configured_size() -> None:
    ranks = refresher()
    assert sizes(ranks, 3) == [CONFIGURED] * 3
    assert ranks.read_size(50) == 50


def test_a_refresh_on_its_pace_leaves_the_reads_alone() -> None:
    ranks = refresher()
    window = INTERVAL_S * PACE_SHARE
    being_written(ranks, rows=1_000, written=600, elapsed_s=window / 2)  # due: 500
    assert not ranks.behind()
    assert sizes(ranks, 2) == [CONFIGURED] * 2


def test_reads_halve_while_a_refresh_is_behind_and_grow_back_once_it_has_caught_up() -> None:
    ranks = refresher()
    being_written(ranks, rows=1_000, written=100, elapsed_s=INTERVAL_S * PACE_SHARE / 2)
    assert ranks.behind()
    assert sizes(ranks, 7) == [2_500, 1_250, 625, 312, 156, MIN_READ, MIN_READ]

    ranks.written = 900  # caught up
    assert sizes(ranks, 7) == [200, 400, 800, 1_600, 3_200, CONFIGURED, CONFIGURED]


def test_past_its_window_a_refresh_is_behind_until_every_row_is_written() -> None:
    ranks = refresher()
    being_written(ranks, rows=1_000, written=999, elapsed_s=INTERVAL_S)
    assert ranks.behind()
    ranks.written = 1_000
    assert not ranks.behind()


def test_reads_never_go_below_a_configured_size_smaller_than_the_least() -> None:
    ranks = refresher()
    being_written(ranks, rows=1_000, written=0, elapsed_s=INTERVAL_S)
    assert [ranks.read_size(40) for _ in range(3)] == [40, 40, 40]


# -- the slices written between two batches ---------------------------------------------


class Clock:
    """`time` for the refresher: each slice written takes `slice_s`."""

    def __init__(self, slice_s: float) -> None:
        self.now, self.slice_s = 100.0, slice_s

    def perf_counter(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now


@contextmanager
def no_transaction() -> Iterator[None]:
    yield None


def writing(
    monkeypatch: pytest.MonkeyPatch, slice_s: float
) -> tuple[RankRefresher, list[int], Clock]:
    """A refresher whose slices (of 10 rows) take `slice_s` each; the slices' starts."""
    clock = Clock(slice_s)
    starts: list[int] = []

    def write_ranks(conn: object, snapshot: RankSnapshot, start: int, stop: int) -> None:
        starts.append(start)
        clock.now += slice_s

    monkeypatch.setattr(ranks_module, "time", clock)
    monkeypatch.setattr(ranks_module, "write_ranks", write_ranks)
    monkeypatch.setattr(ranks_module, "MIN_STEP_ROWS", 10)
    monkeypatch.setattr(ranks_module, "MAX_STEP_ROWS", 10)
    store: Any = SimpleNamespace(engine=None, transaction=no_transaction)
    ranks = RankRefresher(store, INTERVAL_S, structlog.get_logger(), Metrics())
    ranks.step_rows = 10
    return ranks, starts, clock


def test_on_its_pace_a_step_writes_one_slice(monkeypatch: pytest.MonkeyPatch) -> None:
    ranks, starts, clock = writing(monkeypatch, slice_s=0.012)
    being_written(ranks, rows=1_000, written=0, elapsed_s=0.0)
    ranks.started = clock.now
    assert ranks.step()
    assert starts == [0]


def test_behind_its_pace_a_step_writes_slices_back_to_back_within_the_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ranks, starts, clock = writing(monkeypatch, slice_s=0.012)
    being_written(ranks, rows=1_000, written=0, elapsed_s=0.0)
    ranks.started = clock.now - INTERVAL_S  # past its window
    assert ranks.step()
    # 12 ms each: a third fits in 40 ms (24 + 12), a fourth would not (36 + 12).
    assert starts == [0, 10, 20]
    assert ranks.step()
    assert starts == [0, 10, 20, 30, 40, 50]


def test_a_step_stops_once_the_refresh_has_caught_up(monkeypatch: pytest.MonkeyPatch) -> None:
    ranks, starts, clock = writing(monkeypatch, slice_s=0.001)
    window = INTERVAL_S * PACE_SHARE
    being_written(ranks, rows=100, written=0, elapsed_s=0.0)
    ranks.started = clock.now - window * 0.25  # 25 rows due
    assert ranks.step()
    assert starts == [0, 10, 20]  # 30 written: on its pace again


def test_a_slow_slice_is_the_only_one_of_its_step(monkeypatch: pytest.MonkeyPatch) -> None:
    ranks, starts, clock = writing(monkeypatch, slice_s=0.03)
    being_written(ranks, rows=1_000, written=0, elapsed_s=0.0)
    ranks.started = clock.now - INTERVAL_S
    assert ranks.step()
    assert starts == [0]  # another 30 ms would end past 40


def test_with_nothing_read_a_step_writes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    ranks, starts, _ = writing(monkeypatch, slice_s=0.012)
    assert not ranks.step()
    assert starts == []
