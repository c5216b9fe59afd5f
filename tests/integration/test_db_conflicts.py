"""Transactions that lose to another worker's: told apart from an outage, retried, counted."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry

from tests.conftest import Backend
from tests.integration.helpers import (
    add_players,
    dead_letters,
    pending_count,
    publish,
    services_for,
    standings,
)
from usermgmt.workers.cli.commands.ops import conflicts_text
from usermgmt.workers.events.consumer import EventConsumer
from usermgmt.workers.runtime.connections import conflict_of
from usermgmt.workers.runtime.metrics import PrometheusMetrics
from usermgmt.workers.runtime.redis_info import WorkerInfo


def _two_rows(url: str) -> sa.Engine:
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE contended (id int PRIMARY KEY, n int)"))
        conn.execute(sa.text("INSERT INTO contended VALUES (1, 0), (2, 0)"))
    return engine


def _error_of(work: Any) -> BaseException:
    try:
        work()
    except sa.exc.OperationalError as exc:
        return exc
    raise AssertionError("no error")


def test_a_postgres_deadlock_is_a_conflict(postgres_url: str) -> None:
    engine = _two_rows(postgres_url)
    first, second = engine.connect(), engine.connect()
    try:
        first.begin()
        second.begin()
        first.execute(sa.text("UPDATE contended SET n = 1 WHERE id = 1"))
        second.execute(sa.text("UPDATE contended SET n = 1 WHERE id = 2"))
        errors: list[BaseException] = []

        def cross() -> None:
            try:
                first.execute(sa.text("UPDATE contended SET n = 2 WHERE id = 2"))
            except sa.exc.OperationalError as exc:
                errors.append(exc)

        blocked = threading.Thread(target=cross)
        blocked.start()
        time.sleep(0.2)  # first now waits for second's row
        try:
            second.execute(sa.text("UPDATE contended SET n = 2 WHERE id = 1"))
        except sa.exc.OperationalError as exc:
            errors.append(exc)
            second.rollback()
        blocked.join(10)
        assert [conflict_of(error) for error in errors] == ["deadlock"]
    finally:
        first.close()
        second.close()
        engine.dispose()


def test_a_postgres_lock_timeout_and_a_serialization_failure_are_conflicts(
    postgres_url: str,
) -> None:
    engine = _two_rows(postgres_url)
    holder, waiter = engine.connect(), engine.connect()
    try:
        holder.begin()
        holder.execute(sa.text("UPDATE contended SET n = 1 WHERE id = 1"))
        waiter.begin()
        waiter.execute(sa.text("SET LOCAL lock_timeout = '50ms'"))
        timeout = _error_of(lambda: waiter.execute(sa.text("UPDATE contended SET n = 2")))
        waiter.rollback()
        holder.rollback()
        assert conflict_of(timeout) == "lock_timeout"

        waiter.execute(sa.text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ"))
        waiter.execute(sa.text("SELECT n FROM contended WHERE id = 1")).all()  # snapshot taken
        with engine.begin() as other:
            other.execute(sa.text("UPDATE contended SET n = 5 WHERE id = 1"))
        failure = _error_of(
            lambda: waiter.execute(sa.text("UPDATE contended SET n = 6 WHERE id = 1"))
        )
        waiter.rollback()
        assert conflict_of(failure) == "serialization"
    finally:
        holder.close()
        waiter.close()
        engine.dispose()


def test_an_outage_is_not_a_conflict() -> None:
    away = sa.exc.OperationalError("SELECT 1", {}, Exception("connection refused"))
    assert conflict_of(away) is None
    locked = sa.exc.OperationalError("UPDATE", {}, Exception("database is locked"))
    assert conflict_of(locked) == "locked"


class _Deadlock(Exception):
    sqlstate = "40P01"


def test_a_conflicted_batch_is_retried_once_and_counted(backend: Backend) -> None:
    """The first transaction of the batch fails as a deadlock would: the consumer counts
    it (stats, metrics, heartbeat text) and takes the same entries again, applying each
    exactly once."""
    keys = backend.keys
    with services_for(backend) as services:
        add_players(services, "alice", "bob")
        publish(backend.redis, keys, "update", session_id="s1", players=["alice", "bob"])
        results = [
            {"username": "alice", "outcome": "win", "earnings": 30},
            {"username": "bob", "outcome": "loss", "earnings": 0},
        ]
        publish(backend.redis, keys, "terminate", session_id="s1", results=results)
        metrics = PrometheusMetrics(CollectorRegistry())
        worker = EventConsumer(services, "c", threading.Event(), burst=True, metrics=metrics)
        apply, failed = worker.applier.apply, []

        def deadlocking_once(batch: Any) -> Any:
            if not failed:
                failed.append(batch)
                raise sa.exc.OperationalError("UPDATE stats", {}, _Deadlock("deadlock detected"))
            return apply(batch)

        worker.applier.apply = deadlocking_once  # type: ignore[method-assign]
        worker.run()

        assert failed, "the injected conflict never happened"
        assert worker.stats.conflicts == {"deadlock": 1}
        assert metrics.registry.get_sample_value(
            "usermgmt_db_conflicts_total", {"kind": "deadlock"}
        ) == pytest.approx(1)
        assert worker.stats.applied == 2
        assert standings(services)["alice"][:3] == (1, 0, 30)
        assert standings(services)["bob"][:3] == (0, 1, 0)
        assert dead_letters(backend.redis, keys) == []
        assert pending_count(backend.redis, keys) == 0
        info = WorkerInfo("c", None, None, "events", 0.0, conflicts=dict(worker.stats.conflicts))
        assert conflicts_text(info) == "; batches retried after conflicts: 1 deadlock"
