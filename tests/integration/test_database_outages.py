"""A database that refuses writes for a while: the worker pauses and loses nothing.

SPEC §3: "A database that is locked or away pauses the worker (with backoff) rather
than dead-lettering anything."
"""

from __future__ import annotations

import threading
import time
from typing import Any

from sqlalchemy import event

from tests.conftest import Backend
from tests.integration.helpers import (
    add_players,
    dead_letters,
    drain,
    pending_count,
    publish,
    services_for,
    standings,
)
from usermgmt.persistence.db import make_engine
from usermgmt.workers.events.consumer import EventConsumer
from usermgmt.workers.runtime.bootstrap import Services


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
        publish(
            redis,
            keys,
            "terminate",
            session_id="g1",
            results=[{"username": "alice", "outcome": "win", "earnings": 30}],
        )
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
