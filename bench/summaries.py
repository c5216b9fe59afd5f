"""Summaries of a bench run's samples: the figures of a latency distribution, and the
small JSON committed to bench/results/ (the raw samples stay in bench/runs/).

No heavy imports: the unit tests use it without the bench extra installed.
"""

from __future__ import annotations

import statistics
from typing import Any

from bench.workload import BenchFailure

SAMPLES_KEPT = 20  # longer lists are summarised (numbers) or thinned (time series)
# Login floods beside events: the key in r["auth"], the share of the main drain the
# events are published at (the latency target's loads), and its name in the table.
FLOOD_RUNS = (("flood", 2, "half load"), ("flood_quarter", 4, "a quarter of the load"))


def summary(values: list[float]) -> dict[str, float]:
    if not values:
        raise BenchFailure("no latency samples")
    ordered = sorted(values)
    return {
        "samples": len(ordered),
        "p50_ms": ordered[len(ordered) // 2],
        "p99_ms": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
        "max_ms": ordered[-1],
        "mean_ms": statistics.fmean(ordered),
    }


def summarised(value: Any) -> Any:
    """`value` with every long list of numbers (latency samples) replaced by a summary and
    every long time series thinned, so the committed JSON stays small enough to read in
    a diff (the raw JSON is in bench/runs/)."""
    if isinstance(value, dict):
        return {key: summarised(item) for key, item in value.items()}
    if isinstance(value, tuple):  # a drain's RSS samples are tuples until written
        value = list(value)
    if isinstance(value, list):
        numbers = len(value) > SAMPLES_KEPT and all(
            isinstance(item, int | float) and not isinstance(item, bool) for item in value
        )
        if numbers:
            return summary(value)
        if len(value) > SAMPLES_KEPT and all(isinstance(item, list | tuple) for item in value):
            # A time series (RSS samples): evenly spaced rows, the first and last included.
            step = (len(value) - 1) / (SAMPLES_KEPT - 1)
            return [list(value[round(i * step)]) for i in range(SAMPLES_KEPT)]
        return [summarised(item) for item in value]
    return value


Row = tuple[str, str, str, str]  # scenario, measured, target, verdict


def verdict(ok: bool) -> str:
    return "met" if ok else "**MISSED**"


def sweep_rows(r: dict[str, Any]) -> list[Row]:
    """Issue 12: an entry of a small batch costs at most 1.5x one of a large batch."""
    if "sweep" not in r:
        return []
    by_size = sorted(r["sweep"], key=lambda s: s["batch_size"])
    small, large = by_size[0], by_size[-1]
    ratio = large["entries_per_s"] / small["entries_per_s"]
    return [
        (
            "3c. small batches",
            f"{ratio:.2f}x the per-entry cost: {small['entries_per_s']:,.0f} entries/s at "
            f"`USERMGMT_BATCH_SIZE={small['batch_size']}` against "
            f"{large['entries_per_s']:,.0f}/s at {large['batch_size']}",
            "<= 1.5x",
            verdict(ratio <= 1.5),
        )
    ]


def memory_rows(r: dict[str, Any]) -> list[Row]:
    if "memory" not in r:
        return []
    mem = r["memory"]
    # A sample of 0 is a worker that had exited (runs before that was left out).
    settled = [rss for _, done, rss in mem["rss_samples"] if done >= 0.2 * mem["entries"] and rss]
    growth = (settled[-1] - settled[0]) if len(settled) > 1 else 0.0
    return [
        (
            "7. worker peak RSS",
            f"{mem['peak_rss_mb']:.0f} MB draining {mem['entries']:,} entries; "
            f"{growth:+.1f} MB after the first 20%",
            "<= 250 MB, flat",
            verdict(mem["peak_rss_mb"] <= 250 and growth <= 25),
        )
    ]


def login_target(bcrypt_rounds: int) -> float:
    """Logins / raw bcrypt: 0.9 at the production cost of 12 (issue 12), 0.85 at a lower
    cost (quick mode's 8, issue 4), where the fixed work of a login weighs more."""
    return 0.9 if bcrypt_rounds >= 12 else 0.85


def auth_rows(r: dict[str, Any], logins: int) -> list[Row]:
    """Scenario 6: logins against raw bcrypt, and a flood of `logins` beside events: the
    events' p99 within 2x of it without logins, the logins still near raw bcrypt."""
    if "auth" not in r:
        return []
    auth = r["auth"]
    target = login_target(auth["bcrypt_rounds"])
    raw = auth["raw_bcrypt_per_s"]
    login_ratio = auth["logins_per_s"] / raw
    rows: list[Row] = [
        (
            "6. logins vs raw bcrypt",
            f"{auth['logins_per_s']:.1f} logins/s vs {raw:.1f} checkpw/s "
            f"({auth['threads']} threads, cost {auth['bcrypt_rounds']}) = {login_ratio:.2f}",
            f">= {target}",
            verdict(login_ratio >= target),
        )
    ]
    for key, _, load in FLOOD_RUNS:
        if key not in auth:
            continue
        flood = auth[key]
        flood_ratio = flood["during_logins"]["p99_ms"] / max(flood["without_logins"]["p99_ms"], 1.0)
        logins_ratio = flood["login_during_events_per_s"] / raw
        rows.append(
            (
                f"6. event p99 during {logins} logins, {load}",
                f"{flood['rate']:,.0f} entries/s: {flood['during_logins']['p99_ms']:.1f} ms vs "
                f"{flood['without_logins']['p99_ms']:.1f} ms without = {flood_ratio:.2f}x; "
                f"logins meanwhile {flood['login_during_events_per_s']:.1f}/s = "
                f"{logins_ratio:.2f}x raw bcrypt"
                + (
                    f" ({flood['logins_dropped_as_stale']} dropped as stale after 30 s)"
                    if flood.get("logins_dropped_as_stale")
                    else ""
                ),
                f"<= 2x; logins >= {target}x",
                verdict(flood_ratio <= 2 and logins_ratio >= target),
            )
        )
    return rows
