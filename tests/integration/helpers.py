"""Helpers for integration tests: publish events, drain the consumer, read tables."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

import fakeredis
import orjson
import sqlalchemy as sa
from redis import Redis
from redis.cluster import RedisCluster

from tests.conftest import Backend, make_settings
from usermgmt.persistence.db import make_engine
from usermgmt.persistence.keys import Keys
from usermgmt.workers.events.consumer import EventConsumer
from usermgmt.workers.runtime.bootstrap import Services


def publish(redis: Redis, keys: Keys, kind: str, **payload: Any) -> str:
    """XADD one event (an event id is made up unless given); returns the entry id.

    No waiting between publishes: like real producers, consecutive calls often land in
    the same millisecond, where the two streams' ids tell nothing about which came first.
    """
    payload.setdefault("event_id", str(uuid.uuid4()))
    raw = redis.xadd(keys.event_stream(kind), {"payload": orjson.dumps(payload)})
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def another_client(backend: Backend) -> Redis:
    """A Redis connection of its own, to the backend's server (or cluster, or fake one)."""
    if backend.cluster:
        return cast(Redis, RedisCluster.from_url(backend.redis_url))
    if backend.real_redis:
        return Redis.from_url(backend.redis_url)
    server = backend.redis.connection_pool.connection_kwargs["server"]
    return fakeredis.FakeRedis(server=server)


def drain(services: Services, consumer: str = "test-consumer") -> EventConsumer:
    """Run the event consumer in burst mode until both streams are drained."""
    worker = EventConsumer(services, consumer, threading.Event(), burst=True)
    worker.run()
    return worker


def rows(services: Services, sql: str, **params: Any) -> list[tuple[Any, ...]]:
    """Run a query and return plain tuples."""
    with services.engine.connect() as conn:
        return [tuple(row) for row in conn.execute(sa.text(sql), params)]


def dead_letters(redis: Redis, keys: Keys) -> list[dict[str, Any]]:
    """Decoded payloads of the dead-letter stream, oldest first."""
    return [orjson.loads(fields[b"payload"]) for _, fields in redis.xrange(keys.dlq)]


@contextmanager
def services_for(backend: Backend, **overrides: object) -> Iterator[Services]:
    """Services on the test's backend with some settings changed (`make_settings`)."""
    built = Services(
        settings=make_settings(backend, **overrides),
        redis=backend.redis,
        engine=make_engine(backend.database_url),
        keys=backend.keys,
    )
    try:
        yield built
    finally:
        built.engine.dispose()


def add_players(services: Services, *names: str, wallet: int = 0) -> None:
    """Register players straight in the database (no bcrypt; they never log in)."""
    from usermgmt.persistence import accounts

    for name in names:
        accounts.create_user(services.engine, name, "x" * 60, wallet=wallet)


def standings(services: Services) -> dict[str, tuple[int, int, int, int, int]]:
    """username -> (win_count, loss_count, earnings, wallet, leaderboard.rank)."""
    return {
        row[0]: tuple(row[1:])  # type: ignore[misc]
        for row in rows(
            services,
            "SELECT u.username, s.win_count, s.loss_count, s.earnings, u.wallet, l.rank "
            "FROM users u JOIN stats s ON s.user_id = u.id "
            "JOIN leaderboard l ON l.stats_id = s.id",
        )
    }


def pending_count(redis: Redis, keys: Keys) -> int:
    """Entries delivered but not acked, over both event streams."""
    total = 0
    for stream in (keys.update_stream, keys.terminate_stream):
        if redis.exists(stream):
            total += int(redis.xpending(stream, "usermgmt-events")["pending"])
    return total


def roster(services: Services, session_id: str) -> list[str]:
    """Usernames in the live roster of a session, sorted."""
    return [
        name
        for (name,) in rows(
            services,
            "SELECT u.username FROM session_players sp JOIN users u ON u.id = sp.user_id "
            "JOIN game_sessions g ON g.id = sp.session_pk WHERE g.session_id = :s "
            "ORDER BY u.username",
            s=session_id,
        )
    ]


def apply_available(worker: EventConsumer) -> None:
    """Apply what the streams hold, batch by batch, as the run loop does but without its
    rank steps or idle pass, keeping the consumer's connection and world."""
    if worker.needs_setup:
        worker.setup()
    for _ in range(1_000):
        entries = worker.next_entries()
        if entries:
            worker.handle(entries)
        elif not worker.buffer:
            break
        else:  # entries of the server's current millisecond wait for the next one
            time.sleep(0.001)
    worker.flush()
    worker.settle()
