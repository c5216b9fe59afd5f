"""CPU time spent over a measured window, split by who spent it: the workers, the
PostgreSQL server (every process named `postgres`, with the backends that exited and
were reaped by the postmaster), `redis-server`, this bench process, and the rest of
the machine. Figures are CPU seconds and cores (CPU seconds per wall second).

The server processes are the machine's, not the run's alone: on a shared machine
another user's queries count too, which `machine` (all busy CPU) puts in context.
"""

from __future__ import annotations

import os
import time
from typing import Any

import psutil

GROUPS = ("workers", "postgres", "redis", "bench")


def _busy(times: Any) -> float:
    """Busy CPU seconds of the whole machine (guest time is already in user)."""
    return float(
        times.user
        + times.nice
        + times.system
        + getattr(times, "irq", 0.0)
        + getattr(times, "softirq", 0.0)
    )


class Meter:
    """`start()` at the window's start, `stop()` at its end: the split in between."""

    def __init__(self, worker_pids: list[int]) -> None:
        self.worker_pids = worker_pids
        self.started: dict[str, float] | None = None

    def snapshot(self) -> dict[str, float]:
        seconds = dict.fromkeys(GROUPS, 0.0)
        for pid in self.worker_pids:
            try:
                times = psutil.Process(pid).cpu_times()
            except psutil.Error:
                continue  # gone: the drain fails on its own
            seconds["workers"] += times.user + times.system
        for proc in psutil.process_iter(["name", "cpu_times"]):
            name, times = proc.info["name"], proc.info["cpu_times"]
            if times is None:
                continue
            if name == "postgres":
                # The postmaster's children times hold the backends it has reaped.
                seconds["postgres"] += (
                    times.user + times.system + times.children_user + times.children_system
                )
            elif name == "redis-server":
                seconds["redis"] += times.user + times.system
        own = psutil.Process().cpu_times()
        seconds["bench"] = own.user + own.system
        seconds["machine"] = _busy(psutil.cpu_times())
        seconds["at"] = time.perf_counter()
        return seconds

    def start(self) -> None:
        self.started = self.snapshot()

    def stop(self) -> dict[str, Any]:
        """CPU seconds and cores per group since `start()`; `other` is the rest of the
        machine's busy time."""
        if self.started is None:
            raise RuntimeError("Meter.stop() before start()")
        ended = self.snapshot()
        wall = max(ended["at"] - self.started["at"], 1e-6)
        spent = {name: max(0.0, ended[name] - self.started[name]) for name in GROUPS}
        machine = max(0.0, ended["machine"] - self.started["machine"])
        spent["other"] = max(0.0, machine - sum(spent.values()))
        return {
            "wall_s": wall,
            "cores_available": os.cpu_count() or 1,
            "machine_cores": machine / wall,
            "cpu_s": spent,
            "cores": {name: value / wall for name, value in spent.items()},
        }


def describe(split: dict[str, Any]) -> str:
    """`workers 0.95, PostgreSQL 0.60, Redis 0.10, bench 0.02, other 0.05 of 2 cores`."""
    cores = split["cores"]
    labels = {
        "workers": "workers",
        "postgres": "PostgreSQL",
        "redis": "Redis",
        "bench": "bench",
        "other": "other",
    }
    parts = ", ".join(f"{label} {cores[name]:.2f}" for name, label in labels.items())
    return f"{parts} of {split['cores_available']} cores"
