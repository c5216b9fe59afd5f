"""Seeing and fixing: status, dead letters (list, retry, purge), idle consumers, metrics.

Every test runs on every backend; the worker side is the real EventConsumer in burst mode.
"""

from __future__ import annotations

import dataclasses
import io
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest
from rich.console import Console

from tests.conftest import Backend, make_settings
from tests.e2e.conftest import wait_for
from tests.integration.helpers import dead_letters, drain, publish, rows
from usermgmt.persistence import accounts
from usermgmt.persistence.db import make_engine
from usermgmt.persistence.keys import AUTH_GROUP, EVENTS_GROUP
from usermgmt.workers.cli.commands.ops import print_status
from usermgmt.workers.events import consumer as consumer_module
from usermgmt.workers.events.consumer import EventConsumer
from usermgmt.workers.ops import dlq, status
from usermgmt.workers.runtime import redis_info
from usermgmt.workers.runtime.bootstrap import Services
from usermgmt.workers.runtime.clock import redis_time_ms
from usermgmt.workers.runtime.metrics import PrometheusMetrics
from usermgmt.workers.runtime.runner import Worker
from usermgmt.workers.runtime.streams import Entry, dead_letter, ensure_group, remove_idle_consumers

RESULTS = [
    {"username": "alice", "outcome": "win", "earnings": 150},
    {"username": "bob", "outcome": "loss", "earnings": 0},
]


def register(services: Services, *names: str) -> None:
    for name in names:
        accounts.create_user(services.engine, name, "x" * 60, wallet=0)


def stats_of(services: Services) -> list[tuple[Any, ...]]:
    return rows(
        services,
        "SELECT u.username, s.win_count, s.loss_count, s.earnings, u.wallet "
        "FROM users u JOIN stats s ON s.user_id = u.id ORDER BY u.username",
    )


def add_letter(backend: Backend, stream: str, payload: str, reason: str = "unknown_user") -> str:
    """A dead letter as the worker writes it; returns its id in the DLQ."""
    entry = Entry(stream=stream, entry_id="1-0", payload=payload.encode())
    dead_letter(backend.redis, backend.keys.dlq, entry, reason, "made up by the test")
    return backend.redis.xrevrange(backend.keys.dlq, count=1)[0][0].decode()


# -- status ---------------------------------------------------------------------------------


def test_status_shows_streams_groups_consumers_dead_letters_and_checkpoint(
    services: Services, backend: Backend
) -> None:
    register(services, "alice", "bob")
    keys, redis = backend.keys, backend.redis
    publish(redis, keys, "update", session_id="s1", players=["alice", "bob"])
    last = publish(redis, keys, "terminate", session_id="s1", results=RESULTS)
    redis.xadd(keys.update_stream, {"payload": b"{not json"})
    drain(services, consumer="drainer")
    # One more entry read by a consumer that never acks it, one nobody has read yet.
    publish(redis, keys, "update", session_id="s2", players=["alice"])
    redis.xreadgroup(EVENTS_GROUP, "stuck", {keys.update_stream: ">"}, count=1)
    unread = publish(redis, keys, "update", session_id="s3", players=["bob"])

    report = status.collect(redis, services.engine, keys, services.settings.database_url)

    by_name = {stream.name: stream for stream in report.streams}
    assert set(by_name) == {"update", "terminate", "auth_requests"}  # no accounts stream yet
    update = by_name["update"]
    assert update.exists and update.length == 4
    assert update.last_id == unread
    (group,) = update.groups
    assert (group.name, group.pending, group.lag) == (EVENTS_GROUP, 1, 1)
    consumers = {c.name: c for c in group.consumers}
    assert consumers["stuck"].pending == 1
    assert consumers["drainer"].pending == 0
    assert consumers["drainer"].idle_ms >= 0
    terminate = by_name["terminate"]
    assert (terminate.length, terminate.first_id, terminate.last_id) == (1, last, last)
    assert terminate.checkpoint == last
    assert terminate.groups[0].lag == 0 and terminate.groups[0].pending == 0
    assert not by_name["auth_requests"].exists
    assert report.dlq_length == 1
    assert report.dlq_by_reason == {"invalid_json": 1}
    assert report.checkpoints[keys.terminate_stream]["last_entry_id"] == last
    assert report.database_error is None
    encoded = orjson.loads(orjson.dumps(report.to_json()))
    assert encoded["dlq_by_reason"] == {"invalid_json": 1}


def test_status_and_metrics_show_waiting_entries_and_the_oldest(
    services: Services, backend: Backend
) -> None:
    """Two terminates wait for sessions nobody started: status counts them and names the
    oldest and what it waits for; the metrics say the same; once it has waited 10 s
    (entry-id time) the worker logs it, once."""
    keys, redis = backend.keys, backend.redis
    register(services, "alice")
    old = redis.xadd(  # published 12 s ago as far as its id says
        keys.terminate_stream,
        {
            "payload": orjson.dumps(
                {
                    "event_id": str(uuid.uuid4()),
                    "session_id": "late",
                    "results": [],
                    "reason": "aborted",
                }
            )
        },
        id=f"{status_clock_ms(backend) - 12_000}-0",
    ).decode()
    publish(redis, keys, "terminate", session_id="later", results=[], reason="aborted")
    metrics = PrometheusMetrics()
    worker = EventConsumer(services, "c1", threading.Event(), burst=True, metrics=metrics)
    worker.log = Recorder()  # type: ignore[assignment]
    worker.run()
    logs = worker.log.lines  # type: ignore[attr-defined]
    assert metrics.registry.get_sample_value("usermgmt_events_waiting") == 2
    age = metrics.registry.get_sample_value("usermgmt_events_waiting_oldest_seconds")
    assert age is not None and 12 <= age < 60
    (logged,) = [line for line in logs if line["event"] == "entry waiting"]
    assert logged["entry_id"] == old and logged["waits_for"] == "the first update of session late"
    assert logged["waited_s"] >= 12

    report = status.collect(redis, services.engine, keys, services.settings.database_url)
    assert report.waiting is not None
    assert (report.waiting.entries, report.waiting.oldest_entry_id) == (2, old)
    assert report.waiting.oldest_stream == "terminate"
    assert report.waiting.oldest_waits_for == "the first update of session late"
    assert report.waiting.oldest_age_s is not None and report.waiting.oldest_age_s >= 12
    assert orjson.loads(orjson.dumps(report.to_json()))["waiting"]["entries"] == 2
    # Nothing pending counted as a delivery while waiting.
    for row in redis.xpending_range(keys.terminate_stream, EVENTS_GROUP, "-", "+", 10):
        assert row["times_delivered"] == 1


def test_an_entry_waiting_while_nothing_else_arrives_is_logged_and_measured(
    services: Services, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No batch runs while the only entry waits: its age still shows in the gauge and
    the log line comes once it has waited long enough (here 0.5 s, 10 s by default)."""
    monkeypatch.setattr(consumer_module, "LONG_WAIT_MS", 500)
    keys, redis = backend.keys, backend.redis
    register(services, "alice")
    entry_id = publish(redis, keys, "terminate", session_id="late", results=[], reason="aborted")
    metrics = PrometheusMetrics()
    stop = threading.Event()
    worker = EventConsumer(services, "c1", stop, metrics=metrics)
    worker.log = Recorder()  # type: ignore[assignment]
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        wait_for(
            lambda: any(
                line["event"] == "entry waiting"
                for line in worker.log.lines  # type: ignore[attr-defined]
            ),
            timeout=15,
        )
    finally:
        stop.set()
        thread.join(15)
    (logged,) = [line for line in worker.log.lines if line["event"] == "entry waiting"]  # type: ignore[attr-defined]
    assert logged["entry_id"] == entry_id and logged["waited_s"] >= 0.5
    age = metrics.registry.get_sample_value("usermgmt_events_waiting_oldest_seconds")
    assert age is not None and age >= 0.5


class Recorder:
    """Stands in for a consumer's bound logger: keeps every line as a dict."""

    def __init__(self) -> None:
        self.lines: list[dict[str, Any]] = []

    def _record(self, event: str, **fields: Any) -> None:
        self.lines.append({"event": event, **fields})

    info = warning = error = exception = debug = _record


def status_clock_ms(backend: Backend) -> int:
    seconds, micros = backend.redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


MAX_ID = "18446744073709551615-18446744073709551615"


def test_status_warns_about_a_stream_whose_last_id_is_ahead_of_redis_clock(
    services: Services, backend: Backend
) -> None:
    keys, redis = backend.keys, backend.redis
    publish(redis, keys, "update", session_id="g1", players=["alice", "bob"])
    ensure_group(redis, keys.terminate_stream, EVENTS_GROUP)
    report = status.collect(redis, services.engine, keys, backend.database_url)
    assert report.ids_ahead == {}

    # Ids a producer may choose (ACLs cannot stop it): two minutes ahead, the largest
    # id there is, and half a minute ahead (a clock step: not warned about).
    now = redis_time_ms(redis)
    redis.xadd(keys.terminate_stream, {"payload": b"{}"}, id=f"{now + 120_000}-0")
    redis.xadd(keys.update_stream, {"payload": b"{}"}, id=MAX_ID)
    redis.xadd(keys.auth_requests, {"payload": b"{}"}, id=f"{now + 30_000}-0")
    report = status.collect(redis, services.engine, keys, backend.database_url)
    assert set(report.ids_ahead) == {keys.update_stream, keys.terminate_stream}
    assert report.ids_ahead[keys.update_stream].last_id == MAX_ID
    assert 100 < report.ids_ahead[keys.terminate_stream].ahead_s <= 120
    as_json = orjson.loads(orjson.dumps(report.to_json()))
    assert as_json["ids_ahead"][keys.terminate_stream]["last_id"] == f"{now + 120_000}-0"

    out = io.StringIO()
    print_status(Console(file=out, width=400), report)
    warnings = [line for line in out.getvalue().splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 2
    assert warnings[0].startswith(f"warning: stream {keys.update_stream} has the entry id {MAX_ID}")
    assert "years ahead of Redis's clock" in warnings[0]
    assert (
        f"stream {keys.terminate_stream} has the entry id {now + 120_000}-0, 2 min" in (warnings[1])
    )
    assert "XSETID" in warnings[1]

    # Deleting the entry leaves the stream's last id where it was: still warned about.
    redis.xdel(keys.terminate_stream, f"{now + 120_000}-0")
    report = status.collect(redis, services.engine, keys, backend.database_url)
    assert report.ids_ahead[keys.terminate_stream].last_id == f"{now + 120_000}-0"


def test_status_counts_lag_itself_when_redis_cannot(services: Services, backend: Backend) -> None:
    keys, redis = backend.keys, backend.redis
    ensure_group(redis, keys.auth_requests, AUTH_GROUP)
    ids = [redis.xadd(keys.auth_requests, {"payload": b"{}"}).decode() for _ in range(3)]
    redis.xdel(keys.auth_requests, ids[0])  # a deletion makes the group's lag unknown to Redis
    (group,) = redis_info.group_infos(redis, keys.auth_requests)
    assert group.lag == 2
    assert not group.lag_capped


def test_status_reports_an_unmigrated_database(backend: Backend, tmp_path: Path) -> None:
    empty_url = f"sqlite:///{tmp_path / 'empty.db'}"
    engine = make_engine(empty_url)
    try:
        report = status.collect(backend.redis, engine, backend.keys, empty_url)
    finally:
        engine.dispose()
    assert report.database_error is not None
    assert "stream_checkpoints" in report.database_error
    assert [stream.name for stream in report.streams] == ["update", "terminate", "auth_requests"]


# -- dead letters ---------------------------------------------------------------------------


def test_retry_of_a_fixed_terminate_applies_it_exactly_once(
    services: Services, backend: Backend
) -> None:
    keys, redis = backend.keys, backend.redis
    services = dataclasses.replace(services, settings=make_settings(backend, max_wait_s=0.2))
    register(services, "alice", "bob")
    # The game server reports a game whose update never arrived: it waits, then times out.
    publish(redis, keys, "terminate", session_id="late-1", results=RESULTS)
    drain(services)
    time.sleep(0.3)
    drain(services)
    (letter,) = list(dlq.letters(redis, keys))
    assert letter.reason == "wait_timeout"
    assert letter.stream == keys.terminate_stream
    assert stats_of(services) == [("alice", 0, 0, 0, 0), ("bob", 0, 0, 0, 0)]

    # The fix: the missing update is published; then the letter is retried.
    publish(redis, keys, "update", session_id="late-1", players=["alice", "bob"])
    drain(services)
    new_entry = dlq.retry(redis, keys, letter.id)
    drain(services)

    assert stats_of(services) == [("alice", 1, 0, 150, 150), ("bob", 0, 1, 0, 0)]
    assert redis.xlen(keys.dlq) == 0
    assert (
        redis.xrange(keys.terminate_stream, min=new_entry, max=new_entry)[0][1][b"payload"]
        == letter.payload.encode()
    )
    # Retrying again finds nothing; publishing the same payload again changes nothing.
    with pytest.raises(dlq.LetterNotFound):
        dlq.retry(redis, keys, letter.id)
    redis.xadd(keys.terminate_stream, {"payload": letter.payload.encode()})
    worker = drain(services)
    assert worker.stats.duplicates == 1
    assert stats_of(services) == [("alice", 1, 0, 150, 150), ("bob", 0, 1, 0, 0)]
    assert rows(services, "SELECT count(*) FROM game_results") == [(2,)]


def test_retry_refuses_auth_requests_foreign_streams_and_broken_payloads(
    services: Services, backend: Backend
) -> None:
    keys, redis = backend.keys, backend.redis
    auth = add_letter(
        backend, keys.auth_requests, '{"request_id": "x", "op": "login"}', "invalid_request"
    )
    foreign = add_letter(backend, "other:{events}:update", '{"event_id": "e"}')
    broken = add_letter(backend, keys.update_stream, "{not json", "invalid_json")

    with pytest.raises(dlq.NotRetryable, match="password was removed"):
        dlq.retry(redis, keys, auth)
    with pytest.raises(dlq.NotRetryable, match="not one of this deployment's event streams"):
        dlq.retry(redis, keys, foreign)
    with pytest.raises(dlq.NotRetryable, match="can never apply"):
        dlq.retry(redis, keys, broken)
    with pytest.raises(dlq.LetterNotFound):
        dlq.retry(redis, keys, "1-1")

    assert redis.xlen(keys.dlq) == 3  # every letter is still there
    assert not redis.exists("other:{events}:update")
    assert not redis.exists(keys.update_stream)
    assert not redis.exists(keys.auth_requests)


def test_a_retired_letters_key_of_another_type_stops_retry_and_purge_before_any_change(
    services: Services, backend: Backend
) -> None:
    """In MULTI/EXEC Redis would run the rest: the letter deleted and re-published, its
    record refused. So nothing is done until the key is moved away."""
    keys, redis = backend.keys, backend.redis
    letter = add_letter(backend, keys.update_stream, '{"event_id": "e"}', "unknown_user")
    redis.set(keys.dlq_retired, "written by hand")
    with pytest.raises(dlq.NotRetryable, match="rename or delete it"):
        dlq.retry(redis, keys, letter)
    with pytest.raises(dlq.NotRetryable, match="rename or delete it"):
        dlq.purge(redis, keys)
    assert [x.id for x in dlq.letters(redis, keys)] == [letter]
    assert not redis.exists(keys.update_stream)
    redis.delete(keys.dlq_retired)
    assert dlq.purge(redis, keys) == 1
    (record,) = redis.xrange(keys.dlq_retired)
    assert orjson.loads(record[1][b"payload"])["retired"] == "purged"


def test_list_filters_by_reason_and_purge_deletes_only_what_was_asked(
    services: Services, backend: Backend
) -> None:
    keys, redis = backend.keys, backend.redis
    for number in range(3):
        add_letter(backend, keys.update_stream, f'{{"n": {number}}}', "unknown_user")
    add_letter(backend, keys.terminate_stream, "{}", "session_ended")
    redis.xadd(keys.dlq, {"payload": b"garbage"})

    assert [x.reason for x in dlq.letters(redis, keys)] == [
        "unknown_user",
        "unknown_user",
        "unknown_user",
        "session_ended",
        "unreadable",
    ]
    assert len(list(dlq.letters(redis, keys, reason="session_ended"))) == 1
    shown = dlq.get_letter(redis, keys, next(iter(dlq.letters(redis, keys))).id)
    assert shown.to_json(parse_payload=True)["payload"] == {"n": 0}
    assert status.dlq_reasons(redis, keys) == {
        "unknown_user": 3,
        "session_ended": 1,
        "unreadable": 1,
    }

    assert dlq.purge(redis, keys, reason="unknown_user") == 3
    assert [x.reason for x in dlq.letters(redis, keys)] == ["session_ended", "unreadable"]
    assert dlq.purge(redis, keys) == 2
    assert redis.xlen(keys.dlq) == 0


def test_dead_letters_are_paged_past_one_page(services: Services, backend: Backend) -> None:
    keys, redis = backend.keys, backend.redis
    pipe = redis.pipeline(transaction=False)
    for number in range(dlq.PAGE + 5):
        entry = Entry(stream=keys.update_stream, entry_id=f"1-{number}", payload=b"{}")
        dead_letter(pipe, keys.dlq, entry, "unknown_user", "m")
    pipe.execute()
    assert sum(1 for _ in dlq.letters(redis, keys)) == dlq.PAGE + 5
    assert status.dlq_reasons(redis, keys) == {"unknown_user": dlq.PAGE + 5}


# -- idle consumers -------------------------------------------------------------------------


def test_idle_consumers_without_pending_entries_are_removed(
    services: Services, backend: Backend
) -> None:
    keys, redis = backend.keys, backend.redis
    stream = keys.update_stream
    ensure_group(redis, stream, EVENTS_GROUP)
    for _ in range(4):
        redis.xadd(stream, {"payload": b"{}"})
    for name in ("gone-idle", "gone-with-pending", "me", "alive-elsewhere"):
        redis.xreadgroup(EVENTS_GROUP, name, {stream: ">"}, count=1)  # creates the consumer
    for name in ("gone-idle", "alive-elsewhere"):
        ((_, ((entry_id, _),)),) = redis.xreadgroup(EVENTS_GROUP, name, {stream: "0"}, count=1)
        redis.xack(stream, EVENTS_GROUP, entry_id)

    def names() -> set[str]:
        return {c.name for c in redis_info.consumer_infos(redis, stream, EVENTS_GROUP)}

    keep = {"me", "alive-elsewhere"}
    # Nobody has been idle for an hour: nothing goes.
    assert remove_idle_consumers(redis, stream, EVENTS_GROUP, 3_600_000, keep) == []
    assert names() == {"gone-idle", "gone-with-pending", "me", "alive-elsewhere"}
    removed = wait_for(lambda: remove_idle_consumers(redis, stream, EVENTS_GROUP, 1, keep))
    assert removed == ["gone-idle"]
    assert names() == {"gone-with-pending", "me", "alive-elsewhere"}
    assert redis.xpending(stream, EVENTS_GROUP)["pending"] == 2


def test_the_worker_heartbeat_removes_idle_consumers(services: Services, backend: Backend) -> None:
    keys, redis = backend.keys, backend.redis
    groups = ((keys.terminate_stream, EVENTS_GROUP), (keys.auth_requests, AUTH_GROUP))
    for stream, group in groups:
        ensure_group(redis, stream, group)
        for name in ("old-worker", "this-worker", "other-live-worker"):
            entry_id = redis.xadd(stream, {"payload": b"{}"})
            redis.xreadgroup(group, name, {stream: ">"}, count=1)
            redis.xack(stream, group, entry_id)
    redis.set(keys.heartbeat("other-live-worker"), orjson.dumps({"at": 0}), ex=60)
    # Heartbeats spoilt by hand are read as saying nothing; they stop nothing.
    redis.set(keys.heartbeat("junk"), b"1", ex=60)
    redis.rpush(keys.heartbeat("a-list"), b"x")
    settings = make_settings(backend, consumer_idle_remove_s=0.001)
    worker = Worker(dataclasses.replace(services, settings=settings), "this-worker")

    def consumers_left() -> set[str]:
        return {
            c.name
            for stream, group in groups
            for c in redis_info.consumer_infos(redis, stream, group)
        }

    def pruned() -> bool:
        worker.last_prune = 0.0
        worker._housekeeping()
        return "old-worker" not in consumers_left()

    wait_for(pruned, timeout=10)
    assert consumers_left() == {"this-worker", "other-live-worker"}


def test_every_worker_deletes_auth_requests_too_old_to_answer(
    services: Services, backend: Backend
) -> None:
    """With no auth consumer reading (`--only events`), requests and their passwords
    still leave Redis once they are older than 30 s, as one would have dropped them."""
    keys, redis = backend.keys, backend.redis
    now_ms = redis_time_ms(redis)
    old = {"request_id": str(uuid.uuid4()), "op": "login", "password": "old-secret-1"}
    new = {"request_id": str(uuid.uuid4()), "op": "login", "password": "new-secret-1"}
    redis.xadd(keys.auth_requests, {"payload": orjson.dumps(old)}, id=f"{now_ms - 31_000}-0")
    kept = redis.xadd(keys.auth_requests, {"payload": orjson.dumps(new)}, id=f"{now_ms - 29_000}-0")
    worker = Worker(services, "events-only", only="events")
    worker._housekeeping()
    assert [entry_id for entry_id, _ in redis.xrange(keys.auth_requests)] == [kept]


# -- metrics --------------------------------------------------------------------------------


def test_metrics_count_applied_duplicate_and_dead_lettered_events(
    services: Services, backend: Backend
) -> None:
    keys, redis = backend.keys, backend.redis
    register(services, "alice", "bob")
    same = str(uuid.uuid4())
    publish(redis, keys, "update", session_id="m1", players=["alice", "bob"], event_id=same)
    publish(redis, keys, "update", session_id="m1", players=["alice", "bob"], event_id=same)
    publish(redis, keys, "terminate", session_id="m1", results=RESULTS)
    publish(redis, keys, "update", session_id="m2", players=["nobody"])
    redis.xadd(keys.terminate_stream, {"payload": b"[]"})
    metrics = PrometheusMetrics()
    EventConsumer(services, "c1", threading.Event(), burst=True, metrics=metrics).run()
    metrics.sample_streams(redis, keys)

    def value(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, labels)

    assert value("usermgmt_events_applied_total", type="update") == 1
    assert value("usermgmt_events_applied_total", type="terminate") == 1
    assert value("usermgmt_events_duplicates_total", type="update") == 1
    assert value("usermgmt_events_dead_lettered_total", type="update", reason="unknown_user") == 1
    assert (
        value("usermgmt_events_dead_lettered_total", type="terminate", reason="invalid_event") == 1
    )
    batches = value("usermgmt_event_batch_size_count")
    assert batches is not None and batches >= 1
    assert value("usermgmt_event_batch_size_sum") == 5
    assert value("usermgmt_event_batch_duration_seconds_count") == batches
    assert value("usermgmt_stream_length", stream="update") == 3
    assert value("usermgmt_stream_length", stream="dlq") == 2
    assert value("usermgmt_stream_lag", stream="update", group=EVENTS_GROUP) == 0
    assert value("usermgmt_stream_pending", stream="terminate", group=EVENTS_GROUP) == 0
    assert len(dead_letters(redis, keys)) == 2
