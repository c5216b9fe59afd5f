"""Latency as the worker measures it: its `usermgmt_event_lag_seconds` histogram, read
off `/metrics` at the start and end of a measured window.

The bench used to time entries itself (a 1 ms poller beside its own publisher), which
shared the measured machine's two cores with the worker; the worker's histogram costs
the bench one HTTP GET per window. Quantiles are interpolated inside buckets, as
Prometheus' `histogram_quantile` does, so they are as fine as the buckets (1 ms steps
up to 10 ms, 5-10 ms steps up to 50 ms); the maximum is the upper bound of the
highest bucket that received an entry.
"""

from __future__ import annotations

import math
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

METRIC = "usermgmt_event_lag_seconds"
Histogram = dict[float, float]  # upper bound (s) -> cumulative count


def scrape(port: int, metric: str = METRIC) -> Histogram:
    """A histogram (the lag unless `metric` says) of the worker serving metrics on
    `port`, summed over its labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        return parse(reply.read().decode(), metric)


def parse(text: str, metric: str = METRIC) -> Histogram:
    """A histogram in a Prometheus text exposition, summed over its labels."""
    cumulative: Histogram = {}
    for family in text_string_to_metric_families(text):
        if family.name != metric:
            continue
        for sample in family.samples:
            if sample.name == f"{metric}_bucket":
                bound = float(sample.labels["le"])
                cumulative[bound] = cumulative.get(bound, 0.0) + sample.value
    return cumulative


def window(before: Histogram, after: Histogram) -> list[tuple[float, int]]:
    """The entries acked between two scrapes: (upper bound in ms, count) per bucket."""
    bounds = sorted(after)
    counts: list[tuple[float, int]] = []
    below = 0.0
    for bound in bounds:
        total = after[bound] - before.get(bound, 0.0)
        counts.append((bound * 1000, round(total - below)))
        below = total
    return counts


def summary(buckets: list[tuple[float, int]]) -> dict[str, float]:
    """samples, p50_ms, p99_ms and max_ms (the highest non-empty bucket's bound) of a window."""
    total = sum(count for _, count in buckets)
    if total == 0:
        return {"samples": 0, "p50_ms": math.nan, "p99_ms": math.nan, "max_ms": math.nan}
    top = max(bound for bound, count in buckets if count)
    return {
        "samples": total,
        "p50_ms": quantile(buckets, 0.5),
        "p99_ms": quantile(buckets, 0.99),
        "max_ms": top,
    }


def quantile(buckets: list[tuple[float, int]], q: float) -> float:
    """Linear interpolation inside the bucket holding the q-quantile."""
    total = sum(count for _, count in buckets)
    rank = q * total
    seen = 0
    low = 0.0
    for bound, count in buckets:
        if count and seen + count >= rank:
            if math.isinf(bound):
                return low  # beyond the last finite bound: report that bound
            return low + (bound - low) * (rank - seen) / count
        seen += count
        low = bound if not math.isinf(bound) else low
    return low
