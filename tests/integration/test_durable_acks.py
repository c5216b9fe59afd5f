"""An entry is acked only once the commit that applied it is on disk.

On SQLite the event consumer's commits do not wait for the disk; the WAL is synced
on its helper thread while the consumer reads on, and the acks wait for that sync.
"""

from __future__ import annotations

import threading
import time

import fakeredis
import pytest
from sqlalchemy import Engine

from tests.integration.helpers import add_players, apply_available, pending_count, publish, rows
from usermgmt.persistence.db import make_engine, upgrade
from usermgmt.persistence.keys import Keys
from usermgmt.workers.events import store as store_module
from usermgmt.workers.events.consumer import EventConsumer
from usermgmt.workers.events.store import CommitNotDurable
from usermgmt.workers.runtime.bootstrap import Services
from usermgmt.workers.runtime.settings import load_settings


def _session_rows(services: Services) -> int:
    return len(rows(services, "SELECT id FROM game_sessions WHERE session_id = 's-1'"))


def test_the_ack_waits_for_the_commits_sync(
    services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    add_players(services, "ann", "bob")
    release = threading.Event()
    syncs: list[float] = []
    real_sync = store_module.sync_wal

    def slow_sync(engine: Engine) -> None:
        syncs.append(time.monotonic())
        release.wait(10)  # the disk is slow
        real_sync(engine)

    monkeypatch.setattr(store_module, "sync_wal", slow_sync)
    publish(services.redis, services.keys, "update", session_id="s-1", players=["ann", "bob"])
    worker = EventConsumer(services, "c", threading.Event(), burst=True)
    failure: list[BaseException] = []

    def consume() -> None:
        try:
            apply_available(worker)
            worker.settle()
        except BaseException as exc:  # reported by the test
            failure.append(exc)

    thread = threading.Thread(target=consume)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while _session_rows(services) == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _session_rows(services) == 1  # committed ...
        if services.engine.dialect.name == "sqlite":
            time.sleep(0.2)  # ... the consumer read on meanwhile, and holds the ack
            assert syncs and pending_count(services.redis, services.keys) == 1
    finally:
        release.set()
        thread.join(10)
    assert not thread.is_alive() and not failure
    assert pending_count(services.redis, services.keys) == 0  # synced, then acked
    # PostgreSQL's commit is durable when it returns: nothing to sync beside it.
    assert len(syncs) >= 1 if services.engine.dialect.name == "sqlite" else syncs == []


def test_a_commit_that_cannot_be_synced_is_never_acked(
    sqlite_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite only: PostgreSQL syncs inside its commit, where a failure fails the commit."""
    upgrade(sqlite_url)
    services = Services(
        settings=load_settings(database_url=sqlite_url, key_prefix=prefix),
        redis=fakeredis.FakeRedis(),
        engine=make_engine(sqlite_url),
        keys=Keys(prefix),
    )
    add_players(services, "ann", "bob")

    def failing_sync(_engine: Engine) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(store_module, "sync_wal", failing_sync)
    publish(services.redis, services.keys, "update", session_id="s-1", players=["ann", "bob"])
    worker = EventConsumer(services, "c", threading.Event(), burst=True)
    try:
        with pytest.raises(CommitNotDurable, match="could not be synced"):
            apply_available(worker)
        assert _session_rows(services) == 1
        assert pending_count(services.redis, services.keys) == 1  # delivered, never acked
    finally:
        worker.store.close()
        services.close()
