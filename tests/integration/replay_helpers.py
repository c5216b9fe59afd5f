"""Helpers for the recovery tests: a mixed live history, and tables compared one by one."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from redis import Redis
from sqlalchemy import Engine

from tests.integration.helpers import publish
from usermgmt.domain.payloads import text_of
from usermgmt.persistence import accounts
from usermgmt.persistence.keys import Keys
from usermgmt.workers.auth.relay import Relay
from usermgmt.workers.runtime.bootstrap import Services

# Every table a replay must reproduce, as comparable rows (the players' rows with their
# ids; no surrogate keys of game rows, which the live and replayed databases may number
# differently; timestamps only where the event carries them).
TABLES: dict[str, str] = {
    "users": "SELECT id, username, username_key, password_hash, wallet, created_at FROM users",
    "stats": "SELECT id, user_id, win_count, loss_count, earnings FROM stats",
    "leaderboard": "SELECT id, stats_id, rank, earnings FROM leaderboard",
    "game_sessions": "SELECT session_id, status, meta, end_reason, roster_order FROM game_sessions",
    "session_players": (
        "SELECT g.session_id, p.user_id FROM session_players p "
        "JOIN game_sessions g ON g.id = p.session_pk"
    ),
    "game_results": (
        "SELECT g.session_id, r.user_id, r.outcome, r.earnings FROM game_results r "
        "JOIN game_sessions g ON g.id = r.session_pk"
    ),
    "processed_events": "SELECT event_id, stream, entry_id FROM processed_events",
    "waiting_events": "SELECT stream, entry_id, waits_for FROM waiting_events",
    "dead_events": "SELECT stream, entry_id, reason, message FROM dead_events",
}


def table_rows(engine: Engine) -> dict[str, list[tuple[Any, ...]]]:
    """Every compared table as sorted plain tuples (timestamps as naive UTC)."""
    found: dict[str, list[tuple[Any, ...]]] = {}
    with engine.connect() as conn:
        for table, sql in TABLES.items():
            # Typed, so SQLite's stored text comes back as datetimes as PostgreSQL's do.
            typed = {"created_at": sa.DateTime(timezone=True)} if "created_at" in sql else {}
            query = sa.text(sql).columns(**typed)
            found[table] = sorted(
                tuple(_plain(value) for value in row) for row in conn.execute(query)
            )
    return found


def _plain(value: Any) -> Any:
    if isinstance(value, datetime) and value.tzinfo is not None:
        return value.astimezone(UTC).replace(tzinfo=None)
    return value


def register(services: Services, relay: Relay, *names: str, wallet: int = 10) -> None:
    """Register players as the auth server does: commit, then publish before replying."""
    for name in names:
        accounts.create_user(services.engine, name, "$2b$04$" + name.ljust(53, "x"), wallet)
        relay.publish_pending()


def results(*pairs: tuple[str, str, int]) -> list[dict[str, Any]]:
    return [{"username": u, "outcome": o, "earnings": e} for u, o, e in pairs]


def publish_later(redis: Redis, keys: Keys, kind: str, **payload: Any) -> str:
    """Publish in a millisecond after every event entry so far (an explicit `<ms>-*` id).

    Entry ids order the two streams only to the millisecond: an entry that must come
    after another one in the other stream (an update for a session that has ended)
    has to be in a later millisecond, as it would be for producers that publish it
    later. The next `*` ids continue after it.
    """
    import orjson

    newest = 0
    for stream in (keys.update_stream, keys.terminate_stream):
        last = redis.xrevrange(stream, count=1)
        if last:
            newest = max(newest, int(last[0][0].decode().partition("-")[0]))
    payload.setdefault("event_id", str(uuid.uuid4()))
    raw = redis.xadd(
        keys.event_stream(kind), {"payload": orjson.dumps(payload)}, id=f"{newest + 1}-*"
    )
    return text_of(raw)


def play_history(services: Services, relay: Relay) -> dict[str, int]:
    """A live history with every kind of entry a replay must handle; returns entry counts.

    Finished games, a terminate published before its update, a player busy in another
    session (waiting, then applied), duplicates, a still-live session, entries the
    worker dead-letters at once (bad JSON, unknown player, outsider, ended session), and
    a registration published after an update naming the player (the relay was late).
    """
    redis: Redis = services.redis
    keys: Keys = services.keys
    register(services, relay, "alice", "bob", "carol", "dave", "erin")
    publish(redis, keys, "update", session_id="g1", players=["alice", "bob"])
    publish(
        redis,
        keys,
        "terminate",
        session_id="g1",
        results=results(("alice", "win", 150), ("bob", "loss", 0)),
    )
    # A terminate before its update.
    publish(
        redis,
        keys,
        "terminate",
        session_id="g2",
        results=results(("carol", "win", 70), ("dave", "loss", 5)),
    )
    publish(redis, keys, "update", session_id="g2", players=["carol", "dave"])
    # erin busy in g3 when g4 names her: g4 waits until g3 ends.
    publish(redis, keys, "update", session_id="g3", players=["erin", "alice"], meta={"map": "x"})
    publish(redis, keys, "update", session_id="g4", players=["erin", "bob"], status="waiting")
    duplicate = publish(
        redis,
        keys,
        "terminate",
        session_id="g3",
        results=results(("erin", "win", 40), ("alice", "loss", 0)),
    )
    event_id = _event_id(redis, keys.terminate_stream, duplicate)
    publish(
        redis,
        keys,
        "terminate",
        event_id=event_id,
        session_id="g3",
        results=results(("erin", "win", 40), ("alice", "loss", 0)),
    )
    # Dead letters: bad JSON, unknown player, outsider, ended session.
    redis.xadd(keys.update_stream, {"payload": b"{not json"})
    publish(redis, keys, "update", session_id="g5", players=["alice", "nobody"])
    publish(redis, keys, "terminate", session_id="g4", results=results(("carol", "win", 1)))
    publish_later(redis, keys, "update", session_id="g1", players=["alice"])
    # A registration committed, named by an update, and published only afterwards.
    accounts.create_user(services.engine, "frank", "$2b$04$" + "frank".ljust(53, "x"), 10)
    publish(redis, keys, "update", session_id="g6", players=["frank", "carol"])
    relay.publish_pending()
    publish(
        redis,
        keys,
        "terminate",
        session_id="g6",
        results=results(("frank", "win", 500), ("carol", "loss", 0)),
    )
    # A terminate for a session that never starts: waits, then times out (wait_timeout).
    publish(redis, keys, "terminate", session_id="ghost", results=results(("bob", "win", 9)))
    # A second game for g1's players, g4 ends, and g8 is still being played.
    publish(redis, keys, "update", session_id="g7", players=["alice", "bob", "carol"])
    publish(
        redis,
        keys,
        "terminate",
        session_id="g7",
        results=results(("alice", "win", 30), ("bob", "win", 30), ("carol", "loss", 0)),
    )
    publish(redis, keys, "terminate", session_id="g4", reason="aborted", results=[])
    publish(redis, keys, "update", session_id="g8", players=["dave", "erin"], meta={"mode": 2})
    return {
        "accounts": int(redis.xlen(keys.accounts_stream)),
        "update": int(redis.xlen(keys.update_stream)),
        "terminate": int(redis.xlen(keys.terminate_stream)),
    }


def _event_id(redis: Redis, stream: str, entry_id: str) -> str:
    import orjson

    [(_, fields)] = redis.xrange(stream, min=entry_id, max=entry_id)
    return str(orjson.loads(fields[b"payload"])["event_id"])


def wait_until(condition: Callable[[], object], timeout: float = 30.0) -> None:
    """Poll `condition` until it is truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(0.02)


def new_relay(services: Services) -> Relay:
    return Relay(services, threading.Event())
