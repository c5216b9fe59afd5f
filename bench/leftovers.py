"""Keys a bench run leaves in Redis when it is killed, and how the next run finds them.

Every run writes under prefixes `bench<8 hex>-<n><scenario>` and deletes them as it
goes. A run killed in the middle leaves its keys behind: hundreds of thousands of
user hashes and stream entries that keep Redis busy expiring and rehashing, which
skewed every later figure (0.3-0.6 cores of Redis seen after one killed run).

So a run announces itself with a heartbeat key, refreshed while it lives, and sweeps
at start every bench prefix whose run's heartbeat is gone. A run going on beside it
(another terminal, the same Redis) keeps its keys. The same goes for the PostgreSQL
schemas a run creates (`<run>_<scenario>_<hex>`, a million players' rows in the full
run): those of a run without a heartbeat are dropped.
"""

from __future__ import annotations

import re
import threading

from redis import Redis
from redis.exceptions import RedisError

from bench import postgres
from bench.workload import BenchFailure, unlink_matching

HEARTBEAT_KEY = "usermgmt-bench:alive:{run}"
HEARTBEAT_TTL_S = 60
REFRESH_S = 15
_RUN = re.compile(rb"^(bench[0-9a-f]{8})-")
_SCHEMA_RUN = re.compile(r"^(bench[0-9a-f]{8})_")


class Heartbeat:
    """Keeps `usermgmt-bench:alive:<run>` in Redis while the run lives."""

    def __init__(self, redis: Redis, run: str) -> None:
        self.redis = redis
        self.key = HEARTBEAT_KEY.format(run=run)
        self.halt = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="bench-heartbeat", daemon=True)

    def start(self) -> None:
        self.redis.set(self.key, 1, ex=HEARTBEAT_TTL_S)
        self.thread.start()

    def stop(self) -> None:
        self.halt.set()
        self.thread.join()
        self.redis.delete(self.key)

    def _beat(self) -> None:
        while not self.halt.wait(REFRESH_S):
            try:
                self.redis.set(self.key, 1, ex=HEARTBEAT_TTL_S)
            except RedisError:  # a missed beat is retried: Redis may be restarting
                continue


def delete_run(redis: Redis, run: str) -> int:
    """Delete every key of one run's prefixes (`<run>-*`); returns how many."""
    return unlink_matching(redis, f"{run}-*")


def stale_runs(redis: Redis, own: str) -> list[str]:
    """Runs with keys in Redis and no heartbeat, other than `own`."""
    runs: set[str] = set()
    for key in redis.scan_iter(match="bench*-*", count=5_000):
        found = _RUN.match(key)
        if found:
            runs.add(found.group(1).decode())
    runs.discard(own)
    return sorted(run for run in runs if not _alive(redis, run))


def _alive(redis: Redis, run: str) -> bool:
    return bool(redis.exists(HEARTBEAT_KEY.format(run=run)))


def sweep(redis: Redis, own: str) -> dict[str, int]:
    """Delete the keys of every stale run; returns the keys deleted per run."""
    return {run: delete_run(redis, run) for run in stale_runs(redis, own)}


def sweep_schemas(admin_url: str, redis: Redis, own: str) -> list[str]:
    """Drop the schemas of bench runs without a heartbeat, other than `own`'s; returns
    their names. A server that cannot be reached is left for the PostgreSQL scenarios
    to report."""
    try:
        names = postgres.schemas(admin_url)
    except BenchFailure:  # not reachable
        return []
    dropped = []
    for name in sorted(names):
        found = _SCHEMA_RUN.match(name)
        if found and found.group(1) != own and not _alive(redis, found.group(1)):
            postgres.drop_schema(admin_url, name)
            dropped.append(name)
    return dropped
