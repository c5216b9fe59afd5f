"""bench/results stays small enough to read in a diff; raw runs go to bench/runs/."""

from __future__ import annotations

import subprocess
from pathlib import Path

from bench.summaries import SAMPLES_KEPT, memory_rows, summarised

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"


def test_only_the_latest_report_table_and_plot_of_each_mode_are_kept() -> None:
    kept = {path.name for path in RESULTS.iterdir()}
    assert kept <= {
        *(f"latest-{mode}.{ext}" for mode in ("quick", "full") for ext in ("md", "json")),
        "bench-quick.png",
        "bench-full.png",
        "soak-latest.md",
    }
    assert all(path.stat().st_size < 100_000 for path in RESULTS.iterdir())


def test_raw_runs_are_ignored_by_git() -> None:
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", "bench/runs/quick-20990101-000000.json"],
        cwd=ROOT,
        check=False,
    )
    assert ignored.returncode == 0


def test_latency_samples_are_summarised_and_time_series_thinned() -> None:
    samples = [float(n) for n in range(1, 1001)]
    series = [[n / 10, n * 100, 140.0 + n] for n in range(200)]
    result = {"latency": {"latencies_ms": samples, "p99_ms": 990.0}, "rss_samples": series}
    small = summarised(result)
    assert small["latency"]["latencies_ms"] == {
        "samples": 1000,
        "p50_ms": 501.0,
        "p99_ms": 991.0,
        "max_ms": 1000.0,
        "mean_ms": 500.5,
    }
    assert small["latency"]["p99_ms"] == 990.0
    thinned = small["rss_samples"]
    assert len(thinned) == SAMPLES_KEPT
    assert thinned[0] == series[0] and thinned[-1] == series[-1]
    assert summarised([1, 2, 3]) == [1, 2, 3]  # short lists stay as they are
    # A drain's samples are tuples in the run's results (a full run's made 1,274).
    rows = summarised({"rss_samples": [(n / 10, n * 100, 140.0 + n) for n in range(1274)]})
    assert len(rows["rss_samples"]) == SAMPLES_KEPT
    assert rows["rss_samples"][-1] == [127.3, 127_300, 1413.0]


def test_the_bench_reads_latency_off_the_workers_histogram() -> None:
    """Two scrapes of `usermgmt_event_lag_seconds`: the window's buckets and quantiles."""
    from prometheus_client import CollectorRegistry, generate_latest

    from bench import lag_scrape
    from usermgmt.workers.runtime.metrics import PrometheusMetrics

    metrics = PrometheusMetrics(CollectorRegistry())

    def scraped() -> lag_scrape.Histogram:
        text = generate_latest(metrics.registry).decode()
        return lag_scrape.parse(text)

    metrics.observe_event_lag("um:{events}:update", [0.5])  # before the window
    before = scraped()
    metrics.observe_event_lag("um:{events}:update", [0.004] * 60)
    metrics.observe_event_lag("um:{events}:terminate", [0.004] * 38 + [0.045] * 2)
    buckets = lag_scrape.window(before, scraped())
    figures = lag_scrape.summary(buckets)
    assert figures["samples"] == 100
    assert 3 < figures["p50_ms"] <= 5
    assert 40 < figures["p99_ms"] <= 50
    assert figures["max_ms"] == 50


def test_the_table_states_the_small_batch_target() -> None:
    """Issue 12: an entry of a small batch costs at most 1.5x one of a large batch."""
    from bench.summaries import sweep_rows

    def render(r: dict[str, object]) -> str:  # as bench.run renders a row (no psutil here)
        return "".join(f"| {a} | {b} | {c} | {d} |\n" for a, b, c, d in sweep_rows(r))

    def sweep(small: float) -> dict[str, object]:
        return {
            "sweep": [
                {"batch_size": 2000, "entries_per_s": 15_000.0},
                {"batch_size": 100, "entries_per_s": small},
                {"batch_size": 500, "entries_per_s": 14_000.0},
            ]
        }

    missed = render(sweep(9_000.0))
    assert "| 3c. small batches | 1.67x the per-entry cost: 9,000 entries/s at " in missed
    assert "`USERMGMT_BATCH_SIZE=100` against 15,000/s at 2000 | <= 1.5x | **MISSED** |" in missed
    assert "| 3c. small batches | 1.25x" in render(sweep(12_000.0))
    assert "| <= 1.5x | met |" in render(sweep(12_000.0))


def test_memory_growth_leaves_out_a_sample_taken_after_the_worker_exited() -> None:
    """An exited, unreaped worker reads as 0 bytes: that is not memory given back."""
    samples = [(0.1, 0, 60.0), (0.5, 30_000, 150.0), (0.9, 90_000, 158.0), (1.0, 100_000, 0.0)]
    memory = {"entries": 100_000, "peak_rss_mb": 158.0, "rss_samples": samples}
    (row,) = memory_rows({"memory": memory})
    assert "+8.0 MB after the first 20%" in row[1]
    assert row[3] == "met"


def test_the_table_states_the_login_flood_target_at_half_and_a_quarter_of_the_load() -> None:
    """Issue 12: during a login flood the events' p99 stays within 2x of it without one,
    with the logins near raw bcrypt; each load the bench floods at gets its own row."""
    from bench.summaries import auth_rows

    def flood(rate: float, calm_ms: float, flooded_ms: float, logins: float) -> dict[str, object]:
        return {
            "rate": rate,
            "without_logins": {"p99_ms": calm_ms},
            "during_logins": {"p99_ms": flooded_ms},
            "login_during_events_per_s": logins,
        }

    def rows(rounds: int, quarter_logins: float) -> dict[str, tuple[str, str, str]]:
        r = {
            "auth": {
                "logins_per_s": 88.0,
                "raw_bcrypt_per_s": 100.0,
                "threads": 2,
                "bcrypt_rounds": rounds,
                "flood": flood(14_000.0, 100.0, 450.0, 95.0),
                "flood_quarter": flood(7_000.0, 20.0, 30.0, quarter_logins),
            }
        }
        return {
            name: (measured, target, mark) for name, measured, target, mark in auth_rows(r, 500)
        }

    quick = rows(8, 95.0)
    assert quick["6. logins vs raw bcrypt"][1:] == (">= 0.85", "met")
    half = quick["6. event p99 during 500 logins, half load"]
    assert half == (
        "14,000 entries/s: 450.0 ms vs 100.0 ms without = 4.50x; "
        "logins meanwhile 95.0/s = 0.95x raw bcrypt",
        "<= 2x; logins >= 0.85x",
        "**MISSED**",
    )
    quarter = quick["6. event p99 during 500 logins, a quarter of the load"]
    assert quarter[0].startswith("7,000 entries/s: 30.0 ms vs 20.0 ms without = 1.50x;")
    assert quarter[2] == "met"
    # Events kept their p99, but the logins got a fifth of raw bcrypt: missed all the same.
    assert rows(8, 20.0)["6. event p99 during 500 logins, a quarter of the load"][2] == "**MISSED**"
    # At the production cost the issue asks 0.9 of raw bcrypt.
    full = rows(12, 95.0)
    assert full["6. logins vs raw bcrypt"][1:] == (">= 0.9", "**MISSED**")
    assert full["6. event p99 during 500 logins, a quarter of the load"][1:] == (
        "<= 2x; logins >= 0.9x",
        "met",
    )
