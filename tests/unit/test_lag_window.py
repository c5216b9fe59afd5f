"""The lag window: bucket counts of the last minute, quantiles interpolated in buckets."""

from __future__ import annotations

import pytest

from usermgmt.workers.runtime.lag import SLOT_S, SLOTS, LagWindow


def test_quantiles_of_one_slot() -> None:
    window = LagWindow()
    window.record([4.0] * 98 + [45.0, 900.0], now=100.0)
    summary = window.summary(now=100.0)
    assert summary.count == 100
    assert 3 < summary.p50_ms <= 5  # in the (3, 5] bucket
    assert 40 < summary.p99_ms <= 50  # the 99th of 100 is the 45 ms lag's bucket
    assert summary.max_ms == 900.0


def test_a_quantile_is_never_above_the_largest_lag() -> None:
    window = LagWindow()
    window.record([12.0], now=0.0)
    summary = window.summary(now=0.0)
    assert summary.p50_ms == summary.p99_ms == summary.max_ms == 12.0


def test_lags_older_than_the_window_drop_out() -> None:
    window = LagWindow()
    window.record([500.0] * 10, now=5.0)
    window.record([2.0] * 10, now=5.0 + SLOT_S)
    assert window.summary(now=5.0 + SLOT_S).count == 20
    later = 5.0 + SLOT_S * SLOTS
    summary = window.summary(now=later)
    assert summary.count == 10
    assert summary.max_ms == 2.0
    assert window.summary(now=later + SLOT_S * SLOTS).count == 0


def test_an_empty_window() -> None:
    assert LagWindow().summary(now=1.0).as_dict() == {
        "count": 0,
        "p50_ms": 0.0,
        "p99_ms": 0.0,
        "max_ms": 0.0,
    }


@pytest.mark.parametrize("lag", [0.0, 0.5, 60_000.0, 120_000.0])
def test_lags_at_the_edges_are_counted(lag: float) -> None:
    window = LagWindow()
    window.record([lag], now=0.0)
    assert window.summary(now=0.0).count == 1
    assert window.summary(now=0.0).max_ms == lag
