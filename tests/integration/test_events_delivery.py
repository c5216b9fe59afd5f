"""Delivery rules of SPEC §3: order across streams, waiting, retries, recovery, reclaiming."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import orjson
import pytest
from redis.exceptions import ResponseError

from tests.conftest import Backend
from tests.integration.helpers import (
    add_players,
    dead_letters,
    drain,
    pending_count,
    publish,
    roster,
    rows,
    services_for,
    standings,
)
from workers.bootstrap import Services
from workers.event_consumer import EventConsumer

GROUP = "usermgmt-events"


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


def result(name: str, earnings: int, outcome: str = "win") -> dict[str, object]:
    return {"username": name, "outcome": outcome, "earnings": earnings}


def ended(services: Services, session_id: str) -> bool:
    return rows(
        services, "SELECT status FROM game_sessions WHERE session_id = :s", s=session_id
    ) == [("ended",)]


# -- waiting ---------------------------------------------------------------------------


def test_terminate_published_before_its_update_applies_after_it(
    services: Services, backend: Backend
) -> None:
    add_players(services, "alice", "bob")
    keys = backend.keys
    publish(
        backend.redis,
        keys,
        "terminate",
        session_id="s1",
        results=[result("alice", 30), result("bob", 4, "loss")],
    )
    publish(backend.redis, keys, "update", session_id="s1", players=["alice", "bob"])
    drain(services)
    assert standings(services) == {"alice": (1, 0, 30, 30, 1), "bob": (0, 1, 4, 4, 2)}
    assert ended(services, "s1")
    assert dead_letters(backend.redis, keys) == []
    assert pending_count(backend.redis, keys) == 0


def test_terminate_waits_for_an_update_that_arrives_later(backend: Backend) -> None:
    keys = backend.keys
    with services_for(backend, max_deliveries=100) as services:
        add_players(services, "alice")
        with running(services) as worker:
            publish(backend.redis, keys, "terminate", session_id="s1", results=[result("alice", 8)])
            wait_for(lambda: worker.stats.waiting == 1)
            assert standings(services)["alice"][:3] == (0, 0, 0)
            # Waiting is recorded, and costs no delivery.
            waiting = "SELECT stream, waits_for FROM waiting_events"
            assert rows(services, waiting) == [("terminate", "the first update of session s1")]
            (info,) = backend.redis.xpending_range(keys.terminate_stream, GROUP, "-", "+", 10)
            assert info["times_delivered"] == 1
            publish(backend.redis, keys, "update", session_id="s1", players=["alice"])
            wait_for(lambda: ended(services, "s1"))
        assert standings(services)["alice"][:3] == (1, 0, 8)
        assert dead_letters(backend.redis, keys) == []
        assert pending_count(backend.redis, keys) == 0
        assert rows(services, "SELECT COUNT(*) FROM waiting_events") == [(0,)]


def test_an_update_naming_a_busy_player_waits_for_the_other_session(
    services: Services, backend: Backend
) -> None:
    add_players(services, "alice", "bob")
    keys = backend.keys
    publish(backend.redis, keys, "update", session_id="s0", players=["alice"])
    publish(backend.redis, keys, "update", session_id="s1", players=["alice", "bob"])
    publish(backend.redis, keys, "terminate", session_id="s0", results=[result("alice", 5)])
    drain(services)
    # Had s1 taken alice while she was in s0, ending s0 would have freed her from s1.
    assert ended(services, "s0")
    assert roster(services, "s1") == ["alice", "bob"]
    assert backend.redis.hget(keys.user("alice"), "session") == b"s1"
    assert dead_letters(backend.redis, keys) == []


def test_a_busy_player_across_batches(backend: Backend) -> None:
    keys = backend.keys
    with services_for(backend, max_deliveries=100) as services:
        add_players(services, "alice", "bob")
        with running(services) as worker:
            publish(backend.redis, keys, "update", session_id="s0", players=["alice"])
            wait_for(lambda: roster(services, "s0") == ["alice"])
            publish(backend.redis, keys, "update", session_id="s1", players=["alice", "bob"])
            wait_for(lambda: worker.stats.waiting == 1)
            assert roster(services, "s1") == []
            assert not backend.redis.exists(keys.session("s1"))
            publish(backend.redis, keys, "terminate", session_id="s0", results=[result("alice", 1)])
            wait_for(lambda: roster(services, "s1") == ["alice", "bob"])
        assert backend.redis.exists(keys.session("s1"))
        assert dead_letters(backend.redis, keys) == []
        assert pending_count(backend.redis, keys) == 0


def test_later_events_of_a_session_wait_behind_its_deferred_update(backend: Backend) -> None:
    """An update of s1 waits for carol (busy in s0); the terminate of s1 that follows it
    must not overtake it, or carol's result would be outside the roster."""
    keys = backend.keys
    with services_for(backend, max_deliveries=100) as services:
        add_players(services, "alice", "carol")
        with running(services) as worker:
            publish(backend.redis, keys, "update", session_id="s0", players=["carol"])
            publish(backend.redis, keys, "update", session_id="s1", players=["alice"])
            wait_for(lambda: roster(services, "s1") == ["alice"])
            publish(backend.redis, keys, "update", session_id="s1", players=["alice", "carol"])
            wait_for(lambda: worker.stats.waiting == 1)
            publish(
                backend.redis,
                keys,
                "terminate",
                session_id="s1",
                results=[result("alice", 10), result("carol", 20)],
            )
            wait_for(lambda: worker.stats.waiting == 2)  # the terminate queued behind it
            assert not ended(services, "s1")
            publish(backend.redis, keys, "terminate", session_id="s0", results=[], reason="aborted")
            wait_for(lambda: ended(services, "s1"))
        assert standings(services)["carol"][:3] == (1, 0, 20)
        assert standings(services)["alice"][:3] == (1, 0, 10)
        assert dead_letters(backend.redis, keys) == []
        assert pending_count(backend.redis, keys) == 0


# -- retries counted by Redis ------------------------------------------------------------


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
        assert worker.stats.waiting == 1 and dead_letters(backend.redis, keys) == []
        time.sleep(0.4)  # the behaviour under test: entry-id time passes max_wait_s
        drain(services)
        (letter,) = dead_letters(backend.redis, keys)
        assert (letter["entry_id"], letter["reason"], letter["deliveries"]) == (
            entry_id,
            "wait_timeout",
            1,
        )
        assert "nope" in letter["message"]
        assert pending_count(backend.redis, keys) == 0


def test_deliveries_are_counted_by_redis_not_in_memory(backend: Backend) -> None:
    """Three deliveries without a decision happened before this process started: taking
    the entry back is a fourth, past max_deliveries, so it is dead-lettered at once."""
    keys = backend.keys
    with services_for(backend, max_deliveries=3) as services:
        add_players(services, "alice")
        entry_id = publish(
            backend.redis, keys, "terminate", session_id="nope", results=[result("alice", 1)]
        )
        backend.redis.xgroup_create(keys.terminate_stream, GROUP, id="0", mkstream=True)
        backend.redis.xreadgroup(GROUP, "c0", {keys.terminate_stream: ">"})
        backend.redis.xclaim(keys.terminate_stream, GROUP, "c0", 0, [entry_id])
        backend.redis.xclaim(keys.terminate_stream, GROUP, "c0", 0, [entry_id])
        (info,) = backend.redis.xpending_range(keys.terminate_stream, GROUP, "-", "+", 10)
        assert info["times_delivered"] == 3

        worker = drain(services, consumer="c0")
        assert worker.stats.waiting == 0  # dead, not waiting
        (letter,) = dead_letters(backend.redis, keys)
        assert (letter["reason"], letter["deliveries"]) == ("max_deliveries", 4)
        assert pending_count(backend.redis, keys) == 0


def test_a_waiting_entry_recorded_as_such_is_not_dead_lettered_for_deliveries(
    backend: Backend,
) -> None:
    """Restarts and reclaims of a waiting entry count no delivery toward the limit."""
    keys = backend.keys
    with services_for(backend, max_deliveries=2) as services:
        add_players(services, "alice")
        publish(backend.redis, keys, "terminate", session_id="s1", results=[result("alice", 4)])
        for _ in range(4):  # four restarts of the same consumer
            drain(services, consumer="c0")
        (info,) = backend.redis.xpending_range(keys.terminate_stream, GROUP, "-", "+", 10)
        assert info["times_delivered"] == 1
        publish(backend.redis, keys, "update", session_id="s1", players=["alice"])
        drain(services, consumer="c0")
        assert standings(services)["alice"][:3] == (1, 0, 4)
        assert dead_letters(backend.redis, keys) == []


# -- order ---------------------------------------------------------------------------------


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
        assert worker.stats.waiting == 0  # nothing is left waiting
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
        assert worker.stats.waiting == 0
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
        seconds, micros = backend.redis.time()
        ms = int(seconds) * 1000 + int(micros) // 1000 + 5  # just after every id so far
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
        drain(services)
        assert dead_letters(backend.redis, keys) == []
        assert ended(services, "s1")
        assert standings(services)["bob"][:3] == (1, 0, 2)


def test_the_group_starts_at_zero(services: Services, backend: Backend) -> None:
    """Entries published before any worker ran are processed too."""
    add_players(services, "alice")
    keys = backend.keys
    publish(backend.redis, keys, "update", session_id="s1", players=["alice"])
    last = publish(backend.redis, keys, "terminate", session_id="s1", results=[result("alice", 3)])
    assert backend.redis.xinfo_groups(keys.terminate_stream) == []
    drain(services)
    assert standings(services)["alice"][:3] == (1, 0, 3)
    (group,) = backend.redis.xinfo_groups(keys.terminate_stream)
    assert group["name"] == GROUP.encode()
    assert group["last-delivered-id"] == last.encode()


# -- recovery -------------------------------------------------------------------------------


def test_a_restarted_consumer_finishes_its_own_pending_entries_first(backend: Backend) -> None:
    """c1 crashed holding a terminate it had read ahead of the update stream.

    The update that precedes it (adding carol) was never delivered. Restarted under
    the same name, c1 takes its pending terminate back and still applies it after
    that update: carol's result is inside the roster.
    """
    keys = backend.keys
    with services_for(backend, claim_idle_ms=600_000) as services:
        add_players(services, "alice", "bob", "carol")
        publish(backend.redis, keys, "update", session_id="s1", players=["alice", "bob"])
        drain(services, consumer="c1")
        publish(backend.redis, keys, "update", session_id="s1", players=["alice", "bob", "carol"])
        publish(
            backend.redis,
            keys,
            "terminate",
            session_id="s1",
            results=[result("alice", 1), result("carol", 2, "loss")],
        )
        backend.redis.xreadgroup(GROUP, "c1", {keys.terminate_stream: ">"})  # then it died

        # Another consumer does not take c1's entry (not idle long enough) ...
        drain(services, consumer="c2")
        assert roster(services, "s1") == ["alice", "bob", "carol"]
        assert pending_count(backend.redis, keys) == 1
        # ... c1 does, at once.
        drain(services, consumer="c1")
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
        add_players(services, "alice", "bob", "carol")
        publish(backend.redis, keys, "update", session_id="s1", players=["alice", "bob"])
        drain(services, consumer="c1")
        publish(backend.redis, keys, "update", session_id="s1", players=["alice", "bob", "carol"])
        publish(
            backend.redis,
            keys,
            "terminate",
            session_id="s1",
            results=[result("alice", 1), result("carol", 2, "loss")],
        )
        backend.redis.xreadgroup(GROUP, "c1", {keys.terminate_stream: ">"})
        worker = drain(services, consumer="c1")
        assert worker.stats.applied == 2
        assert standings(services)["carol"][:3] == (0, 1, 2)
        assert dead_letters(backend.redis, keys) == []
        assert pending_count(backend.redis, keys) == 0


def test_entries_of_a_dead_consumer_are_reclaimed_after_claim_idle_ms(backend: Backend) -> None:
    keys = backend.keys
    with services_for(backend, claim_idle_ms=300) as services:
        add_players(services, "alice")
        publish(backend.redis, keys, "update", session_id="s1", players=["alice"])
        publish(backend.redis, keys, "terminate", session_id="s1", results=[result("alice", 6)])
        for stream in (keys.update_stream, keys.terminate_stream):
            backend.redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
        backend.redis.xreadgroup(
            GROUP, "dead", {keys.update_stream: ">", keys.terminate_stream: ">"}
        )
        assert pending_count(backend.redis, keys) == 2

        def idle_long_enough() -> bool:
            return all(
                info["time_since_delivered"] >= 400
                for stream in (keys.update_stream, keys.terminate_stream)
                for info in backend.redis.xpending_range(stream, GROUP, "-", "+", 10)
            )

        wait_for(idle_long_enough)
        worker = drain(services, consumer="alive")
        assert worker.stats.applied == 2
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
            publish(backend.redis, keys, "terminate", session_id="s1", results=[result("alice", 2)])
            wait_for(lambda: worker.stats.waiting == 1)
            time.sleep(1.0)  # three claim_idle_ms
            other = drain(services, consumer="B")
            assert other.stats.applied == 0 and not other.held
            (info,) = backend.redis.xpending_range(keys.terminate_stream, GROUP, "-", "+", 10)
            assert (info["consumer"], info["times_delivered"]) == (b"A", 1)
            publish(backend.redis, keys, "update", session_id="s1", players=["alice"])
            wait_for(lambda: ended(services, "s1"))
        assert standings(services)["alice"][:3] == (1, 0, 2)
        assert pending_count(backend.redis, keys) == 0


def test_waiting_does_not_spin(backend: Backend, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """While an entry waits, the consumer blocks on Redis; it does not poll."""
    keys = backend.keys
    reads = 0
    real_read = EventConsumer.read_new

    def counting(self: EventConsumer, block_ms: int | None) -> object:
        nonlocal reads
        reads += 1
        return real_read(self, block_ms)

    monkeypatch.setattr(EventConsumer, "read_new", counting)
    with services_for(backend) as services:
        add_players(services, "alice")
        with running(services) as worker:
            publish(
                backend.redis, keys, "terminate", session_id="nope", results=[result("alice", 1)]
            )
            wait_for(lambda: worker.stats.waiting == 1)
            before = reads
            time.sleep(1.5)
            assert reads - before <= 4  # a read blocks up to 1 s


def next_ready(worker: EventConsumer) -> list[object]:
    """The next entries the worker may decide (those of the server's current millisecond
    wait for the next one)."""
    for _ in range(1_000):
        entries = worker.next_entries()
        if entries:
            return entries  # type: ignore[return-value]
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
        worker.handle(next_ready(worker))  # type: ignore[arg-type]
        # Committed, but neither acked nor cached yet: held until the next read is out.
        assert worker.unsent is not None
        assert backend.redis.xpending(keys.update_stream, GROUP)["pending"] == 1
        assert not backend.redis.exists(keys.user("alice"))

        publish(backend.redis, keys, "update", session_id="s2", players=["bob"])
        assert [e.entry_id for e in next_ready(worker)] == [  # type: ignore[attr-defined]
            entry_id.decode() for entry_id, _ in [backend.redis.xrange(keys.update_stream)[-1]]
        ]
        # Sent once the read was: acked and cached, with the replies still unread.
        assert worker.unsent is None and worker.in_flight is not None
        assert backend.redis.hget(keys.user("alice"), "session") == b"s1"
        assert backend.redis.xpending(keys.update_stream, GROUP)["pending"] == 1  # s2 only
        worker.settle()
        assert worker.in_flight is None


def test_an_error_reply_is_raised_after_the_next_commit(backend: Backend) -> None:
    keys = backend.keys
    with services_for(backend) as services:
        add_players(services, "bob")
        worker = EventConsumer(services, "c1", threading.Event())
        worker.setup()
        backend.redis.set(keys.user("bob"), "not a hash")  # foreign data where a hash goes
        publish(backend.redis, keys, "update", session_id="s2", players=["bob"])
        worker.handle(next_ready(worker))  # type: ignore[arg-type]
        assert worker.next_entries() == []  # nothing new; the writes went out
        with pytest.raises(ResponseError, match="WRONGTYPE"):
            worker.settle()
        assert worker.in_flight is None
        status = "SELECT status FROM game_sessions WHERE session_id = 's2'"
        assert rows(services, status) == [("in_progress",)]  # committed all the same
        assert backend.redis.delete(keys.user("bob")) == 1
