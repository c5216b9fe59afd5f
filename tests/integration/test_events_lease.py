"""The reader lease: one worker reads new entries, the others stand by and take over."""

from __future__ import annotations

import threading
import time

import pytest

from tests.conftest import Backend
from tests.integration.helpers import add_players, publish, services_for
from tests.integration.replay_helpers import wait_until
from tests.integration.test_events_delivery import (
    PLAYERS,
    burst,
    check_history,
    rematch_history,
    running,
    wait_for,
)
from usermgmt.persistence.keys import EVENTS_GROUP
from usermgmt.workers.events import after_commit, lease
from usermgmt.workers.events.consumer import EventConsumer
from usermgmt.workers.events.lease import TTL_MS
from usermgmt.workers.runtime.streams import Entry, ensure_group


def test_one_worker_reads_while_the_other_stands_by_then_takes_over(backend: Backend) -> None:
    keys = backend.keys
    first_half = rematch_history(PLAYERS, 100, "a", seed=3)
    second_half = rematch_history(PLAYERS, 100, "b", seed=4)
    with services_for(backend, events_lease=True, batch_size=64) as services:
        add_players(services, *PLAYERS)
        with running(services, consumer="A") as first:
            wait_for(lambda: backend.redis.get(keys.events_reader) == b"A")
            with running(services, consumer="B") as second:
                burst(backend.redis, backend, first_half)
                wait_for(lambda: first.stats.applied == len(first_half))
                time.sleep(0.3)
                assert second.stats.applied == 0 and second.standing_by
            # B stopped: A reads on.
        assert backend.redis.get(keys.events_reader) is None  # released on a clean stop
        with running(services, consumer="B") as second:
            burst(backend.redis, backend, second_half)
            wait_for(lambda: second.stats.applied == len(second_half))
        check_history(services, backend, first_half + second_half)


def test_a_standby_takes_over_when_the_readers_lease_runs_out(backend: Backend) -> None:
    """The reader died without a word: its lease lasts TTL_MS, then another reads."""
    keys = backend.keys
    backend.redis.set(keys.events_reader, "dead-worker", px=TTL_MS)
    with services_for(backend, events_lease=True) as services:
        add_players(services, "alice", "bob")
        with running(services, consumer="B") as standby:
            publish(backend.redis, keys, "update", session_id="s1", players=["alice", "bob"])
            time.sleep(0.5)
            assert standby.stats.applied == 0
            started = time.monotonic()
            wait_for(lambda: standby.stats.applied == 1, timeout=TTL_MS / 1000 + 5)
            assert time.monotonic() - started < TTL_MS / 1000 + 1
            assert backend.redis.get(keys.events_reader) == b"B"
            # The dead reader's last writes may still land: ended sessions' hashes are
            # deleted again for a while.
            assert standby.after_commit.until > time.monotonic() + 30


def event_streams(backend: Backend) -> list[str]:
    return [backend.keys.update_stream, backend.keys.terminate_stream]


def read_then_die(backend: Backend, consumer: str, count: int) -> None:
    """`consumer` reads the oldest `count` new entries of each event stream, then dies."""
    streams = event_streams(backend)
    for stream in streams:
        ensure_group(backend.redis, stream, EVENTS_GROUP)
    backend.redis.xreadgroup(EVENTS_GROUP, consumer, dict.fromkeys(streams, ">"), count=count)


def test_a_worker_restarted_beside_the_reader_hands_its_entries_over(backend: Backend) -> None:
    """B crashed with entries read and undecided, and starts again while A reads. B hands
    them to A and stands by; A, which could decide nothing past them, decides them in
    their turn and alone reads on. (B used to decide them itself and read on beside A:
    two readers take turns, each deciding only up to the other's first undecided entry,
    and the soak's two workers crawled for minutes.)"""
    keys, redis = backend.keys, backend.redis
    first = rematch_history(PLAYERS, 60, "h", seed=11)
    second = rematch_history(PLAYERS, 60, "i", seed=12)
    # Reclaiming would take a minute: what reaches the reader was handed over.
    with services_for(backend, events_lease=True, batch_size=16, claim_idle_ms=60_000) as services:
        add_players(services, *PLAYERS)
        burst(redis, backend, first)
        read_then_die(backend, "B", 20)  # B's first life
        with running(services, consumer="A") as reader:
            wait_for(lambda: redis.get(keys.events_reader) == b"A")
            with running(services, consumer="B") as restarted:
                wait_for(lambda: reader.stats.applied == len(first))
                burst(redis, backend, second)
                wait_for(lambda: reader.stats.applied == len(first) + len(second))
                assert restarted.standing_by
                assert restarted.stats.applied == restarted.stats.duplicates == 0
                assert not restarted.buffer and not restarted.held
        assert redis.xlen(keys.dlq) == 0
        check_history(services, backend, first + second)


def test_entries_handed_to_a_worker_standing_by_go_on_to_the_reader(backend: Backend) -> None:
    """Entries handed to B as B lost the lease reach the reader at once: B, standing by,
    takes its `handed` mark and hands them on, rather than leaving them to be reclaimed
    after USERMGMT_CLAIM_IDLE_MS while the reader can decide nothing past them."""
    keys, redis = backend.keys, backend.redis
    events = rematch_history(PLAYERS, 40, "f", seed=13)
    streams = event_streams(backend)
    # Reclaiming would take a minute: what reaches the reader was handed on.
    with services_for(backend, events_lease=True, batch_size=16, claim_idle_ms=60_000) as services:
        add_players(services, *PLAYERS)
        burst(redis, backend, events)
        read_then_die(backend, "X", 10)
        with running(services, consumer="A") as reader:
            wait_for(lambda: redis.get(keys.events_reader) == b"A")
            with running(services, consumer="B") as standby:
                wait_for(lambda: standby.standing_by)
                assert reader.stats.applied < len(events)  # X's entries hold it up
                pipe = redis.pipeline(transaction=True)  # as `Intake.hand_over` does
                for stream in streams:
                    ids = [
                        row["message_id"]
                        for row in redis.xpending_range(stream, EVENTS_GROUP, "-", "+", 100, "X")
                    ]
                    pipe.xclaim(stream, EVENTS_GROUP, "B", 0, ids, justid=True)
                pipe.set(keys.events_handed("B"), "X")
                pipe.execute()
                wait_for(lambda: reader.stats.applied == len(events), timeout=10)
                assert standby.stats.applied == 0 and not standby.held and not standby.buffer
        check_history(services, backend, events)


def test_a_busy_reader_keeps_its_lease(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reader renews while it always has entries in hand: the standby never reads,
    though the backlog lasts many times the (shortened) lease."""
    monkeypatch.setattr(lease, "TTL_MS", 300)
    monkeypatch.setattr(lease, "RENEW_EVERY_S", 0.1)
    events = rematch_history(PLAYERS, 150, "k", seed=5)
    with services_for(backend, events_lease=True, batch_size=8) as services:
        add_players(services, *PLAYERS)
        burst(backend.redis, backend, events)
        with running(services, consumer="A") as reader:
            wait_for(lambda: reader.stats.applied > 0)
            handle = reader.handle

            def slow_handle(entries: list[Entry]) -> None:
                time.sleep(0.02)  # the backlog now lasts seconds
                handle(entries)

            reader.handle = slow_handle  # type: ignore[method-assign]
            with running(services, consumer="B") as standby:
                wait_for(lambda: reader.stats.applied == len(events), timeout=60)
                assert standby.stats.applied == 0
        check_history(services, backend, events)


def test_a_reader_keeps_its_lease_through_a_step_longer_than_the_lease(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One batch of the reader outlasts the (shortened) lease: its renewal thread keeps
    it, so the standby does not take over and read the entries published meanwhile. (It
    did: a hand-over's batch of 45k entries ran past the lease, and the two workers then
    passed a growing heap of entries back and forth.)"""
    monkeypatch.setattr(lease, "TTL_MS", 300)
    monkeypatch.setattr(lease, "RENEW_EVERY_S", 0.1)
    first = rematch_history(PLAYERS, 10, "l", seed=7)
    second = rematch_history(PLAYERS, 10, "m", seed=8)
    with services_for(backend, events_lease=True) as services:
        add_players(services, *PLAYERS)
        with running(services, consumer="A") as reader:
            wait_for(lambda: backend.redis.get(backend.keys.events_reader) == b"A")
            with running(services, consumer="B") as standby:
                wait_for(lambda: standby.standing_by)
                handle = reader.handle
                slowed: list[bool] = []

                def slow_handle(entries: list[Entry]) -> None:
                    if entries and not slowed:
                        slowed.append(True)
                        time.sleep(1.0)  # three leases long
                    handle(entries)

                reader.handle = slow_handle  # type: ignore[method-assign]
                burst(backend.redis, backend, first)
                wait_for(lambda: slowed)
                burst(backend.redis, backend, second)
                wait_for(lambda: reader.stats.applied == len(first) + len(second))
                assert standby.stats.applied == 0 and standby.standing_by
        check_history(services, backend, first + second)


def test_a_worker_that_stands_by_with_dirty_ranks_tells_the_reader(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A applied games and lost the lease before its idle refresh; B reads and had
    refreshed already (it never stood by: a lease that changed hands under load). A's
    note makes B refresh, so the leaderboard table is exact once idle (the outside
    check saw it stale 6 s with a 2 s interval)."""
    keys = backend.keys
    events = rematch_history(PLAYERS, 20, "d", seed=6)
    with services_for(backend, events_lease=True) as services:
        add_players(services, *PLAYERS)
        with running(services, consumer="A") as reader:
            wait_for(lambda: backend.redis.get(keys.events_reader) == b"A")
            monkeypatch.setattr(reader.ranks, "due", lambda idle: False)  # not refreshed yet
            burst(backend.redis, backend, events)
            wait_for(lambda: reader.stats.applied == len(events))
            backend.redis.set(keys.events_reader, "B", px=TTL_MS)  # B took the lease
            wait_for(lambda: reader.standing_by)
            assert backend.redis.get(keys.ranks_dirty) == b"A"

        b = EventConsumer(services, "B", threading.Event())
        b.ranks.dirty, b.waited_for_entries = False, True  # B refreshed before A's batches
        refreshed: list[bool] = []
        monkeypatch.setattr(b, "begin_rank_refresh", lambda: refreshed.append(True))
        b.on_idle()
        assert refreshed == [True]
        assert not backend.redis.exists(keys.ranks_dirty)


def play_s1(backend: Backend) -> None:
    """Session s1 of alice and bob, from its update to its terminate."""
    keys, redis = backend.keys, backend.redis
    publish(redis, keys, "update", session_id="s1", players=["alice", "bob"])
    results = [{"username": "alice", "outcome": "win", "earnings": 5}]
    publish(redis, keys, "terminate", session_id="s1", results=results)


def test_without_the_lease_an_ended_sessions_hash_is_deleted_again(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Workers applying side by side (no lease): another worker's write of a session's
    hash can land after the terminate's delete. The hash of an ended session is deleted
    again a moment later (sooner here), also while nothing else arrives."""
    monkeypatch.setattr(after_commit, "DELETE_AGAIN_AFTER_S", (0.3, 0.6))
    keys, redis = backend.keys, backend.redis
    with services_for(backend, events_lease=False) as services:
        add_players(services, "alice", "bob")
        stop = threading.Event()
        worker = EventConsumer(services, "c1", stop)
        thread = threading.Thread(target=worker.run, daemon=True)
        thread.start()
        try:
            play_s1(backend)
            wait_until(lambda: worker.stats.applied == 2)
            # The other worker's late write of the update's hash, after the delete:
            redis.hset(keys.session("s1"), mapping={"status": "in_progress", "players": "[]"})
            wait_until(lambda: not redis.exists(keys.session("s1")), timeout=5)
        finally:
            stop.set()
            thread.join(15)
    assert not thread.is_alive()


def test_a_delete_again_outlives_the_worker_that_queued_it(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker that applied the terminate is gone before its last delete is due (the
    soak kills workers every few seconds); another worker's late write of the hash
    lands after. The deletes wait in Redis, and the next worker sends them."""
    monkeypatch.setattr(after_commit, "DELETE_AGAIN_AFTER_S", (0.3, 2.0))
    keys, redis = backend.keys, backend.redis
    with services_for(backend, events_lease=False) as services:
        add_players(services, "alice", "bob")
        with running(services, consumer="c1") as first:
            play_s1(backend)
            wait_until(lambda: first.stats.applied == 2)
            first.stop.set()  # gone before its last delete is due
        assert redis.zcard(keys.deletes_again) == 1
        redis.hset(keys.session("s1"), mapping={"status": "in_progress", "players": "[]"})
        with running(services, consumer="c2"):
            wait_until(lambda: not redis.exists(keys.session("s1")), timeout=5)
            wait_until(lambda: redis.zcard(keys.deletes_again) == 0, timeout=5)
