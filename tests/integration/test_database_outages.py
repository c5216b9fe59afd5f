"""A database that refuses writes for a while: the worker pauses and loses nothing.

docs/protocol.md, "Deliveries, retries and outages": a database that is locked or away
pauses the batch in hand, with backoff; nothing is dead-lettered for it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import structlog
from sqlalchemy import event
from structlog.testing import capture_logs

from tests.conftest import REDIS_URL, Backend, _delete_prefix, _real_redis
from tests.integration.helpers import (
    add_players,
    dead_letters,
    drain,
    pending_count,
    publish,
    rows,
    services_for,
    standings,
)
from tests.integration.replay_helpers import wait_until
from usermgmt.persistence import db
from usermgmt.persistence.db import make_engine, upgrade
from usermgmt.workers.events.consumer import EventConsumer
from usermgmt.workers.runtime.bootstrap import Services


@contextmanager
def cleaned(backend: Backend) -> Iterator[None]:
    try:
        yield
    finally:
        _delete_prefix(backend.redis, backend.prefix)
        backend.redis.close()


def alice_wins_g1(redis: Any, keys: Any) -> None:
    publish(
        redis,
        keys,
        "terminate",
        session_id="g1",
        results=[{"username": "alice", "outcome": "win", "earnings": 30}],
    )


def move_database(source: Path, target: Path) -> None:
    """`usermgmt.db` and its WAL files, as an operator's `mv` would."""
    for name in ("usermgmt.db", "usermgmt.db-wal", "usermgmt.db-shm"):
        if (source / name).exists():
            (source / name).rename(target / name)


def read_only(url: str) -> Any:
    """An engine whose connections may read but not write: a PostgreSQL standby after a
    failover, or a provider's disk-full read-only mode (SQLite: `query_only`)."""
    engine = make_engine(url)

    @event.listens_for(engine, "connect")
    def _refuse_writes(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        if engine.dialect.name == "sqlite":
            cursor.execute("PRAGMA query_only = ON")
        else:
            cursor.execute("SET default_transaction_read_only = on")
            dbapi_connection.commit()
        cursor.close()

    return engine


def test_a_database_that_refuses_writes_pauses_the_worker_and_dead_letters_nothing(
    backend: Backend,
) -> None:
    keys, redis = backend.keys, backend.redis
    with services_for(backend) as services:
        add_players(services, "alice", "bob")
        publish(redis, keys, "update", session_id="g1", players=["alice", "bob"])
        alice_wins_g1(redis, keys)
        engine = read_only(backend.database_url)
        refused = Services(services.settings, redis, engine, keys)
        stop = threading.Event()
        thread = threading.Thread(target=EventConsumer(refused, "c1", stop).run, daemon=True)
        thread.start()
        time.sleep(2)  # several tries, each refused
        stop.set()
        thread.join(30)
        engine.dispose()
        assert not thread.is_alive()
        assert dead_letters(redis, keys) == []
        assert pending_count(redis, keys) == 2  # not applied, not acked: kept

        drain(services, consumer="c1")  # writes work again
        assert dead_letters(redis, keys) == []
        assert pending_count(redis, keys) == 0
        assert standings(services)["alice"][:3] == (1, 0, 30)


def test_a_table_locked_by_another_session_is_reported_and_waited_out(
    postgres_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL: an operator's `LOCK TABLE` (or a long migration) holds the worker's
    batch. It gives up waiting after `lock_timeout`, says so (a conflict with another
    transaction), retries, applies everything once the lock is gone, and stops at once
    on request meanwhile (a SIGTERM exits 0, not after the drain timeout)."""
    monkeypatch.setattr(db, "LOCK_TIMEOUT", "300ms")
    upgrade(postgres_url)
    backend = Backend("postgres-redis", postgres_url, _real_redis(), REDIS_URL, prefix)
    keys, redis = backend.keys, backend.redis
    with services_for(backend) as services, cleaned(backend):
        add_players(services, "alice", "bob")
        holder = sa.create_engine(postgres_url).connect()
        holder.begin()
        holder.execute(sa.text("LOCK TABLE users IN ACCESS EXCLUSIVE MODE"))
        publish(redis, keys, "update", session_id="g1", players=["alice", "bob"])
        stop = threading.Event()
        consumer = EventConsumer(services, "c1", stop)
        with capture_logs() as logs:
            consumer.log = structlog.get_logger()
            consumer.applier.log = consumer.log
            thread = threading.Thread(target=consumer.run, daemon=True)
            thread.start()
            try:
                wait_until(
                    lambda: any(line.get("kind") == "lock_timeout" for line in logs), timeout=15
                )
            finally:
                holder.rollback()  # the lock goes
                holder.close()
            wait_until(lambda: consumer.stats.applied == 1, timeout=15)
            stop.set()
            thread.join(15)
        assert not thread.is_alive()
        assert dead_letters(redis, keys) == []
        assert rows(services, "SELECT session_id, status FROM game_sessions") == [
            ("g1", "in_progress")
        ]


def test_a_sqlite_file_moved_away_under_the_worker_is_an_outage(
    tmp_path: Path, prefix: str
) -> None:
    """The worker's connection keeps the file it opened, even once it is moved away or
    deleted: commits would go nowhere. Each transaction checks the path still names that
    file, so the entries wait (not acked) until the database is back, then apply."""
    path = tmp_path / "usermgmt.db"
    url = f"sqlite:///{path}"
    upgrade(url)
    backend = Backend("sqlite-redis", url, _real_redis(), REDIS_URL, prefix)
    keys, redis = backend.keys, backend.redis
    with services_for(backend) as services, cleaned(backend):
        services = Services(services.settings, redis, make_engine(url, existing_only=True), keys)
        add_players(services, "alice", "bob")
        stop = threading.Event()
        consumer = EventConsumer(services, "c1", stop)
        thread = threading.Thread(target=consumer.run, daemon=True)
        thread.start()
        publish(redis, keys, "update", session_id="g1", players=["alice", "bob"])
        wait_until(lambda: consumer.stats.applied == 1, timeout=15)
        aside = tmp_path / "aside"
        aside.mkdir()
        move_database(tmp_path, aside)
        alice_wins_g1(redis, keys)
        time.sleep(2)
        assert consumer.stats.applied == 1  # nothing committed into the moved file
        assert pending_count(redis, keys) == 1 and dead_letters(redis, keys) == []
        move_database(aside, tmp_path)
        wait_until(lambda: consumer.stats.applied == 2, timeout=30)
        stop.set()
        thread.join(15)
        assert not thread.is_alive()
        assert pending_count(redis, keys) == 0
        assert standings(services)["alice"][:3] == (1, 0, 30)
        services.engine.dispose()
