"""The full effect of update and terminate, duplicates and poison entries.

See docs/protocol.md, "Game events".
"""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime, timedelta

import orjson
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

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
from usermgmt.persistence.replay import live_sessions
from usermgmt.workers.events.after_commit import AfterCommit
from usermgmt.workers.events.consumer import EventConsumer
from usermgmt.workers.runtime.bootstrap import Services


def text_hash(backend: Backend, key: str) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in backend.redis.hgetall(key).items()}


def aware(value: str) -> datetime:
    parsed = datetime.fromisoformat(value)
    assert parsed.tzinfo is not None, f"{value!r} has no time zone"
    return parsed


def session_row(services: Services, session_id: str) -> tuple[object, ...]:
    (row,) = rows(
        services,
        "SELECT status, meta, end_reason, ended_at FROM game_sessions WHERE session_id = :s",
        s=session_id,
    )
    return row


def test_update_records_the_session_in_sql_and_redis(services: Services, backend: Backend) -> None:
    add_players(services, "alice", "bob", "carol")
    keys, sid = backend.keys, "eu-1:000042"
    meta = {"map": "dust", "round": 2, "ranked": True, "ratio": 0.5}
    event_id = str(uuid.uuid4())
    before = datetime.now(UTC) - timedelta(seconds=1)
    publish(
        backend.redis,
        keys,
        "update",
        event_id=event_id,
        session_id=sid,
        players=["Alice", "bob"],
        status="waiting",
        meta=meta,
    )
    drain(services)

    status, stored_meta, end_reason, ended_at = session_row(services, sid)
    assert (status, end_reason, ended_at) == ("waiting", None, None)
    assert orjson.loads(str(stored_meta)) == meta
    assert roster(services, sid) == ["alice", "bob"]
    assert rows(services, "SELECT event_id FROM processed_events") == [(event_id,)]

    cached = text_hash(backend, keys.session(sid))
    assert orjson.loads(cached["players"]) == ["alice", "bob"]
    assert cached["status"] == "waiting"
    assert orjson.loads(cached["meta"]) == meta
    created = aware(cached["created_at"])
    assert before <= created <= datetime.now(UTC)
    assert aware(cached["updated_at"]) == created
    for name in ("alice", "bob"):
        user = text_hash(backend, keys.user(name))
        assert user["session"] == sid
        assert user["username"] == name
        assert backend.redis.ttl(keys.user(name)) > 0
    assert not backend.redis.exists(keys.user("carol"))  # not in the game: not touched
    assert pending_count(backend.redis, keys) == 0

    # A later update replaces roster, status and meta; created_at stays.
    publish(backend.redis, keys, "update", session_id=sid, players=["bob", "carol"])
    drain(services)
    status, stored_meta, _, _ = session_row(services, sid)
    assert (status, orjson.loads(str(stored_meta))) == ("in_progress", {})
    assert roster(services, sid) == ["bob", "carol"]
    cached = text_hash(backend, keys.session(sid))
    assert orjson.loads(cached["players"]) == ["bob", "carol"]
    assert (cached["status"], orjson.loads(cached["meta"])) == ("in_progress", {})
    assert aware(cached["created_at"]) == created
    assert aware(cached["updated_at"]) > created
    assert "session" not in text_hash(backend, keys.user("alice"))
    assert text_hash(backend, keys.user("carol"))["session"] == sid
    assert text_hash(backend, keys.user("bob"))["session"] == sid


def test_terminate_credits_results_and_ends_the_session(
    services: Services, backend: Backend
) -> None:
    add_players(services, "alice", "bob", "carol", "dave", "erin", wallet=10)
    keys = backend.keys
    publish(
        backend.redis, keys, "update", session_id="s1", players=["alice", "bob", "carol", "dave"]
    )
    end_id = str(uuid.uuid4())
    publish(
        backend.redis,
        keys,
        "terminate",
        event_id=end_id,
        session_id="s1",
        results=[
            {"username": "ALICE", "outcome": "win", "earnings": 150},
            {"username": "bob", "outcome": "loss", "earnings": 20},
            {"username": "carol", "outcome": "loss", "earnings": 0},  # no wallet write
        ],
    )
    drain(services)

    assert standings(services) == {
        "alice": (1, 0, 150, 160, 1),
        "bob": (0, 1, 20, 30, 2),
        "carol": (0, 1, 0, 10, 3),
        "dave": (0, 0, 0, 10, 3),
        "erin": (0, 0, 0, 10, 3),
    }
    assert rows(
        services,
        "SELECT g.session_id, u.username, r.outcome, r.earnings FROM game_results r "
        "JOIN users u ON u.id = r.user_id JOIN game_sessions g ON g.id = r.session_pk "
        "ORDER BY u.username",
    ) == [("s1", "alice", "win", 150), ("s1", "bob", "loss", 20), ("s1", "carol", "loss", 0)]
    status, _, end_reason, ended_at = session_row(services, "s1")
    assert (status, end_reason) == ("ended", "completed")
    assert ended_at is not None
    assert roster(services, "s1") == []
    assert (end_id,) in rows(services, "SELECT event_id FROM processed_events")
    assert rows(
        services,
        "SELECT COUNT(*) FROM leaderboard l JOIN stats s ON s.id = l.stats_id "
        "WHERE l.earnings <> s.earnings",
    ) == [(0,)]

    assert not backend.redis.exists(keys.session("s1"))
    alice = text_hash(backend, keys.user("alice"))
    assert "session" not in alice
    assert (alice["earnings"], alice["wallet"], alice["win_count"]) == ("150", "160", "1")
    carol = text_hash(backend, keys.user("carol"))
    assert (carol["loss_count"], carol["earnings"], carol["wallet"]) == ("1", "0", "10")
    dave = text_hash(backend, keys.user("dave"))  # on the roster without a result
    assert "session" not in dave and dave["earnings"] == "0"
    assert backend.redis.zscore(keys.leaderboard, "alice") == 150
    assert backend.redis.zscore(keys.leaderboard, "bob") == 20
    assert dead_letters(backend.redis, keys) == []
    assert pending_count(backend.redis, keys) == 0


def test_an_aborted_game_ends_the_session_without_credit(
    services: Services, backend: Backend
) -> None:
    add_players(services, "alice", "bob")
    keys = backend.keys
    publish(backend.redis, keys, "update", session_id="s1", players=["alice", "bob"])
    publish(backend.redis, keys, "terminate", session_id="s1", results=[], reason="aborted")
    drain(services)
    assert session_row(services, "s1")[0::2] == ("ended", "aborted")
    assert rows(services, "SELECT COUNT(*) FROM game_results") == [(0,)]
    assert standings(services)["alice"][:4] == (0, 0, 0, 0)
    assert not backend.redis.exists(keys.session("s1"))
    assert "session" not in text_hash(backend, keys.user("bob"))
    # The players are free for their next game.
    publish(backend.redis, keys, "update", session_id="s2", players=["alice", "bob"])
    drain(services)
    assert roster(services, "s2") == ["alice", "bob"]


def test_the_same_event_published_twice_applies_once(services: Services, backend: Backend) -> None:
    add_players(services, "alice", "bob")
    keys = backend.keys
    start = {"event_id": str(uuid.uuid4()), "session_id": "s1", "players": ["alice", "bob"]}
    end = {
        "event_id": str(uuid.uuid4()),
        "session_id": "s1",
        "results": [
            {"username": "alice", "outcome": "win", "earnings": 70},
            {"username": "bob", "outcome": "loss", "earnings": 5},
        ],
    }
    for _ in range(2):
        publish(backend.redis, keys, "update", **start)
        publish(backend.redis, keys, "terminate", **end)
    worker = drain(services)
    assert (worker.stats.applied, worker.stats.duplicates) == (2, 2)
    # And once more after it was applied: still a duplicate, not a session_ended.
    publish(backend.redis, keys, "terminate", **end)
    publish(backend.redis, keys, "update", **start)
    worker = drain(services)
    assert (worker.stats.applied, worker.stats.duplicates) == (0, 2)

    assert standings(services) == {"alice": (1, 0, 70, 70, 1), "bob": (0, 1, 5, 5, 2)}
    assert rows(services, "SELECT COUNT(*) FROM game_results") == [(2,)]
    assert rows(services, "SELECT COUNT(*) FROM processed_events") == [(2,)]
    assert dead_letters(backend.redis, keys) == []
    assert pending_count(backend.redis, keys) == 0


def test_a_late_duplicate_refreshes_a_player_with_the_session_they_play_in_now(
    services: Services, backend: Backend
) -> None:
    """bob was in s1's roster without a result, then matched again into s2. A copy of
    s1's terminate published later (or redelivered after a crash) refreshes bob's hash:
    it must say s2, where bob plays now, not that he is free. Found by the model test."""
    add_players(services, "alice", "bob")
    keys = backend.keys
    end = {
        "event_id": str(uuid.uuid4()),
        "session_id": "s1",
        "results": [{"username": "alice", "outcome": "win", "earnings": 40}],
    }
    publish(backend.redis, keys, "update", session_id="s1", players=["alice", "bob"])
    publish(backend.redis, keys, "terminate", **end)
    publish(backend.redis, keys, "update", session_id="s2", players=["bob"])
    drain(services)
    assert backend.redis.hget(keys.user("bob"), "session") == b"s2"

    publish(backend.redis, keys, "terminate", **end)  # a new worker: it knows nobody yet
    assert drain(services).stats.duplicates == 1
    assert backend.redis.hget(keys.user("bob"), "session") == b"s2"
    assert backend.redis.hget(keys.user("alice"), "session") is None


def test_a_roster_read_back_from_the_database_keeps_the_updates_order(
    services: Services, backend: Backend
) -> None:
    """The session hash lists the players in the last update's order, also when a
    duplicate refreshes it from a session read from the database (a new worker) and
    when the caches are rebuilt from the tables (`replay --refresh-caches`)."""
    add_players(services, "amy", "bob", "zed")  # user ids in this order
    keys = backend.keys
    waiting = {"event_id": str(uuid.uuid4()), "session_id": "s1", "status": "waiting"}
    publish(backend.redis, keys, "update", **waiting, players=["zed", "bob", "amy"])
    publish(backend.redis, keys, "update", session_id="s1", players=["bob", "zed", "amy"])
    drain(services)
    publish(backend.redis, keys, "update", **waiting, players=["zed", "bob", "amy"])
    assert drain(services).stats.duplicates == 1  # a new worker: it knows nobody yet

    players = orjson.loads(backend.redis.hget(keys.session("s1"), "players"))
    assert players == ["bob", "zed", "amy"]
    assert [s.players for s in live_sessions(services.engine)] == [["bob", "zed", "amy"]]


def test_a_redelivered_duplicate_refreshes_lost_caches(
    services: Services, backend: Backend
) -> None:
    add_players(services, "alice", "bob", wallet=3)
    keys = backend.keys
    start = {"event_id": str(uuid.uuid4()), "session_id": "s1", "players": ["alice", "bob"]}
    publish(backend.redis, keys, "update", **start)
    drain(services)
    backend.redis.delete(keys.session("s1"), keys.user("alice"), keys.user("bob"))

    publish(backend.redis, keys, "update", **start)
    assert drain(services).stats.duplicates == 1
    assert orjson.loads(backend.redis.hget(keys.session("s1"), "players")) == ["alice", "bob"]
    assert backend.redis.hget(keys.user("alice"), "session") == b"s1"
    assert backend.redis.hget(keys.user("bob"), "session") == b"s1"

    end = {
        "event_id": str(uuid.uuid4()),
        "session_id": "s1",
        "results": [{"username": "alice", "outcome": "win", "earnings": 40}],
    }
    publish(backend.redis, keys, "terminate", **end)
    drain(services)
    backend.redis.delete(keys.user("alice"), keys.leaderboard)
    backend.redis.hset(keys.session("s1"), "status", "stale")  # a hash left behind

    publish(backend.redis, keys, "terminate", **end)
    assert drain(services).stats.duplicates == 1
    alice = text_hash(backend, keys.user("alice"))
    assert (alice["earnings"], alice["wallet"], alice["win_count"]) == ("40", "43", "1")
    assert "session" not in alice
    assert not backend.redis.exists(keys.session("s1"))
    assert backend.redis.zscore(keys.leaderboard, "alice") == 40
    assert standings(services)["alice"] == (1, 0, 40, 43, 1)
    assert dead_letters(backend.redis, keys) == []


def test_a_crash_between_commit_and_ack_applies_nothing_twice(
    services: Services, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The effect is committed, then Redis fails before caches and acks and the process
    dies: the entries come back to the same consumer, are recognised as applied, and
    only the caches follow. (A consumer that lives on takes them back itself: see
    test_redis_unavailable.py.)"""
    add_players(services, "alice", "bob")
    keys = backend.keys
    publish(backend.redis, keys, "update", session_id="s1", players=["alice", "bob"])
    publish(
        backend.redis,
        keys,
        "terminate",
        session_id="s1",
        results=[{"username": "bob", "outcome": "win", "earnings": 9}],
    )
    real_publish = AfterCommit.publish

    crash = threading.Event()

    def lost_connection(self: AfterCommit, *args: object) -> None:
        crash.set()  # and the process with it: its run loop ends here
        raise RedisConnectionError("connection lost (test)")

    monkeypatch.setattr(AfterCommit, "publish", lost_connection)
    crashed = EventConsumer(services, "c1", crash, burst=True)
    crashed.run()
    assert crashed.stats.applied == 2
    assert pending_count(backend.redis, keys) == 2
    assert not backend.redis.exists(keys.user("bob"))

    monkeypatch.setattr(AfterCommit, "publish", real_publish)
    recovered = drain(services, consumer="c1")
    assert (recovered.stats.applied, recovered.stats.duplicates) == (0, 2)
    assert standings(services)["bob"][:4] == (1, 0, 9, 9)
    assert backend.redis.hget(keys.user("bob"), "earnings") == b"9"
    assert pending_count(backend.redis, keys) == 0


def test_a_poison_entry_does_not_hold_back_the_batch(services: Services, backend: Backend) -> None:
    add_players(services, "alice", "bob")
    keys = backend.keys
    publish(backend.redis, keys, "update", session_id="s1", players=["alice"])
    backend.redis.xadd(keys.update_stream, {"payload": b"{broken"})
    publish(backend.redis, keys, "update", session_id="s2", players=["bob", "ghost"])
    publish(backend.redis, keys, "update", session_id="s3", players=["bob"])
    publish(
        backend.redis,
        keys,
        "terminate",
        session_id="s1",
        results=[{"username": "alice", "outcome": "win", "earnings": 5}],
    )
    drain(services)
    assert [d["reason"] for d in dead_letters(backend.redis, keys)] == [
        "invalid_json",
        "unknown_user",
    ]
    assert standings(services)["alice"][:3] == (1, 0, 5)
    assert roster(services, "s3") == ["bob"]
    assert rows(services, "SELECT COUNT(*) FROM game_sessions WHERE session_id = 's2'") == [(0,)]
    assert pending_count(backend.redis, keys) == 0


def test_an_entry_that_fails_to_write_is_isolated_and_retried(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch whose write raises is applied entry by entry: the others commit, the
    failing one is retried until the delivery limit, and caches match the end state."""
    from usermgmt.workers.events import store as event_store

    real_write = event_store.write_changes

    def write_changes(conn, world, changes, now):  # type: ignore[no-untyped-def]
        if "poison" in changes.sessions:
            raise RuntimeError("cannot write this one (test)")
        real_write(conn, world, changes, now)

    monkeypatch.setattr(event_store, "write_changes", write_changes)
    with services_for(backend, max_deliveries=2) as services:
        add_players(services, "alice", "bob")
        keys = backend.keys
        publish(backend.redis, keys, "update", session_id="s1", players=["alice"])
        publish(backend.redis, keys, "update", session_id="poison", players=["bob"])
        publish(
            backend.redis,
            keys,
            "terminate",
            session_id="s1",
            results=[{"username": "alice", "outcome": "win", "earnings": 5}],
        )
        drain(services)
        assert standings(services)["alice"][:3] == (1, 0, 5)
        letters = dead_letters(backend.redis, keys)
        assert [(d["reason"], d["deliveries"]) for d in letters] == [("max_deliveries", 2)]
        assert "poison" in letters[0]["payload"]
        # alice's cache shows her out of s1, although an earlier entry put her in.
        alice = text_hash(backend, keys.user("alice"))
        assert "session" not in alice and alice["earnings"] == "5"
        assert not backend.redis.exists(keys.session("s1"))
        assert pending_count(backend.redis, keys) == 0
