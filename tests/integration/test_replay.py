"""Replay: the retained streams rebuild a database exactly as the live worker left it."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from redis import Redis
from sqlalchemy import text

from tests.conftest import POSTGRES_ON, Backend
from tests.integration.helpers import dead_letters, drain, publish, services_for
from tests.integration.replay_helpers import new_relay, play_history, register, table_rows
from usermgmt.domain.payloads import text_of
from usermgmt.persistence import accounts
from usermgmt.persistence.db import make_engine, upgrade
from usermgmt.persistence.keys import Keys
from usermgmt.workers.ops import dlq
from usermgmt.workers.ops.replay import Replayer, rebuild_caches
from usermgmt.workers.runtime.bootstrap import Services

TARGETS = ["sqlite", *(["postgres"] if POSTGRES_ON else [])]


@pytest.fixture
def live(backend: Backend) -> Iterator[Services]:
    """The test's backend with the full mixed history applied by the live consumer."""
    with services_for(backend, max_deliveries=3, max_wait_s=0.3) as services:
        play_history(services, new_relay(services))
        drain(services)
        time.sleep(0.4)  # the terminate of a session that never starts times out
        drain(services)
        yield services


@pytest.fixture(params=TARGETS)
def target_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty, migrated database of each kind to replay into."""
    if request.param == "postgres":
        url: str = request.getfixturevalue("postgres_url")
    else:
        url = f"sqlite:///{tmp_path / 'replayed.db'}"
    upgrade(url)
    return url


def replay_into(live: Services, url: str, **kwargs: object) -> tuple[object, Services]:
    engine = make_engine(url)
    summary = Replayer(
        live.redis,
        live.keys,
        engine,
        limits=live.settings.limits(),
        batch_size=4,  # many chunks, so order across chunk boundaries is exercised
    ).run(**kwargs)  # type: ignore[arg-type]
    return summary, Services(live.settings, live.redis, engine, live.keys)


def test_full_replay_reproduces_the_live_tables(live: Services, target_url: str) -> None:
    expected = table_rows(live.engine)
    assert len(expected["users"]) == 6
    assert {row[0] for row in expected["game_sessions"]} >= {"g1", "g2", "g3", "g6"}
    letters = {(d["stream"], d["entry_id"]) for d in dead_letters(live.redis, live.keys)}

    summary, replayed = replay_into(live, target_url)

    try:
        assert table_rows(replayed.engine) == expected
        assert checkpoints(replayed) == checkpoints(live)  # the accounts stream's too
        assert summary.dead_lettered == len(letters)  # type: ignore[attr-defined]
        assert summary.waiting == 0  # type: ignore[attr-defined]
        assert summary.total_invalid == 0  # type: ignore[attr-defined]
        total = sum(int(live.redis.xlen(s)) for s in _streams(live))
        assert summary.total_read == total  # type: ignore[attr-defined]
        # New registrations continue after the replayed ids (the PostgreSQL sequence).
        user = accounts.create_user(replayed.engine, "newcomer", "h" * 60, 0)
        assert user.id == max(row[0] for row in expected["users"]) + 1
    finally:
        replayed.engine.dispose()


def test_a_replay_after_letters_are_retried_and_purged_reproduces_the_live_tables(
    live: Services, target_url: str
) -> None:
    """The fix-and-retry the operations guide describes: the player g5 named registers,
    its letter is retried (applied live as a new entry), the other letters purged. The
    entry dead-lettered first must stay dead in the replay, not apply at its old place."""
    redis, keys = live.redis, live.keys
    letters = dead_letters(redis, keys)
    [unknown] = [d for d in dead_lettered_ids(redis, keys) if d[1] == "unknown_user"]
    register(live, new_relay(live), "nobody")
    dlq.retry(redis, keys, unknown[0])
    # The update stream's last entry is dead-lettered too: the checkpoint counts it.
    publish(redis, keys, "update", session_id="g9", players=["carol", "ghost"])
    drain(live)
    assert dlq.purge(redis, keys) == len(letters)
    assert not dead_letters(redis, keys)
    expected = table_rows(live.engine)
    # Applied live as a new entry, with the player who registered since.
    assert ("g5", "in_progress") in [row[:2] for row in expected["game_sessions"]]

    summary, replayed = replay_into(live, target_url)

    try:
        assert table_rows(replayed.engine) == expected
        assert checkpoints(replayed) == checkpoints(live)
        assert summary.dead_lettered == len(letters) + 1  # type: ignore[attr-defined]
        assert summary.total_invalid == 0  # type: ignore[attr-defined]
    finally:
        replayed.engine.dispose()


def checkpoints(services: Services) -> dict[str, str]:
    with services.engine.connect() as conn:
        found = conn.execute(text("SELECT stream, last_entry_id FROM stream_checkpoints"))
        return {str(stream): str(entry_id) for stream, entry_id in found}


def dead_lettered_ids(redis: Redis, keys: Keys) -> list[tuple[str, str]]:
    """(letter id, reason) of every letter in the dead-letter stream."""
    return [
        (text_of(letter_id), str(orjson.loads(fields[b"payload"])["reason"]))
        for letter_id, fields in redis.xrange(keys.dlq)
    ]


def test_replaying_twice_changes_nothing(live: Services, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'twice.db'}"
    upgrade(url)
    first, replayed = replay_into(live, url)
    after_first = table_rows(replayed.engine)
    with replayed.engine.connect() as conn:
        checkpoints = conn.execute(text("SELECT * FROM stream_checkpoints")).all()

    second, _ = replay_into(live, url)

    assert table_rows(replayed.engine) == after_first
    with replayed.engine.connect() as conn:
        assert conn.execute(text("SELECT * FROM stream_checkpoints")).all() == checkpoints
    assert first.applied > 0  # type: ignore[attr-defined]
    assert second.applied == 0  # type: ignore[attr-defined]
    assert second.duplicates == first.applied + first.duplicates  # type: ignore[attr-defined]
    replayed.engine.dispose()


def test_replay_onto_the_live_database_is_a_no_op(live: Services) -> None:
    before = table_rows(live.engine)
    summary = Replayer(live.redis, live.keys, live.engine, live.settings.limits()).run()
    assert table_rows(live.engine) == before
    assert summary.applied == 0
    assert summary.duplicates > 0


def test_dead_lettered_entries_are_skipped_and_counted(live: Services, tmp_path: Path) -> None:
    letters = dead_letters(live.redis, live.keys)
    reasons = {d["reason"] for d in letters}
    assert reasons >= {"invalid_json", "wait_timeout", "session_ended", "unknown_user"}
    url = f"sqlite:///{tmp_path / 'dlq.db'}"
    upgrade(url)
    summary, replayed = replay_into(live, url)
    assert summary.dead_lettered == len(letters)  # type: ignore[attr-defined]
    with replayed.engine.connect() as conn:
        sessions = {row[0] for row in conn.execute(text("SELECT session_id FROM game_sessions"))}
    assert "g5" not in sessions and "ghost" not in sessions
    replayed.engine.dispose()


def test_replay_writes_sql_only_unless_asked(live: Services, tmp_path: Path) -> None:
    redis, keys = live.redis, live.keys
    cached = {key: redis.dump(key) for key in redis.scan_iter(match=f"{keys.prefix}:*")}
    url = f"sqlite:///{tmp_path / 'quiet.db'}"
    upgrade(url)
    replay_into(live, url)
    assert {key: redis.dump(key) for key in redis.scan_iter(match=f"{keys.prefix}:*")} == cached


def test_rebuilding_the_caches_matches_the_database(live: Services) -> None:
    redis, keys = live.redis, live.keys
    redis.delete(keys.leaderboard)
    redis.hset(keys.session("stale"), "status", "in_progress")
    redis.hset(keys.user("alice"), "earnings", "999999")
    counts = rebuild_caches(live.engine, redis, keys)
    assert counts["live sessions written"] == 1
    assert not redis.exists(keys.session("stale"))
    assert not redis.exists(keys.user("alice"))
    assert orjson.loads(redis.hget(keys.session("g8"), "players")) == ["dave", "erin"]
    assert redis.hget(keys.session("g8"), "meta") == b'{"mode":2}'
    with live.engine.connect() as conn:
        earnings = dict(
            conn.execute(
                text("SELECT u.username, s.earnings FROM users u JOIN stats s ON s.user_id = u.id")
            ).all()
        )
    board = {
        name.decode(): int(score)
        for name, score in redis.zrange(keys.leaderboard, 0, -1, withscores=True)
    }
    assert board == earnings


def test_replay_ranges_apply_only_the_entries_inside(
    services: Services, backend: Backend, tmp_path: Path
) -> None:
    relay = new_relay(services)
    register(services, relay, "ann", "ben")
    first = publish(services.redis, services.keys, "update", session_id="r1", players=["ann"])
    second = publish(services.redis, services.keys, "update", session_id="r2", players=["ben"])
    url = f"sqlite:///{tmp_path / 'range.db'}"
    upgrade(url)
    engine = make_engine(url)
    replayer = Replayer(services.redis, services.keys, engine)
    from usermgmt.workers.runtime.ranges import parse_id

    summary = replayer.run(end=parse_id(first))
    assert summary.read == {"accounts": 2, "update": 1}
    with engine.connect() as conn:
        assert conn.execute(text("SELECT session_id FROM game_sessions")).scalars().all() == ["r1"]
    summary = Replayer(services.redis, services.keys, engine).run(parse_id(second))
    assert summary.read == {"update": 1}
    with engine.connect() as conn:
        sessions = conn.execute(text("SELECT session_id FROM game_sessions ORDER BY id")).scalars()
        assert sessions.all() == ["r1", "r2"]
    engine.dispose()


def test_conflicting_and_invalid_registrations_are_skipped(
    services: Services, backend: Backend, tmp_path: Path
) -> None:
    relay = new_relay(services)
    register(services, relay, "ann")
    services.redis.xadd(services.keys.accounts_stream, {"payload": b'{"user_id": "x"}'})
    forged = {
        "event_id": str(uuid.uuid4()),
        "user_id": 1,
        "username": "mallory",
        "password_hash": "h" * 60,
        "wallet": 0,
        "created_at": "2026-01-01T00:00:00Z",
    }
    services.redis.xadd(services.keys.accounts_stream, {"payload": orjson.dumps(forged)})
    url = f"sqlite:///{tmp_path / 'conflict.db'}"
    upgrade(url)
    engine = make_engine(url)
    summary = Replayer(services.redis, services.keys, engine).run()
    assert summary.applied == 1
    assert summary.invalid == {"invalid_event": 1, "conflict": 1}
    with engine.connect() as conn:
        assert conn.execute(text("SELECT id, username FROM users")).all() == [(1, "ann")]
    engine.dispose()


def _streams(services: Services) -> list[str]:
    keys = services.keys
    return [keys.accounts_stream, keys.update_stream, keys.terminate_stream]


def test_stats_and_leaderboard_rows_take_their_users_id(backend: Backend) -> None:
    """Two workers registering at once numbered the stats rows in commit order, which a
    replay (registrations in stream order) cannot repeat. The rows now take the user's
    id; on PostgreSQL the sequences are moved ahead first, as such a race leaves them."""
    with services_for(backend) as services:
        if backend.name.startswith("postgres"):
            with services.engine.begin() as conn:
                for table in ("stats", "leaderboard"):
                    sequence = f"pg_get_serial_sequence('{table}', 'id')"
                    conn.execute(text(f"SELECT setval({sequence}, 40)"))
        for name in ("ann", "ben", "cid"):
            accounts.create_user(services.engine, name, "h" * 60, 0)
        with services.engine.connect() as conn:
            ids = conn.execute(
                text(
                    "SELECT u.id, s.id, l.id, l.stats_id FROM users u "
                    "JOIN stats s ON s.user_id = u.id JOIN leaderboard l ON l.stats_id = s.id"
                )
            ).all()
    assert len(ids) == 3
    assert all(len(set(row)) == 1 for row in ids), ids
