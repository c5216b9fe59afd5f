"""The worker measures its own end-to-end lag: entry id to committed and acked."""

from __future__ import annotations

import threading

import orjson

from tests.conftest import Backend
from tests.integration.helpers import add_players, publish
from usermgmt.workers.cli.commands.ops import lag_text
from usermgmt.workers.events.consumer import EventConsumer
from usermgmt.workers.runtime import redis_info
from usermgmt.workers.runtime.bootstrap import Services
from usermgmt.workers.runtime.metrics import PrometheusMetrics


def server_ms(backend: Backend) -> int:
    seconds, micros = backend.redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


def xadd_at(backend: Backend, kind: str, ms: int, body: dict[str, object]) -> None:
    backend.redis.xadd(
        backend.keys.event_stream(kind), {"payload": orjson.dumps(body)}, id=f"{ms}-0"
    )


def test_every_applied_entry_is_observed_by_stream(services: Services, backend: Backend) -> None:
    keys = backend.keys
    add_players(services, "alice", "bob")
    for game in range(5):
        publish(backend.redis, keys, "update", session_id=f"g{game}", players=["alice", "bob"])
        results = [
            {"username": "alice", "outcome": "win", "earnings": 10},
            {"username": "bob", "outcome": "loss", "earnings": 0},
        ]
        publish(backend.redis, keys, "terminate", session_id=f"g{game}", results=results)
    publish(backend.redis, keys, "terminate", session_id="nobody", results=[])  # dead
    metrics = PrometheusMetrics()
    worker = EventConsumer(services, "c1", threading.Event(), burst=True, metrics=metrics)
    worker.run()
    sample = metrics.registry.get_sample_value
    assert sample("usermgmt_event_lag_seconds_count", {"stream": "update"}) == 5
    assert sample("usermgmt_event_lag_seconds_count", {"stream": "terminate"}) == 5
    total = sample("usermgmt_event_lag_seconds_sum", {"stream": "update"})
    assert total is not None and 0 <= total < 5 * 30
    summary = worker.lag.summary()
    assert summary.count == 10
    assert 0 <= summary.p50_ms <= summary.p99_ms <= summary.max_ms < 30_000


def test_lag_is_measured_from_the_entry_id_on_the_servers_clock(
    services: Services, backend: Backend
) -> None:
    """Entries published with ids 5 s in the past have waited 5 s before the worker ran."""
    add_players(services, "alice")
    past = server_ms(backend) - 5_000
    xadd_at(backend, "update", past, {"event_id": "00000000-0000-4000-8000-000000000001",
                                      "session_id": "old", "players": ["alice"]})  # fmt: skip
    worker = EventConsumer(services, "c1", threading.Event(), burst=True)
    worker.run()
    summary = worker.lag.summary()
    assert summary.count == 1
    assert 5_000 <= summary.max_ms < 60_000


def test_status_shows_each_workers_lag_from_its_heartbeat(backend: Backend) -> None:
    keys = backend.keys
    lag = {"count": 1200, "p50_ms": 4.2, "p99_ms": 31.5, "max_ms": 48.0}
    beat = {"consumer": "w1", "host": "h", "pid": 1, "only": "events", "at": 0, "event_lag": lag}
    backend.redis.set(keys.heartbeat("w1"), orjson.dumps(beat), ex=15)
    (worker,) = redis_info.alive_workers(backend.redis, keys)
    assert worker.event_lag == lag
    assert lag_text(worker) == (
        "; event lag over the last minute: p50 4.2 ms, p99 31.5 ms, max 48 ms (1,200 entries)"
    )
