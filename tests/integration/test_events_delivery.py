"""Delivery rules: order across streams, waiting, deliveries, recovery, reclaiming.

See docs/protocol.md, "Delivery".

Entries are decided in merged order but wait only for what they depend on; a waiting
entry stays pending (recorded in `waiting_events`, kept fresh without a delivery) and is
decided again as soon as what it waits for is applied; `max_deliveries` counts real
deliveries without a decision only. Producers here publish without waiting: bursts go
through one pipeline, so many entries share a millisecond, as with real producers.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import orjson
import pytest
from redis import Redis

from tests.conftest import Backend
from tests.integration.helpers import (
    add_players,
    another_client,
    dead_letters,
    drain,
    pending_count,
    publish,
    roster,
    rows,
    services_for,
    standings,
)
from usermgmt.persistence.command_batch import WrongType
from usermgmt.workers.events.consumer import EventConsumer
from usermgmt.workers.events.intake import Intake
from usermgmt.workers.events.store import EventStore
from usermgmt.workers.runtime.bootstrap import Services
from usermgmt.workers.runtime.streams import Entry

GROUP = "usermgmt-events"
Event = tuple[str, dict[str, Any]]  # (stream kind, payload)


def wait_for(condition, timeout: float = 20.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"condition not met within {timeout} s")


@contextmanager
def running(services: Services, consumer: str = "live") -> Iterator[EventConsumer]:
    """A consumer in a thread, as in the worker (not burst): it waits for new entries."""
    stop = threading.Event()
    worker = EventConsumer(services, consumer, stop)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        yield worker
    finally:
        stop.set()
        thread.join(10)
        assert not thread.is_alive()


class RecordingConsumer(EventConsumer):
    """Records every entry handed to a batch, with its delivery count."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.handed: list[tuple[str, str, int]] = []

    def handle(self, entries: list[Entry]) -> None:
        self.handed += [(entry.stream, entry.entry_id, entry.deliveries) for entry in entries]
        super().handle(entries)


def drain_recording(services: Services, consumer: str = "test-consumer") -> RecordingConsumer:
    worker = RecordingConsumer(services, consumer, threading.Event(), burst=True)
    worker.run()
    return worker


def result(name: str, earnings: int, outcome: str = "win") -> dict[str, object]:
    return {"username": name, "outcome": outcome, "earnings": earnings}


def update(session_id: str, *players: str) -> Event:
    return "update", {"event_id": str(uuid.uuid4()), "session_id": session_id, "players": players}


def terminate(session_id: str, *results: dict[str, object], **extra: object) -> Event:
    body = {"event_id": str(uuid.uuid4()), "session_id": session_id, "results": list(results)}
    return "terminate", {**body, **extra}


def burst(redis: Redis, backend: Backend, events: Sequence[Event]) -> list[str]:
    """XADD the events through one pipeline: many of them share a millisecond."""
    pipe = redis.pipeline(transaction=False)
    for kind, body in events:
        pipe.xadd(backend.keys.event_stream(kind), {"payload": orjson.dumps(body)})
    return [raw.decode() if isinstance(raw, bytes) else str(raw) for raw in pipe.execute()]


def ended(services: Services, session_id: str) -> bool:
    return rows(
        services, "SELECT status FROM game_sessions WHERE session_id = :s", s=session_id
    ) == [("ended",)]


def session_state(services: Services, session_id: str) -> list[tuple[Any, ...]]:
    return rows(
        services,
        "SELECT status, end_reason FROM game_sessions WHERE session_id = :s",
        s=session_id,
    )


def waiting(services: Services) -> list[tuple[Any, ...]]:
    """(stream, entry id, session, waits_for) of every recorded waiting entry."""
    return rows(
        services,
        "SELECT stream, entry_id, session_id, waits_for FROM waiting_events "
        "ORDER BY stream, entry_id",
    )


def pending(redis: Redis, stream: str) -> list[tuple[str, str, int]]:
    """(entry id, consumer, times delivered) of the entries pending on `stream`."""
    return [
        (info["message_id"].decode(), info["consumer"].decode(), int(info["times_delivered"]))
        for info in redis.xpending_range(stream, GROUP, "-", "+", 100)
    ]


def server_ms(redis: Redis) -> int:
    seconds, micros = redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


def sleep_until_server_clock_passes(redis: Redis, ms: int) -> None:
    while server_ms(redis) <= ms:
        time.sleep(0.05)


def entry_ms(entry_id: str) -> int:
    return int(entry_id.partition("-")[0])


def totals(worker: EventConsumer) -> tuple[int, int, int, int]:
    """(applied, duplicates, waiting, expired_sessions) of a consumer's stats."""
    stats = worker.stats
    return stats.applied, stats.duplicates, stats.waiting, stats.expired_sessions


# -- waiting ---------------------------------------------------------------------------


@pytest.mark.parametrize("ids", ["burst", "explicit"])
def test_terminate_published_before_its_update_applies_after_it(
    services: Services, backend: Backend, ids: str
) -> None:
    """In one burst (often one millisecond) or a millisecond earlier than its update."""
    add_players(services, "alice", "bob")
    keys = backend.keys
    end = terminate("s1", result("alice", 30), result("bob", 4, "loss"))
    start = update("s1", "alice", "bob")
    if ids == "burst":
        burst(backend.redis, backend, [end, start])
    else:
        clock = Clock(backend)
        clock.publish(end[0], **end[1])
        clock.publish(start[0], **start[1])
    worker = drain(services)
    assert totals(worker) == (2, 0, 0, 0)
    assert standings(services) == {"alice": (1, 0, 30, 30, 1), "bob": (0, 1, 4, 4, 2)}
    assert ended(services, "s1")
    assert dead_letters(backend.redis, keys) == []
    assert pending_count(backend.redis, keys) == 0
    assert waiting(services) == []


def test_a_waiting_terminate_costs_no_delivery(services: Services, backend: Backend) -> None:
    """It stays pending, delivered once, recorded; its update sets it free in the next drain."""
    add_players(services, "alice")
    keys = backend.keys
    entry_id = publish(
        backend.redis, keys, "terminate", session_id="s1", results=[result("alice", 8)]
    )
    first = drain(services)
    assert totals(first) == (0, 0, 1, 0)
    assert pending(backend.redis, keys.terminate_stream) == [(entry_id, "test-consumer", 1)]
    assert waiting(services) == [("terminate", entry_id, "s1", "the first update of session s1")]
    assert standings(services)["alice"][:3] == (0, 0, 0)
    assert dead_letters(backend.redis, keys) == []

    publish(backend.redis, keys, "update", session_id="s1", players=["alice"])
    second = drain(services)
    assert totals(second) == (2, 0, 0, 0)
    assert standings(services)["alice"][:4] == (1, 0, 8, 8)
    assert ended(services, "s1")
    assert waiting(services) == []
    assert pending_count(backend.redis, keys) == 0
    assert dead_letters(backend.redis, keys) == []
    assert not backend.redis.exists(keys.session("s1"))


def test_terminate_waits_for_an_update_that_arrives_later(backend: Backend) -> None:
    keys = backend.keys
    with services_for(backend, max_deliveries=1) as services:
        add_players(services, "alice")
        with running(services) as worker:
            entry_id = publish(
                backend.redis, keys, "terminate", session_id="s1", results=[result("alice", 8)]
            )
            wait_for(lambda: worker.stats.waiting == 1)
            assert standings(services)["alice"][:3] == (0, 0, 0)
            # Waiting is recorded, and costs no delivery.
            assert waiting(services) == [
                ("terminate", entry_id, "s1", "the first update of session s1")
            ]
            assert pending(backend.redis, keys.terminate_stream) == [(entry_id, "live", 1)]
            publish(backend.redis, keys, "update", session_id="s1", players=["alice"])
            wait_for(lambda: ended(services, "s1"))
        assert totals(worker) == (2, 0, 0, 0)
        assert standings(services)["alice"][:3] == (1, 0, 8)
        assert dead_letters(backend.redis, keys) == []
        assert pending_count(backend.redis, keys) == 0
        assert waiting(services) == []


def test_an_update_naming_a_busy_player_waits_for_the_other_session(
    services: Services, backend: Backend
) -> None:
    add_players(services, "alice", "bob")
    keys = backend.keys
    burst(
        backend.redis,
        backend,
        [
            update("s0", "alice"),
            update("s1", "alice", "bob"),
            terminate("s0", result("alice", 5)),
        ],
    )
    worker = drain(services)
    # Had s1 taken alice while she was in s0, ending s0 would have freed her from s1.
    assert totals(worker) == (3, 0, 0, 0)
    assert ended(services, "s0")
    assert roster(services, "s1") == ["alice", "bob"]
    assert backend.redis.hget(keys.user("alice"), "session") == b"s1"
    assert standings(services)["alice"][:3] == (1, 0, 5)
    assert dead_letters(backend.redis, keys) == []
    assert pending_count(backend.redis, keys) == 0


def test_a_busy_player_across_batches(backend: Backend) -> None:
    keys = backend.keys
    with services_for(backend, max_deliveries=1) as services:
        add_players(services, "alice", "bob")
        with running(services) as worker:
            publish(backend.redis, keys, "update", session_id="s0", players=["alice"])
            wait_for(lambda: roster(services, "s0") == ["alice"])
            entry_id = publish(
                backend.redis, keys, "update", session_id="s1", players=["alice", "bob"]
            )
            wait_for(lambda: worker.stats.waiting == 1)
            assert roster(services, "s1") == []
            assert not backend.redis.exists(keys.session("s1"))
            assert waiting(services) == [
                ("update", entry_id, "s1", "player alice to leave live session s0")
            ]
            publish(backend.redis, keys, "terminate", session_id="s0", results=[result("alice", 1)])
            wait_for(lambda: roster(services, "s1") == ["alice", "bob"])
        assert backend.redis.exists(keys.session("s1"))
        assert totals(worker) == (3, 0, 0, 0)
        assert dead_letters(backend.redis, keys) == []
        assert pending_count(backend.redis, keys) == 0
        assert waiting(services) == []


def test_later_events_of_a_session_wait_behind_its_waiting_update(backend: Backend) -> None:
    """An update of s1 waits for carol (busy in s0); the terminate of s1 that follows it
    must not overtake it, or carol's result would be outside the roster."""
    keys = backend.keys
    with services_for(backend, max_deliveries=1) as services:
        add_players(services, "alice", "carol")
        with running(services) as worker:
            burst(backend.redis, backend, [update("s0", "carol"), update("s1", "alice")])
            wait_for(lambda: roster(services, "s1") == ["alice"])
            (grow,) = burst(backend.redis, backend, [update("s1", "alice", "carol")])
            wait_for(lambda: worker.stats.waiting == 1)
            (end,) = burst(
                backend.redis,
                backend,
                [terminate("s1", result("alice", 10), result("carol", 20))],
            )
            wait_for(lambda: worker.stats.waiting == 2)  # the terminate queued behind it
            assert not ended(services, "s1")
            assert waiting(services) == [
                ("terminate", end, "s1", f"update {grow} (session s1)"),
                ("update", grow, "s1", "player carol to leave live session s0"),
            ]
            publish(backend.redis, keys, "terminate", session_id="s0", results=[], reason="aborted")
            wait_for(lambda: ended(services, "s1"))
        assert totals(worker) == (5, 0, 0, 0)
        assert standings(services)["carol"][:3] == (1, 0, 20)
        assert standings(services)["alice"][:3] == (1, 0, 10)
        assert dead_letters(backend.redis, keys) == []
        assert pending_count(backend.redis, keys) == 0
        assert waiting(services) == []


@pytest.mark.parametrize("later_batch", [False, True])
def test_two_updates_asking_for_a_busy_player_get_her_in_entry_id_order(
    backend: Backend, later_batch: bool
) -> None:
    """s2 then s3 both want alice (busy in s1): s2 gets her when s1 ends, s3 when s2 ends,
    also when s3 is read in a later batch than s2 (batch_size=1)."""
    keys = backend.keys
    with services_for(backend, batch_size=1) as services:
        add_players(services, "alice", "bob", "carol")
        publish(backend.redis, keys, "update", session_id="s1", players=["alice"])
        drain(services)
        if later_batch:
            (second,) = burst(backend.redis, backend, [update("s2", "alice", "bob")])
            assert drain(services).stats.waiting == 1
            (third,) = burst(backend.redis, backend, [update("s3", "alice", "carol")])
            assert drain(services).stats.waiting == 2
        else:
            second, third = burst(
                backend.redis,
                backend,
                [update("s2", "alice", "bob"), update("s3", "alice", "carol")],
            )
            worker = drain(services)
            assert totals(worker) == (0, 0, 2, 0)
        assert waiting(services) == [
            ("update", second, "s2", "player alice to leave live session s1"),
            ("update", third, "s3", f"update {second} (session s2)"),
        ]

        publish(backend.redis, keys, "terminate", session_id="s1", results=[result("alice", 5)])
        worker = drain(services)
        assert totals(worker) == (2, 0, 1, 0)
        assert roster(services, "s2") == ["alice", "bob"]
        assert roster(services, "s3") == []
        assert backend.redis.hget(keys.user("alice"), "session") == b"s2"
        assert waiting(services) == [
            ("update", third, "s3", "player alice to leave live session s2")
        ]
        assert pending(backend.redis, keys.update_stream) == [(third, "test-consumer", 1)]

        publish(
            backend.redis,
            keys,
            "terminate",
            session_id="s2",
            results=[result("alice", 7), result("bob", 1, "loss")],
        )
        worker = drain(services)
        assert totals(worker) == (2, 0, 0, 0)
        assert roster(services, "s3") == ["alice", "carol"]
        assert backend.redis.hget(keys.user("alice"), "session") == b"s3"
        assert standings(services)["alice"][:3] == (2, 0, 12)
        assert waiting(services) == []
        assert dead_letters(backend.redis, keys) == []
        assert pending_count(backend.redis, keys) == 0


def test_a_second_copy_of_a_waiting_event_waits_behind_the_first(
    services: Services, backend: Backend
) -> None:
    """A producer published a terminate twice before its update: applied once, the copy
    acked as a duplicate."""
    add_players(services, "alice")
    keys = backend.keys
    end = terminate("s1", result("alice", 9))
    first, copy = burst(backend.redis, backend, [end, end])
    worker = drain(services)
    assert totals(worker) == (0, 0, 2, 0)
    assert waiting(services) == [
        ("terminate", first, "s1", "the first update of session s1"),
        ("terminate", copy, "s1", f"the first copy of its event, terminate {first}"),
    ]
    publish(backend.redis, keys, "update", session_id="s1", players=["alice"])
    worker = drain(services)
    assert totals(worker) == (2, 1, 0, 0)
    assert standings(services)["alice"][:4] == (1, 0, 9, 9)
    assert ended(services, "s1")
    assert waiting(services) == []
    assert dead_letters(backend.redis, keys) == []
    assert pending_count(backend.redis, keys) == 0


def test_an_entry_is_decided_only_once_the_server_clock_has_left_its_millisecond(
    backend: Backend,
) -> None:
    """An entry of a millisecond the server clock has not left yet may still have earlier
    companions on the other stream: it is read, but not decided."""
    keys = backend.keys
    with services_for(backend) as services:
        add_players(services, "alice")
        worker = EventConsumer(services, "c1", threading.Event())
        worker.setup()
        ahead = server_ms(backend.redis) + 400  # a producer whose id runs ahead of the clock
        body = {"event_id": str(uuid.uuid4()), "session_id": "s1", "players": ["alice"]}
        backend.redis.xadd(keys.update_stream, {"payload": orjson.dumps(body)}, id=f"{ahead}-0")
        assert worker.next_entries() == []
        assert [entry.entry_id for entry in worker.buffer] == [f"{ahead}-0"]
        ready: list[Entry] = wait_for(worker.next_entries, timeout=5)
        assert server_ms(backend.redis) > ahead
        assert [entry.entry_id for entry in ready] == [f"{ahead}-0"]
        worker.handle(ready)
        assert roster(services, "s1") == ["alice"]


# -- wait_timeout --------------------------------------------------------------------------


def test_an_entry_that_waits_too_long_is_dead_lettered_as_wait_timeout(
    backend: Backend,
) -> None:
    keys = backend.keys
    with services_for(backend, max_deliveries=3, max_wait_s=0.3) as services:
        add_players(services, "alice")
        entry_id = publish(
            backend.redis, keys, "terminate", session_id="nope", results=[result("alice", 1)]
        )
        worker = drain(services)
        assert totals(worker) == (0, 0, 1, 0)
        assert dead_letters(backend.redis, keys) == []
        assert pending(backend.redis, keys.terminate_stream) == [(entry_id, "test-consumer", 1)]
        time.sleep(0.4)  # the behaviour under test: the clock passes max_wait_s
        worker = drain(services)
        assert worker.stats.dead == Counter({"wait_timeout": 1})
        (letter,) = dead_letters(backend.redis, keys)
        assert (letter["entry_id"], letter["reason"], letter["deliveries"]) == (
            entry_id,
            "wait_timeout",
            1,
        )
        assert "nope" in letter["message"]
        assert pending_count(backend.redis, keys) == 0
        assert waiting(services) == []
        assert standings(services)["alice"][:3] == (0, 0, 0)


def test_wait_timeout_is_measured_in_entry_id_time(backend: Backend) -> None:
    """A backlog decides by entry ids, not by when it is read: s1's update comes 400 ms
    after its terminate (applied); s2's terminate sees 600 ms of later entries first."""
    keys = backend.keys
    clock = Clock(backend)
    with services_for(backend, max_wait_s=0.5) as services:
        add_players(services, "alice", "bob", "carol")
        clock.publish("terminate", session_id="s1", results=[result("alice", 3)])
        clock.ms += 398
        clock.publish("update", session_id="s1", players=["alice"])
        late = clock.publish("terminate", session_id="s2", results=[result("carol", 4)])
        clock.ms += 599
        clock.publish("update", session_id="s3", players=["bob"])  # 600 ms after it
        clock.publish("update", session_id="s2", players=["carol"])
        worker = drain(services)
        assert totals(worker) == (4, 0, 0, 0)
        (letter,) = dead_letters(backend.redis, keys)
        assert (letter["entry_id"], letter["reason"], letter["deliveries"]) == (
            late,
            "wait_timeout",
            1,
        )
        assert ended(services, "s1")
        assert standings(services)["alice"][:3] == (1, 0, 3)
        assert roster(services, "s2") == ["carol"]  # live: its terminate was given up
        assert standings(services)["carol"][:3] == (0, 0, 0)
        assert pending_count(backend.redis, keys) == 0
        assert waiting(services) == []


# -- session timeout ---------------------------------------------------------------------------


def test_a_silent_session_is_ended_as_expired_when_an_update_needs_its_player(
    backend: Backend,
) -> None:
    keys = backend.keys
    with services_for(backend, session_timeout_s=1) as services:
        add_players(services, "alice", "bob")
        first = publish(backend.redis, keys, "update", session_id="s1", players=["alice", "bob"])
        drain(services)
        assert backend.redis.exists(keys.session("s1"))
        sleep_until_server_clock_passes(backend.redis, entry_ms(first) + 1_000)  # under test
        publish(backend.redis, keys, "update", session_id="s2", players=["alice"])
        worker = drain(services)
        assert totals(worker) == (1, 0, 0, 1)
        assert session_state(services, "s1") == [("ended", "expired")]
        assert roster(services, "s2") == ["alice"]
        assert not backend.redis.exists(keys.session("s1"))
        assert backend.redis.hget(keys.user("alice"), "session") == b"s2"
        assert backend.redis.hget(keys.user("bob"), "session") is None
        assert rows(services, "SELECT COUNT(*) FROM game_results") == [(0,)]
        assert dead_letters(backend.redis, keys) == []

        late = publish(
            backend.redis,
            keys,
            "terminate",
            session_id="s1",
            results=[result("alice", 5), result("bob", 1, "loss")],
        )
        worker = drain(services)
        assert worker.stats.dead == Counter({"session_ended": 1})
        (letter,) = dead_letters(backend.redis, keys)
        assert (letter["entry_id"], letter["reason"], letter["deliveries"]) == (
            late,
            "session_ended",
            1,
        )
        assert standings(services)["alice"][:3] == (0, 0, 0)
        assert standings(services)["bob"][:3] == (0, 0, 0)
        assert pending_count(backend.redis, keys) == 0
        assert waiting(services) == []


def test_with_session_timeout_zero_the_update_waits_instead(backend: Backend) -> None:
    keys = backend.keys
    with services_for(backend, session_timeout_s=0) as services:
        add_players(services, "alice")
        first = publish(backend.redis, keys, "update", session_id="s1", players=["alice"])
        drain(services)
        sleep_until_server_clock_passes(backend.redis, entry_ms(first) + 1_000)
        second = publish(backend.redis, keys, "update", session_id="s2", players=["alice"])
        worker = drain(services)
        assert totals(worker) == (0, 0, 1, 0)
        assert session_state(services, "s1") == [("in_progress", None)]
        assert waiting(services) == [
            ("update", second, "s2", "player alice to leave live session s1")
        ]
        assert backend.redis.hget(keys.user("alice"), "session") == b"s1"

        publish(backend.redis, keys, "terminate", session_id="s1", results=[result("alice", 2)])
        worker = drain(services)
        assert totals(worker) == (2, 0, 0, 0)
        assert session_state(services, "s1") == [("ended", "completed")]
        assert roster(services, "s2") == ["alice"]
        assert dead_letters(backend.redis, keys) == []
        assert pending_count(backend.redis, keys) == 0


# -- deliveries counted by Redis --------------------------------------------------------------


@pytest.mark.parametrize("earlier", [3, 2])
def test_deliveries_without_a_decision_are_counted_by_redis(backend: Backend, earlier: int) -> None:
    """`earlier` deliveries to c0 ended without a decision before this process started.

    With max_deliveries (3) of them, taking the entry back is one too many: dead-lettered
    at once with Redis's count. One fewer, and the entry is still decided (it waits).
    """
    keys = backend.keys
    with services_for(backend, max_deliveries=3) as services:
        add_players(services, "alice")
        entry_id = publish(
            backend.redis, keys, "terminate", session_id="nope", results=[result("alice", 1)]
        )
        backend.redis.xgroup_create(keys.terminate_stream, GROUP, id="0", mkstream=True)
        backend.redis.xreadgroup(GROUP, "c0", {keys.terminate_stream: ">"})
        for _ in range(earlier - 1):
            backend.redis.xclaim(keys.terminate_stream, GROUP, "c0", 0, [entry_id])
        assert pending(backend.redis, keys.terminate_stream) == [(entry_id, "c0", earlier)]

        worker = drain(services, consumer="c0")
        if earlier == 3:
            assert totals(worker) == (0, 0, 0, 0)  # dead, not waiting
            assert worker.stats.dead == Counter({"max_deliveries": 1})
            (letter,) = dead_letters(backend.redis, keys)
            assert (letter["entry_id"], letter["reason"], letter["deliveries"]) == (
                entry_id,
                "max_deliveries",
                4,
            )
            assert pending_count(backend.redis, keys) == 0
            assert waiting(services) == []
        else:
            assert totals(worker) == (0, 0, 1, 0)
            assert dead_letters(backend.redis, keys) == []
            assert pending(backend.redis, keys.terminate_stream) == [(entry_id, "c0", 3)]
            assert [row[1] for row in waiting(services)] == [entry_id]


def test_a_recorded_waiting_entry_is_not_dead_lettered_for_deliveries(backend: Backend) -> None:
    """Whatever Redis counts for it, an entry recorded as waiting was decided: restarts do
    not deliver it again, and it is never dead-lettered as max_deliveries."""
    keys = backend.keys
    with services_for(backend, max_deliveries=2) as services:
        add_players(services, "alice")
        entry_id = publish(
            backend.redis, keys, "terminate", session_id="s1", results=[result("alice", 4)]
        )
        for _ in range(4):  # four restarts of the same consumer
            worker = drain(services, consumer="c0")
            assert totals(worker) == (0, 0, 1, 0)
            assert pending(backend.redis, keys.terminate_stream) == [(entry_id, "c0", 1)]
            assert [row[1] for row in waiting(services)] == [entry_id]
        # Deliveries Redis counted anyway (a reclaim, a hand-made XCLAIM): still waiting.
        for _ in range(3):
            backend.redis.xclaim(keys.terminate_stream, GROUP, "c0", 0, [entry_id])
        assert pending(backend.redis, keys.terminate_stream) == [(entry_id, "c0", 4)]
        worker = drain(services, consumer="c0")
        assert totals(worker) == (0, 0, 1, 0)
        assert dead_letters(backend.redis, keys) == []
        publish(backend.redis, keys, "update", session_id="s1", players=["alice"])
        worker = drain(services, consumer="c0")
        assert totals(worker) == (2, 0, 0, 0)
        assert standings(services)["alice"][:3] == (1, 0, 4)
        assert dead_letters(backend.redis, keys) == []
        assert pending_count(backend.redis, keys) == 0
        assert waiting(services) == []


def test_an_entry_that_keeps_failing_to_apply_is_dead_lettered_as_max_deliveries(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Failing to apply counts like a delivery without a decision; the other entries of the
    batch still apply."""
    keys = backend.keys
    real_apply = EventStore.apply
    attempts = Counter[str]()

    def failing(self: EventStore, planned: list[Any], *args: Any) -> Any:
        poisoned = [p for p in planned if p.event.session_id == "poison"]
        if poisoned:
            attempts["poison"] += 1
            raise RuntimeError("this entry breaks the store")
        return real_apply(self, planned, *args)

    monkeypatch.setattr(EventStore, "apply", failing)
    with services_for(backend, max_deliveries=3) as services:
        add_players(services, "alice", "bob")
        bad, _ = burst(backend.redis, backend, [update("poison", "alice"), update("s1", "bob")])
        worker = drain(services)
        assert worker.stats.applied == 1
        assert worker.stats.dead == Counter({"max_deliveries": 1})
        (letter,) = dead_letters(backend.redis, keys)
        assert (letter["entry_id"], letter["reason"], letter["deliveries"]) == (
            bad,
            "max_deliveries",
            3,
        )
        assert roster(services, "s1") == ["bob"]
        assert roster(services, "poison") == []
        assert pending_count(backend.redis, keys) == 0
        assert waiting(services) == []
        assert attempts["poison"] >= 3


# -- reclaiming -----------------------------------------------------------------------------


def idle_for(redis: Redis, streams: Sequence[str], ms: int) -> bool:
    return all(
        info["time_since_delivered"] >= ms
        for stream in streams
        for info in redis.xpending_range(stream, GROUP, "-", "+", 10)
    )


def test_entries_of_a_dead_consumer_are_reclaimed_after_claim_idle_ms(backend: Backend) -> None:
    keys = backend.keys
    streams = (keys.update_stream, keys.terminate_stream)
    with services_for(backend, claim_idle_ms=300) as services:
        add_players(services, "alice")
        burst(backend.redis, backend, [update("s1", "alice"), terminate("s1", result("alice", 6))])
        for stream in streams:
            backend.redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
        backend.redis.xreadgroup(
            GROUP, "dead", {keys.update_stream: ">", keys.terminate_stream: ">"}
        )
        assert pending_count(backend.redis, keys) == 2
        wait_for(lambda: idle_for(backend.redis, streams, 400))
        worker = drain(services, consumer="alive")
        assert totals(worker) == (2, 0, 0, 0)
        assert standings(services)["alice"][:3] == (1, 0, 6)
        assert pending_count(backend.redis, keys) == 0
        assert dead_letters(backend.redis, keys) == []


def test_a_live_consumers_waiting_entry_is_not_reclaimed(backend: Backend) -> None:
    """A waits past claim_idle_ms: it keeps its entry fresh (no delivery counted), so a
    second consumer does not take it; A applies it once its update comes."""
    keys = backend.keys
    with services_for(backend, claim_idle_ms=300) as services:
        add_players(services, "alice")
        with running(services, consumer="A") as worker:
            entry_id = publish(
                backend.redis, keys, "terminate", session_id="s1", results=[result("alice", 2)]
            )
            wait_for(lambda: worker.stats.waiting == 1)
            time.sleep(1.0)  # three claim_idle_ms
            # B looks at every moment of A's cycle (a read of A's blocks up to 1 s).
            for _ in range(8):
                other = drain(services, consumer="B")
                assert totals(other) == (0, 0, 0, 0) and not other.held
                assert pending(backend.redis, keys.terminate_stream) == [(entry_id, "A", 1)]
                assert [row[1] for row in waiting(services)] == [entry_id]
                time.sleep(0.15)
            publish(backend.redis, keys, "update", session_id="s1", players=["alice"])
            wait_for(lambda: ended(services, "s1"))
        assert totals(worker) == (2, 0, 0, 0)
        assert standings(services)["alice"][:3] == (1, 0, 2)
        assert pending_count(backend.redis, keys) == 0
        assert dead_letters(backend.redis, keys) == []


def test_a_live_consumers_waiting_entry_decided_by_another_consumer_is_let_go(
    backend: Backend,
) -> None:
    """B applies the update A's terminate waits for (B had read it), then the terminate
    too; A, still running, drops the entry from its hands and decides nothing twice."""
    keys = backend.keys
    with services_for(backend, claim_idle_ms=300) as services:
        add_players(services, "alice")
        with running(services, consumer="A") as worker:
            entry_id = publish(
                backend.redis, keys, "terminate", session_id="s1", results=[result("alice", 3)]
            )
            wait_for(lambda: worker.stats.waiting == 1)
            # One transaction: B reads the update before A's blocked read is served.
            _, body = update("s1", "alice")
            pipe = backend.redis.pipeline(transaction=True)
            pipe.xadd(keys.update_stream, {"payload": orjson.dumps(body)})
            pipe.xreadgroup(GROUP, "B", {keys.update_stream: ">"})
            raw, _ = pipe.execute()
            start = raw.decode()
            assert pending(backend.redis, keys.update_stream) == [(start, "B", 1)]
            other = drain(services, consumer="B")
            assert totals(other) == (2, 0, 0, 0)
            assert ended(services, "s1")
            assert pending_count(backend.redis, keys) == 0
            wait_for(lambda: not worker.held)
            time.sleep(0.3)
        assert standings(services)["alice"][:4] == (1, 0, 3, 3)
        assert worker.stats.dead == Counter()
        # Nothing of A's waits any more, and A applied nothing itself.
        assert totals(worker) == (0, 0, 0, 0)
        assert waiting(services) == []
        assert dead_letters(backend.redis, keys) == []
        terminated = "SELECT stream, entry_id FROM processed_events WHERE stream = 'terminate'"
        assert rows(services, terminated) == [("terminate", entry_id)]


class DiesAfterCommit(EventConsumer):
    """Commits its batches, then dies before their caches, dead letters and acks go out."""

    def flush(self) -> None:
        self.unsent = None


def test_an_entry_decided_by_a_consumer_that_died_before_acking_holds_nobody_up(
    backend: Backend,
) -> None:
    """B applies s1's update and, woken by it, A's waiting terminate; B dies before its
    acks. Both entries stay pending, yet are decided: A applies later entries without
    waiting for them, finds its terminate decided, and acks it as a duplicate."""
    keys = backend.keys
    with services_for(backend, claim_idle_ms=600_000) as services:  # nothing is reclaimed
        add_players(services, "alice", "bob")
        held = publish(
            backend.redis, keys, "terminate", session_id="s1", results=[result("alice", 3)]
        )
        holder = drain(services, consumer="A")
        assert totals(holder) == (0, 0, 1, 0)
        (lost,) = burst(backend.redis, backend, [update("s1", "alice")])
        DiesAfterCommit(services, "B", threading.Event(), burst=True).run()
        assert ended(services, "s1") and waiting(services) == []
        assert pending(backend.redis, keys.update_stream) == [(lost, "B", 1)]
        assert pending(backend.redis, keys.terminate_stream) == [(held, "A", 1)]

        burst(backend.redis, backend, [update("s2", "bob"), terminate("s2", result("bob", 4))])
        holder.intake.last_fresh = 0.0  # its next read keeps its entries fresh
        thread = threading.Thread(target=holder.run, daemon=True)
        thread.start()
        thread.join(20)
        assert not thread.is_alive(), "held up by entries that were decided"

        assert ended(services, "s2")
        assert totals(holder) == (2, 1, 0, 0)
        assert standings(services)["alice"][:3] == (1, 0, 3)
        assert standings(services)["bob"][:3] == (1, 0, 4)
        assert pending(backend.redis, keys.update_stream) == [(lost, "B", 1)]
        assert pending(backend.redis, keys.terminate_stream) == []
        assert dead_letters(backend.redis, keys) == []


def test_a_live_consumer_times_out_a_waiting_entry_without_new_entries(
    backend: Backend,
) -> None:
    """Nothing else arrives: the server clock alone ends the wait after max_wait_s."""
    keys = backend.keys
    with services_for(backend, max_wait_s=0.5) as services:
        add_players(services, "alice")
        with running(services) as worker:
            entry_id = publish(
                backend.redis, keys, "terminate", session_id="nope", results=[result("alice", 1)]
            )
            wait_for(lambda: worker.stats.waiting == 1)
            (letter,) = wait_for(lambda: dead_letters(backend.redis, keys), timeout=5)
            assert server_ms(backend.redis) > entry_ms(entry_id) + 500
            wait_for(lambda: pending_count(backend.redis, keys) == 0)
        assert (letter["entry_id"], letter["reason"], letter["deliveries"]) == (
            entry_id,
            "wait_timeout",
            1,
        )
        assert worker.stats.dead == Counter({"wait_timeout": 1})
        assert waiting(services) == []
        assert standings(services)["alice"][:3] == (0, 0, 0)


def test_a_stalled_consumer_decides_its_batch_after_another_took_part_of_it_over(
    backend: Backend,
) -> None:
    """B read three updates and stalled (its database away) past claim_idle_ms. A took
    over the oldest, X (s2 wants alice, busy in s1), and recorded it as waiting. Then B's
    batch goes through: X (already recorded), T (s1 drops alice) and Y (s3 wants alice
    too). Each is decided once: X gets alice, Y waits behind it, and no entry fails to
    apply (a failure would count toward max_deliveries)."""
    keys = backend.keys
    with services_for(backend, claim_idle_ms=1_000, max_deliveries=2, batch_size=1) as services:
        add_players(services, "alice", "bob", "carol", "dave")
        publish(backend.redis, keys, "update", session_id="s1", players=["alice"])
        drain(services, consumer="A")
        stalled = EventConsumer(services, "B", threading.Event())
        stalled.setup()
        x, t, y = burst(
            backend.redis,
            backend,
            [
                update("s2", "alice", "bob"),
                update("s1", "dave"),
                update("s3", "alice", "carol"),
            ],
        )
        sleep_until_server_clock_passes(backend.redis, entry_ms(y))
        in_hand: list[Entry] = []
        while len(in_hand) < 3:
            in_hand += next_ready(stalled)
        assert [entry.entry_id for entry in in_hand] == [x, t, y]
        wait_for(lambda: idle_for(backend.redis, [keys.update_stream], 1_100))
        taker = drain(services, consumer="A")  # claims one entry (batch_size=1): X
        assert totals(taker) == (0, 0, 1, 0)
        assert [row[1] for row in waiting(services)] == [x]

        stalled.handle(in_hand)  # the database is back
        assert stalled.applier.failures == Counter()  # no delivery without a decision
        assert [entry.entry_id for entry in stalled.buffer] == []
        stalled.burst = True
        stalled.run()
        assert dead_letters(backend.redis, keys) == []
        assert roster(services, "s1") == ["dave"]
        assert roster(services, "s2") == ["alice", "bob"]
        assert roster(services, "s3") == []
        assert [(row[1], row[3]) for row in waiting(services)] == [
            (y, "player alice to leave live session s2")
        ]
        assert stalled.stats.dead == Counter()


def test_a_dead_consumers_waiting_entry_is_reclaimed_and_still_waits(backend: Backend) -> None:
    """Consumer "gone" recorded a waiting terminate and stopped: after claim_idle_ms another
    consumer takes it over, as a waiting entry (not dead-lettered, even with
    max_deliveries=1, though Redis counts the reclaim as a delivery)."""
    keys = backend.keys
    with services_for(backend, claim_idle_ms=300, max_deliveries=1) as services:
        add_players(services, "alice")
        entry_id = publish(
            backend.redis, keys, "terminate", session_id="s1", results=[result("alice", 7)]
        )
        assert drain(services, consumer="gone").stats.waiting == 1
        wait_for(lambda: idle_for(backend.redis, [keys.terminate_stream], 400))
        worker = drain(services, consumer="alive")
        assert totals(worker) == (0, 0, 1, 0)
        assert [(i, c) for i, c, _ in pending(backend.redis, keys.terminate_stream)] == [
            (entry_id, "alive")
        ]
        assert [row[1] for row in waiting(services)] == [entry_id]
        assert dead_letters(backend.redis, keys) == []
        publish(backend.redis, keys, "update", session_id="s1", players=["alice"])
        worker = drain(services, consumer="alive")
        assert totals(worker) == (2, 0, 0, 0)
        assert standings(services)["alice"][:3] == (1, 0, 7)
        assert pending_count(backend.redis, keys) == 0
        assert dead_letters(backend.redis, keys) == []


def test_nothing_past_an_entry_undecided_on_another_consumer_is_decided(
    backend: Backend,
) -> None:
    """Consumer "ghost" read s1's update and stopped without deciding it. Later entries
    (even an unrelated update) wait for it: it might be what they depend on. After
    claim_idle_ms it is reclaimed and everything applies in order."""
    keys = backend.keys
    with services_for(backend, claim_idle_ms=1_500) as services:
        add_players(services, "alice", "bob")
        for stream in (keys.update_stream, keys.terminate_stream):
            backend.redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
        (first,) = burst(backend.redis, backend, [update("s1", "alice")])
        backend.redis.xreadgroup(GROUP, "ghost", {keys.update_stream: ">"}, count=1)
        assert pending(backend.redis, keys.update_stream) == [(first, "ghost", 1)]
        burst(
            backend.redis,
            backend,
            [update("s2", "bob"), terminate("s1", result("alice", 5))],
        )
        with running(services, consumer="c2") as worker:
            wait_for(lambda: len(worker.buffer) == 2)
            time.sleep(0.3)
            assert rows(services, "SELECT COUNT(*) FROM game_sessions") == [(0,)]
            assert worker.stats.applied == 0
            wait_for(lambda: ended(services, "s1") and roster(services, "s2") == ["bob"])
        assert totals(worker) == (3, 0, 0, 0)
        assert standings(services)["alice"][:3] == (1, 0, 5)
        assert pending_count(backend.redis, keys) == 0
        assert dead_letters(backend.redis, keys) == []


# -- recovery -------------------------------------------------------------------------------


def crash_holding_a_terminate(services: Services, backend: Backend) -> None:
    """c1 applied s1's first update, then read (and died holding) the terminate that
    follows a second update adding carol; that update was never delivered."""
    keys = backend.keys
    add_players(services, "alice", "bob", "carol")
    publish(backend.redis, keys, "update", session_id="s1", players=["alice", "bob"])
    drain(services, consumer="c1")
    burst(
        backend.redis,
        backend,
        [
            update("s1", "alice", "bob", "carol"),
            terminate("s1", result("alice", 1), result("carol", 2, "loss")),
        ],
    )
    # c1's next life: its start takes the mark of the clean stop before, it reads the
    # terminate, and it dies (no mark).
    backend.redis.delete(keys.events_stopped("c1"))
    backend.redis.xreadgroup(GROUP, "c1", {keys.terminate_stream: ">"})


def test_a_restarted_consumer_finishes_its_own_pending_entries_first(backend: Backend) -> None:
    """c1 crashed holding a terminate it had read ahead of the update stream.

    The update that precedes it (adding carol) was never delivered. Restarted under
    the same name, c1 takes its pending terminate back and still applies it after
    that update: carol's result is inside the roster.
    """
    keys = backend.keys
    with services_for(backend, claim_idle_ms=600_000) as services:
        crash_holding_a_terminate(services, backend)

        # Another consumer does not take c1's entry (not idle long enough) ...
        other = drain(services, consumer="c2")
        assert totals(other) == (1, 0, 0, 0)
        assert roster(services, "s1") == ["alice", "bob", "carol"]
        assert pending_count(backend.redis, keys) == 1
        # ... c1 does, at once.
        worker = drain(services, consumer="c1")
        assert totals(worker) == (1, 0, 0, 0)
        assert ended(services, "s1")
        assert standings(services)["carol"][:3] == (0, 1, 2)
        assert dead_letters(backend.redis, keys) == []
        assert pending_count(backend.redis, keys) == 0


def test_a_restarted_consumer_merges_its_pending_entries_with_undelivered_ones(
    backend: Backend,
) -> None:
    """The same crash without another consumer in between: recovery and new entries mix."""
    keys = backend.keys
    with services_for(backend, claim_idle_ms=600_000) as services:
        crash_holding_a_terminate(services, backend)
        worker = drain_recording(services, consumer="c1")
        assert totals(worker) == (2, 0, 0, 0)
        assert sorted(deliveries for _, _, deliveries in worker.handed) == [1, 2]
        assert standings(services)["carol"][:3] == (0, 1, 2)
        assert dead_letters(backend.redis, keys) == []
        assert pending_count(backend.redis, keys) == 0


def test_another_consumer_applies_a_waiting_entry_when_what_it_waits_for_arrives(
    backend: Backend,
) -> None:
    """c1's terminate waits (pending on c1). c2 applies the update it waits for, then the
    terminate too, and acks it although Redis has it pending on c1."""
    keys = backend.keys
    with services_for(backend, claim_idle_ms=600_000) as services:
        add_players(services, "alice")
        entry_id = publish(
            backend.redis, keys, "terminate", session_id="s1", results=[result("alice", 11)]
        )
        assert drain(services, consumer="c1").stats.waiting == 1
        assert pending(backend.redis, keys.terminate_stream) == [(entry_id, "c1", 1)]
        publish(backend.redis, keys, "update", session_id="s1", players=["alice"])
        worker = drain_recording(services, consumer="c2")
        assert totals(worker) == (2, 0, 0, 0)
        assert [(stream, deliveries) for stream, _, deliveries in worker.handed] == [
            (keys.update_stream, 1)
        ]  # the terminate was not delivered to c2 at all
        assert ended(services, "s1")
        assert standings(services)["alice"][:3] == (1, 0, 11)
        assert pending_count(backend.redis, keys) == 0
        assert waiting(services) == []
        # c1 comes back: nothing left for it.
        again = drain(services, consumer="c1")
        assert totals(again) == (0, 0, 0, 0)
        assert standings(services)["alice"][:3] == (1, 0, 11)
        assert dead_letters(backend.redis, keys) == []


# -- chains and rematches -------------------------------------------------------------------


def test_a_chain_of_fifty_games_over_the_same_players_in_one_burst(backend: Backend) -> None:
    """All 50 updates, then all 50 terminates, in one pipeline: each update waits for the
    previous game to end; one drain resolves the whole chain, each entry delivered once."""
    keys = backend.keys
    with services_for(backend) as services:
        add_players(services, "amy", "ben")
        games = [f"g{number}" for number in range(50)]
        events = [update(game, "amy", "ben") for game in games]
        events += [
            terminate(game, result("amy", number + 1), result("ben", 1, "loss"))
            for number, game in enumerate(games)
        ]
        ids = burst(backend.redis, backend, events)
        worker = drain_recording(services)
        assert totals(worker) == (100, 0, 0, 0)
        assert worker.stats.dead == Counter()
        streams = [keys.event_stream(kind) for kind, _ in events]
        assert Counter(worker.handed) == Counter(
            (s, i, 1) for s, i in zip(streams, ids, strict=True)
        )
        table = standings(services)
        assert table["amy"][:4] == (50, 0, 1275, 1275)
        assert table["ben"][:4] == (0, 50, 50, 50)
        assert all(ended(services, game) for game in games)
        assert dead_letters(backend.redis, keys) == []
        assert pending_count(backend.redis, keys) == 0
        assert waiting(services) == []


def rematch_history(players: Sequence[str], games: int, prefix: str, seed: int) -> list[Event]:
    """Games of 4 players; a game's players are free again as soon as its terminate is
    published, and the players freed last are matched first."""
    rng = random.Random(seed)
    free = list(players)
    rng.shuffle(free)
    live: list[tuple[str, list[str]]] = []
    events: list[Event] = []
    started = 0
    while started < games or live:
        if started < games and len(free) >= 4 and (not live or rng.random() < 0.6):
            chosen = free[-2:] + rng.sample(free[:-2], 2)
            for name in chosen:
                free.remove(name)
            game = f"{prefix}{started}"
            started += 1
            events.append(update(game, *chosen))
            live.append((game, chosen))
        else:
            game, chosen = live.pop(rng.randrange(len(live)))
            if rng.random() < 0.1:
                events.append(terminate(game, reason="aborted"))
            else:
                results = [result(chosen[0], rng.randint(1, 1_000))]
                results += [result(name, rng.randint(0, 9), "loss") for name in chosen[1:]]
                events.append(terminate(game, *results))
            free.extend(chosen)
    return events


def expected_outcome(
    events: Sequence[Event], players: Sequence[str]
) -> tuple[dict[str, tuple[int, int, int, int]], set[tuple[str, str, str, int]]]:
    """Each player's (wins, losses, earnings, wallet), and every result row."""
    table = {name: [0, 0, 0] for name in players}
    results: set[tuple[str, str, str, int]] = set()
    for kind, body in events:
        if kind != "terminate":
            continue
        for item in body["results"]:
            row = table[item["username"]]
            row[0 if item["outcome"] == "win" else 1] += 1
            row[2] += item["earnings"]
            results.add((body["session_id"], item["username"], item["outcome"], item["earnings"]))
    return {name: (w, lo, e, e) for name, (w, lo, e) in table.items()}, results


def check_history(services: Services, backend: Backend, events: Sequence[Event]) -> None:
    players = sorted(
        {name for kind, body in events if kind == "update" for name in body["players"]}
    )
    expected, results = expected_outcome(events, players)
    table = standings(services)
    assert {name: table[name][:4] for name in players} == expected
    got = rows(
        services,
        "SELECT g.session_id, u.username, r.outcome, r.earnings FROM game_results r "
        "JOIN game_sessions g ON g.id = r.session_pk JOIN users u ON u.id = r.user_id",
    )
    assert set(got) == results and len(got) == len(results)
    games = sum(1 for kind, _ in events if kind == "update")
    aborted = sum(1 for kind, body in events if kind == "terminate" and body.get("reason"))
    assert sorted(
        rows(services, "SELECT end_reason, COUNT(*) FROM game_sessions GROUP BY end_reason")
    ) == [("aborted", aborted), ("completed", games - aborted)]
    assert rows(services, "SELECT COUNT(*) FROM session_players") == [(0,)]
    assert dead_letters(backend.redis, backend.keys) == []
    assert pending_count(backend.redis, backend.keys) == 0
    assert waiting(services) == []


PLAYERS = [f"p{number:02d}" for number in range(50)]


@pytest.mark.parametrize("publishing", ["one_by_one", "pipelined"])
def test_players_matched_again_at_once(backend: Backend, publishing: str) -> None:
    """300 games of 4 players drawn from 50, each player matched again as soon as their
    game's terminate is published: every event applies once, none is dead-lettered."""
    keys = backend.keys
    events = rematch_history(PLAYERS, 300, "m", seed=7)
    assert len(events) == 600
    with services_for(backend, batch_size=64) as services:
        add_players(services, *PLAYERS)
        if publishing == "pipelined":
            ids = burst(backend.redis, backend, events)
        else:
            ids = [publish(backend.redis, keys, kind, **body) for kind, body in events]
        worker = drain_recording(services)
        assert totals(worker) == (600, 0, 0, 0)
        assert worker.stats.dead == Counter()
        streams = [keys.event_stream(kind) for kind, _ in events]
        assert Counter(worker.handed) == Counter(
            (s, i, 1) for s, i in zip(streams, ids, strict=True)
        )
        check_history(services, backend, events)


def produce_concurrently(backend: Backend, histories: Sequence[list[Event]]) -> None:
    """Each history from its own thread and Redis connection, all at once, no waiting."""
    start = threading.Barrier(len(histories))
    errors: list[BaseException] = []

    def produce(events: list[Event]) -> None:
        client = another_client(backend)
        try:
            start.wait()
            for kind, body in events:
                client.xadd(backend.keys.event_stream(kind), {"payload": orjson.dumps(body)})
        except BaseException as exc:
            errors.append(exc)
        finally:
            client.close()

    producers = [threading.Thread(target=produce, args=(events,)) for events in histories]
    for thread in producers:
        thread.start()
    for thread in producers:
        thread.join(30)
        assert not thread.is_alive()
    assert errors == []


def three_producers_histories() -> list[list[Event]]:
    """300 games, 100 per producer, each producer with its own players."""
    groups = [PLAYERS[0:17], PLAYERS[17:34], PLAYERS[34:50]]
    return [
        rematch_history(group, 100, f"t{number}-", seed=number)
        for number, group in enumerate(groups)
    ]


def test_players_matched_again_at_once_by_three_producers_while_a_consumer_runs(
    backend: Backend,
) -> None:
    histories = three_producers_histories()
    with services_for(backend, batch_size=64) as services:
        add_players(services, *PLAYERS)
        with running(services) as worker:
            produce_concurrently(backend, histories)
            wait_for(lambda: worker.stats.applied >= 600 or worker.stats.dead, timeout=60)
        assert totals(worker) == (600, 0, 0, 0)
        assert worker.stats.dead == Counter()
        check_history(services, backend, [event for events in histories for event in events])


def test_players_matched_again_at_once_with_two_consumers(backend: Backend) -> None:
    """Three producers (60 games), two consumers sharing the work: each entry is decided
    once, by one of them, in an order the rules accept."""
    groups = [PLAYERS[0:17], PLAYERS[17:34], PLAYERS[34:50]]
    histories = [
        rematch_history(group, 20, f"t{number}-", seed=number)
        for number, group in enumerate(groups)
    ]
    with services_for(backend, batch_size=64, claim_idle_ms=30_000) as services:
        add_players(services, *PLAYERS)
        with running(services, consumer="A") as first, running(services, consumer="B") as second:
            workers = (first, second)
            produce_concurrently(backend, histories)
            wait_for(
                lambda: (
                    sum(w.stats.applied for w in workers) >= 120
                    or any(w.stats.dead for w in workers)
                ),
                timeout=60,
            )
            wait_for(lambda: not first.held and not second.held)  # nothing waits
        assert sum(w.stats.applied for w in workers) == 120
        assert [(w.stats.duplicates, w.stats.dead) for w in workers] == [
            (0, Counter()),
            (0, Counter()),
        ]
        check_history(services, backend, [event for events in histories for event in events])


# -- order, with explicit ids -----------------------------------------------------------------


class Clock:
    """Publishes with explicit entry ids, one millisecond apart, so the order in which
    Redis accepted the entries is exactly the order of the calls."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.ms = 1_700_000_000_000

    def publish(self, kind: str, **payload: object) -> str:
        self.ms += 1
        payload.setdefault("event_id", str(uuid.uuid4()))
        stream = self.backend.keys.event_stream(kind)
        entry_id = f"{self.ms}-0"
        self.backend.redis.xadd(stream, {"payload": orjson.dumps(payload)}, id=entry_id)
        return entry_id


def test_a_backlog_over_both_streams_applies_in_entry_id_order(backend: Backend) -> None:
    """Small batches over a backlog where the update stream runs far ahead.

    Every session has two updates (the second adds a player) and a terminate with a
    result for that player. All first updates come first; then, per session, the second
    update and the terminate. Merging by reading both streams batch by batch would
    apply terminates before the second updates they follow (not_in_roster) or second
    updates after their terminate (session_ended).
    """
    keys = backend.keys
    clock = Clock(backend)
    sessions = [f"g{i}" for i in range(8)]
    with services_for(backend, batch_size=3, max_wait_s=1e9, session_timeout_s=0) as services:
        players = {sid: (f"{sid}a", f"{sid}b") for sid in sessions}
        add_players(services, *(name for pair in players.values() for name in pair))
        for sid in sessions:
            clock.publish("update", session_id=sid, players=[players[sid][0]])
        for number, sid in enumerate(sessions):
            first, second = players[sid]
            clock.publish("update", session_id=sid, players=[first, second])
            clock.publish(
                "terminate",
                session_id=sid,
                results=[result(first, number), result(second, 100 + number, "loss")],
            )
        worker = drain(services)
        assert dead_letters(backend.redis, keys) == []
        assert totals(worker) == (24, 0, 0, 0)
        table = standings(services)
        for number, sid in enumerate(sessions):
            first, second = players[sid]
            assert table[first][:3] == (1, 0, number)
            assert table[second][:3] == (0, 1, 100 + number)
            assert ended(services, sid)
        assert pending_count(backend.redis, keys) == 0


def test_a_backlog_where_the_terminate_stream_runs_ahead(backend: Backend) -> None:
    """The mirror image: many terminates first, then updates and terminates interleaved."""
    keys = backend.keys
    clock = Clock(backend)
    with services_for(backend, batch_size=3, max_wait_s=1e9, session_timeout_s=0) as services:
        others = [f"other{number}" for number in range(10)]
        add_players(services, "alice", *others)
        for number, name in enumerate(others):  # games whose terminates fill the stream first
            clock.publish("update", session_id=f"old{number}", players=[name])
        for number in range(10):
            clock.publish("terminate", session_id=f"old{number}", results=[], reason="aborted")
        # alice plays five games in a row: each update must follow the previous
        # terminate, or she would still be busy.
        for number in range(5):
            clock.publish("update", session_id=f"a{number}", players=["alice"])
            clock.publish("terminate", session_id=f"a{number}", results=[result("alice", 10)])
        worker = drain(services)
        assert totals(worker) == (30, 0, 0, 0)
        assert standings(services)["alice"][:3] == (5, 0, 50)
        assert dead_letters(backend.redis, keys) == []
        assert pending_count(backend.redis, keys) == 0


def test_within_one_millisecond_updates_go_before_terminates(backend: Backend) -> None:
    """Sequence numbers count per stream, so `5-0` on the terminate stream may have been
    accepted after `5-3` on the update stream; the update goes first."""
    keys = backend.keys
    with services_for(backend, batch_size=2, max_wait_s=1e9, session_timeout_s=0) as services:
        add_players(services, "alice", "bob", "filler0", "filler1", "filler2")
        publish(backend.redis, keys, "update", session_id="s1", players=["alice"])
        drain(services)
        ms = server_ms(backend.redis) + 5  # just after every id so far
        for seq in range(3):  # other sessions' updates in the same millisecond
            body = {
                "event_id": str(uuid.uuid4()),
                "session_id": f"x{seq}",
                "players": [f"filler{seq}"],
            }
            backend.redis.xadd(
                keys.update_stream, {"payload": orjson.dumps(body)}, id=f"{ms}-{seq}"
            )
        grow = {"event_id": str(uuid.uuid4()), "session_id": "s1", "players": ["alice", "bob"]}
        backend.redis.xadd(keys.update_stream, {"payload": orjson.dumps(grow)}, id=f"{ms}-3")
        end = {
            "event_id": str(uuid.uuid4()),
            "session_id": "s1",
            "results": [result("alice", 1), result("bob", 2)],
        }
        backend.redis.xadd(keys.terminate_stream, {"payload": orjson.dumps(end)}, id=f"{ms}-0")
        worker = drain(services)
        assert totals(worker) == (5, 0, 0, 0)
        assert dead_letters(backend.redis, keys) == []
        assert ended(services, "s1")
        assert standings(services)["bob"][:3] == (1, 0, 2)


def test_the_group_starts_at_zero(services: Services, backend: Backend) -> None:
    """Entries published before any worker ran are processed too."""
    add_players(services, "alice")
    keys = backend.keys
    _, last = burst(
        backend.redis, backend, [update("s1", "alice"), terminate("s1", result("alice", 3))]
    )
    assert backend.redis.xinfo_groups(keys.terminate_stream) == []
    worker = drain(services)
    assert totals(worker) == (2, 0, 0, 0)
    assert standings(services)["alice"][:3] == (1, 0, 3)
    (group,) = backend.redis.xinfo_groups(keys.terminate_stream)
    assert group["name"] == GROUP.encode()
    assert group["last-delivered-id"] == last.encode()


# -- the loop -------------------------------------------------------------------------------


def test_waiting_does_not_spin(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """While an entry waits, the consumer blocks on Redis; it does not poll."""
    keys = backend.keys
    reads = 0
    real_read = Intake.read_new

    def counting(self: Intake, block_ms: int | None) -> object:
        nonlocal reads
        reads += 1
        return real_read(self, block_ms)

    monkeypatch.setattr(Intake, "read_new", counting)
    with services_for(backend, claim_idle_ms=30_000) as services:
        add_players(services, "alice")
        with running(services) as worker:
            publish(
                backend.redis, keys, "terminate", session_id="nope", results=[result("alice", 1)]
            )
            wait_for(lambda: worker.stats.waiting == 1)
            before = reads
            time.sleep(1.5)
            assert reads - before <= 4  # a read blocks up to 1 s


def next_ready(worker: EventConsumer) -> list[Entry]:
    """The next entries the worker may decide (those of the server's current millisecond
    wait for the next one)."""
    for _ in range(1_000):
        entries = worker.next_entries()
        if entries:
            return entries
        time.sleep(0.001)
    raise AssertionError("nothing became ready")


def test_a_batchs_writes_go_out_after_the_next_read_and_replies_come_later(
    backend: Backend,
) -> None:
    """Redis works on a batch's writes while the worker works on the next batch."""
    keys = backend.keys
    with services_for(backend) as services:
        add_players(services, "alice", "bob")
        worker = EventConsumer(services, "c1", threading.Event())
        worker.setup()
        publish(backend.redis, keys, "update", session_id="s1", players=["alice"])
        worker.handle(next_ready(worker))
        # Committed, but neither acked nor cached yet: held until the next read is out.
        assert worker.unsent is not None
        assert backend.redis.xpending(keys.update_stream, GROUP)["pending"] == 1
        assert not backend.redis.exists(keys.user("alice"))

        second = publish(backend.redis, keys, "update", session_id="s2", players=["bob"])
        assert [entry.entry_id for entry in next_ready(worker)] == [second]
        # Sent once the read was: acked and cached, with the replies still unread.
        # On a cluster the acks (another node than the caches') go once those replies
        # are in: when the worker settles.
        assert worker.unsent is None and worker.in_flight is not None
        assert backend.redis.hget(keys.user("alice"), "session") == b"s1"
        if backend.cluster:
            assert len(pending(backend.redis, keys.update_stream)) == 2
        else:
            assert pending(backend.redis, keys.update_stream) == [(second, "c1", 1)]
        worker.settle()
        assert worker.in_flight is None
        assert pending(backend.redis, keys.update_stream) == [(second, "c1", 1)]


def test_an_error_reply_is_raised_after_the_next_commit(backend: Backend) -> None:
    keys = backend.keys
    with services_for(backend) as services:
        add_players(services, "bob")
        worker = EventConsumer(services, "c1", threading.Event())
        worker.setup()
        backend.redis.set(keys.leaderboard, "not a sorted set")  # foreign data
        publish(backend.redis, keys, "update", session_id="s2", players=["bob"])
        worker.handle(next_ready(worker))
        assert worker.next_entries() == []  # nothing new; the writes went out
        with pytest.raises(WrongType, match=f"^WRONGTYPE .* \\(key {keys.leaderboard}\\)$"):
            worker.settle()
        assert worker.in_flight is None
        status = "SELECT status FROM game_sessions WHERE session_id = 's2'"
        assert rows(services, status) == [("in_progress",)]  # committed all the same
        assert backend.redis.delete(keys.leaderboard) == 1


def test_an_entry_decided_before_its_acks_were_lost_again_and_again_is_acked_not_dead(
    backend: Backend,
) -> None:
    """A worker crashed between each commit and its acks until the entries counted more
    deliveries than `max_deliveries`: they were decided (applied) all the same, so they
    are acked as duplicates, not dead-lettered as never decided."""
    with services_for(backend, max_deliveries=2) as services:
        add_players(services, "alice", "bob")
        keys, redis = backend.keys, backend.redis
        burst(
            redis,
            backend,
            [
                update("s1", "alice", "bob"),
                terminate("s1", result("alice", 5), result("bob", 0, "loss")),
            ],
        )
        drain(services, consumer="c1")
        assert standings(services)["alice"][:3] == (1, 0, 5)
        # The acks lost, four crashes over: pending again on c1, delivered four times.
        streams = [keys.update_stream, keys.terminate_stream]
        for stream in streams:
            redis.xgroup_setid(stream, "usermgmt-events", "0")
            redis.xreadgroup("usermgmt-events", "c1", {stream: ">"})
            ids = [entry_id for entry_id, _, _ in pending(redis, stream)]
            redis.xclaim(stream, "usermgmt-events", "c1", 0, ids, retrycount=4)
        assert pending_count(redis, keys) == 2
        again = drain(services, consumer="c1")
        assert (again.stats.duplicates, sum(again.stats.dead.values())) == (2, 0)
        assert dead_letters(redis, keys) == []
        assert pending_count(redis, keys) == 0
        assert standings(services)["alice"][:3] == (1, 0, 5)


@pytest.mark.parametrize("next_name", ["c1", "c2"])
@pytest.mark.parametrize("stopped", ["cleanly", "by a crash"])
def test_only_a_crash_counts_a_delivery_for_what_a_consumer_left_pending(
    services: Services,
    backend: Backend,
    monkeypatch: pytest.MonkeyPatch,
    stopped: str,
    next_name: str,
) -> None:
    """c1 reads a burst but decides none of it (its entries wait in the buffer for the
    clock), then stops. Started again, it takes them back: a delivery more after a crash,
    none after a clean stop (SIGTERM), which handed nothing to a consumer that failed.
    The same when the next worker has another name (the default names are new each
    time) and claims them once they are idle."""
    add_players(services, "alice", "bob")
    keys = backend.keys
    burst(
        backend.redis,
        backend,
        [
            update("s1", "alice", "bob"),
            terminate("s1", result("alice", 5), result("bob", 0, "loss")),
        ],
    )
    stop = threading.Event()
    real_read_new = Intake.read_new

    def read_then_stop(intake: Intake, block_ms: int | None) -> Any:
        read = real_read_new(intake, block_ms)
        if read.entries:
            stop.set()  # SIGTERM right after this read
        return read

    monkeypatch.setattr(Intake, "read_new", read_then_stop)
    monkeypatch.setattr(Intake, "take_ready", lambda intake, read: [])
    EventConsumer(services, "c1", stop).run()
    assert pending_count(backend.redis, keys) == 2
    if stopped == "by a crash":
        backend.redis.delete(keys.events_stopped("c1"))  # a crash leaves no mark
    monkeypatch.undo()

    if next_name != "c1":  # another consumer's entries are claimed once idle that long
        time.sleep(services.settings.claim_idle_ms / 1000)
    again = drain_recording(services, consumer=next_name)
    counted = 1 if stopped == "cleanly" else 2
    assert [deliveries for _, _, deliveries in again.handed] == [counted, counted]
    assert standings(services)["alice"][:3] == (1, 0, 5)
    assert pending_count(backend.redis, keys) == 0
    assert backend.redis.exists(keys.events_stopped(next_name))  # it stopped cleanly too
