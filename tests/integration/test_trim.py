"""Stream retention: trimming removes old applied entries and never an unapplied one."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime

from sqlalchemy import text

from tests.conftest import Backend
from tests.integration.helpers import drain, publish, services_for
from tests.integration.replay_helpers import new_relay, register, wait_until
from usermgmt.persistence.games import save_checkpoints
from usermgmt.persistence.keys import EVENTS_GROUP
from usermgmt.workers.events.consumer import EventConsumer
from usermgmt.workers.ops.trim import Trimmer, trim_streams
from usermgmt.workers.runtime.bootstrap import Services
from usermgmt.workers.runtime.streams import ensure_group


def ids(services: Services, stream: str) -> list[str]:
    return [entry_id.decode() for entry_id, _ in services.redis.xrange(stream)]


def checkpoint(services: Services, stream: str, entry_id: str) -> None:
    with services.engine.begin() as conn:
        save_checkpoints(conn, {stream: entry_id}, datetime.now(UTC))


def updates(services: Services, count: int) -> list[str]:
    """Roster updates of one session (each one applies), published back to back.

    Then the clock moves on by a few milliseconds: with zero retention a trim keeps
    entries of the current millisecond (they are not older than now), and these tests
    are about what else holds the line.
    """
    entries = [
        publish(services.redis, services.keys, "update", session_id="s", players=["ann"])
        for _ in range(count)
    ]
    time.sleep(0.003)
    return entries


def by_stream(results: list) -> dict:  # type: ignore[type-arg]
    return {result.stream.rsplit(":", 1)[-1]: result for result in results}


def test_everything_applied_goes_with_zero_retention(services: Services) -> None:
    relay = new_relay(services)
    register(services, relay, "ann", "ben")
    updates(services, 3)
    publish(
        services.redis, services.keys, "terminate", session_id="s", results=[], reason="aborted"
    )
    drain(services)

    results = by_stream(trim_streams(services, retention_s=0))

    keys = services.keys
    assert results["update"].removed == 3 and results["terminate"].removed == 1
    assert results["accounts"].removed == 2
    for stream in (keys.update_stream, keys.terminate_stream, keys.accounts_stream):
        assert services.redis.xlen(stream) == 0


def test_retention_keeps_recent_entries(services: Services) -> None:
    register(services, new_relay(services), "ann")
    updates(services, 3)
    drain(services)
    results = by_stream(trim_streams(services, retention_s=3600))
    assert all(result.removed == 0 for result in results.values())
    assert results["update"].reason == "retention"
    assert services.redis.xlen(services.keys.update_stream) == 3


def test_pending_and_undelivered_entries_stay(services: Services, backend: Backend) -> None:
    keys, redis = services.keys, services.redis
    register(services, new_relay(services), "ann")
    entries = updates(services, 6)
    ensure_group(redis, keys.update_stream, EVENTS_GROUP)
    # Two delivered and acked, two delivered and still pending, two never delivered.
    redis.xreadgroup(EVENTS_GROUP, "c1", {keys.update_stream: ">"}, count=4)
    redis.xack(keys.update_stream, EVENTS_GROUP, entries[0], entries[1])
    checkpoint(services, keys.update_stream, entries[5])  # the database even claims more

    results = by_stream(trim_streams(services, retention_s=0))

    assert results["update"].removed == 2
    assert results["update"].reason == f"pending entries of group {EVENTS_GROUP}"
    assert ids(services, keys.update_stream) == entries[2:]

    # Once the pending ones are acked, the undelivered ones still hold the line.
    redis.xack(keys.update_stream, EVENTS_GROUP, entries[2], entries[3])
    results = by_stream(trim_streams(services, retention_s=0))
    assert results["update"].reason == f"undelivered entries of group {EVENTS_GROUP}"
    assert ids(services, keys.update_stream) == entries[4:]


def test_the_database_checkpoint_holds_the_line(services: Services) -> None:
    """Acked in Redis but not committed in this database (say, restored): kept."""
    keys, redis = services.keys, services.redis
    entries = updates(services, 5)
    ensure_group(redis, keys.update_stream, EVENTS_GROUP)
    redis.xreadgroup(EVENTS_GROUP, "c1", {keys.update_stream: ">"}, count=5)
    redis.xack(keys.update_stream, EVENTS_GROUP, *entries)
    checkpoint(services, keys.update_stream, entries[1])

    results = by_stream(trim_streams(services, retention_s=0))

    assert results["update"].reason == "database checkpoint"
    assert ids(services, keys.update_stream) == entries[2:]


def test_streams_without_a_group_or_a_checkpoint_are_left_alone(services: Services) -> None:
    keys, redis = services.keys, services.redis
    updates(services, 3)  # nobody consumes them yet
    redis.xadd(keys.accounts_stream, {"payload": b"{}"})  # no checkpoint recorded
    results = by_stream(trim_streams(services, retention_s=0))
    assert results["update"].minid is None and results["accounts"].minid is None
    assert redis.xlen(keys.update_stream) == 3 and redis.xlen(keys.accounts_stream) == 1
    checkpoint(services, keys.update_stream, "0-1")
    results = by_stream(trim_streams(services, retention_s=0))
    assert results["update"].reason == "no consumer group yet"
    assert redis.xlen(keys.update_stream) == 3


def test_a_dry_run_counts_without_removing(services: Services) -> None:
    register(services, new_relay(services), "ann")
    updates(services, 4)
    drain(services)
    results = by_stream(trim_streams(services, retention_s=0, dry_run=True))
    assert results["update"].removed == 4 and results["accounts"].removed == 1
    assert services.redis.xlen(services.keys.update_stream) == 4


def test_a_busy_worker_never_loses_an_entry_to_the_trimmer(backend: Backend) -> None:
    """Trim while an entry waits: it is applied in the end."""
    with services_for(backend) as services:
        keys, redis = services.keys, services.redis
        register(services, new_relay(services), "ann", "ben")
        # g2 waits for ann to leave g1: pending (waiting) until g1 ends.
        publish(redis, keys, "update", session_id="g1", players=["ann"])
        publish(redis, keys, "update", session_id="g2", players=["ann", "ben"])
        consumer_stop = threading.Event()
        consumer = EventConsumer(services, "busy", consumer_stop, burst=False)
        thread = threading.Thread(target=consumer.run)
        thread.start()
        try:
            wait_until(lambda: consumer.stats.waiting >= 1)
            trimmer = Trimmer(services, consumer_stop, interval_s=0.01, retention_s=0)
            results = by_stream(trimmer.trim_once())
            assert results["update"].removed == 1  # g1's update, applied
            assert redis.xlen(keys.update_stream) == 1  # g2's, pending, stays
            publish(redis, keys, "terminate", session_id="g1", results=[], reason="aborted")
            wait_until(lambda: consumer.stats.applied >= 3)
        finally:
            consumer_stop.set()
            thread.join(30)
        with services.engine.connect() as conn:
            sessions = dict(
                conn.execute(text("SELECT session_id, status FROM game_sessions")).all()
            )
        assert sessions == {"g1": "ended", "g2": "in_progress"}
        trim_streams(services, retention_s=0)
        assert redis.xlen(keys.update_stream) == 0
