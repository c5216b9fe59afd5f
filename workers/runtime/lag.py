"""End-to-end lag of applied entries: from the entry id's millisecond to the moment the
worker knows its batch is committed and acked.

Entry ids take the Redis server's clock, so lag is measured on that clock: each read
notes the server's time (`TIME`, in the same round trip) against this process's, and
an ack confirmed later is dated by adding the offset. A producer's clock, or this
machine's, never enters the figure.

`LagWindow` keeps the last minute of lags in fixed buckets, cheaply enough to record
every entry, for the heartbeat (`usermgmt status`) and the bench; the Prometheus
histogram `usermgmt_event_lag_seconds` gets the same observations.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass

# Bucket upper bounds in ms: fine where the targets are (tens of ms), coarse beyond.
BOUNDS_MS = (
    1, 2, 3, 5, 7.5, 10, 15, 20, 25, 30, 40, 50, 60, 75, 100, 125, 150, 200, 250, 300,
    400, 500, 750, 1_000, 1_500, 2_000, 3_000, 5_000, 10_000, 30_000, 60_000,
)  # fmt: skip
BOUNDS_S = tuple(bound / 1000 for bound in BOUNDS_MS)
SLOT_S = 10.0
SLOTS = 6  # the window: the last minute


@dataclass(frozen=True)
class LagSummary:
    """The lag of the entries acked in the window, in ms (bucket-interpolated quantiles)."""

    count: int
    p50_ms: float
    p99_ms: float
    max_ms: float

    def as_dict(self) -> dict[str, float]:
        return {
            "count": self.count,
            "p50_ms": round(self.p50_ms, 1),
            "p99_ms": round(self.p99_ms, 1),
            "max_ms": round(self.max_ms, 1),
        }


class LagWindow:
    """Bucket counts of the last `SLOTS` * `SLOT_S` seconds, plus each slot's maximum."""

    def __init__(self) -> None:
        self.counts = [[0] * (len(BOUNDS_MS) + 1) for _ in range(SLOTS)]
        self.maxima = [0.0] * SLOTS
        self.stamps = [-1] * SLOTS  # which slot number each ring position holds

    def record(self, lags_ms: Sequence[float], now: float | None = None) -> None:
        """Count lags observed at `now` (monotonic seconds)."""
        if not lags_ms:
            return
        position = self._position(time.monotonic() if now is None else now)
        counts = self.counts[position]
        for lag in lags_ms:
            counts[bisect_left(BOUNDS_MS, lag)] += 1
        self.maxima[position] = max(self.maxima[position], *lags_ms)

    def summary(self, now: float | None = None) -> LagSummary:
        """Count, p50, p99 and max of the window ending at `now`."""
        current = int((time.monotonic() if now is None else now) // SLOT_S)
        live = [i for i in range(SLOTS) if current - SLOTS < self.stamps[i] <= current]
        totals = [sum(self.counts[i][b] for i in live) for b in range(len(BOUNDS_MS) + 1)]
        count = sum(totals)
        top = max((self.maxima[i] for i in live), default=0.0)
        return LagSummary(count, _quantile(totals, 0.5, top), _quantile(totals, 0.99, top), top)

    def _position(self, now: float) -> int:
        slot = int(now // SLOT_S)
        position = slot % SLOTS
        if self.stamps[position] != slot:
            self.stamps[position] = slot
            self.counts[position] = [0] * (len(BOUNDS_MS) + 1)
            self.maxima[position] = 0.0
        return position


def _quantile(totals: list[int], q: float, top: float) -> float:
    """The q-quantile, interpolated linearly inside its bucket (as Prometheus does);
    never above the largest lag seen."""
    count = sum(totals)
    if count == 0:
        return 0.0
    rank = q * count
    seen = 0
    for index, in_bucket in enumerate(totals):
        if in_bucket and seen + in_bucket >= rank:
            low = BOUNDS_MS[index - 1] if index > 0 else 0.0
            high = BOUNDS_MS[index] if index < len(BOUNDS_MS) else top
            return min(top, low + (high - low) * (rank - seen) / in_bucket)
        seen += in_bucket
    return top
