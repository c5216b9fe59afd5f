"""Cache writes go through a `CommandBatch`: what they leave in Redis equals what the
former redis-py pipeline calls left (kept here as the reference), on every backend."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
from redis import Redis
from redis.client import Pipeline

from tests.conftest import Backend
from usermgmt.domain.auth import UserView
from usermgmt.domain.games import Player
from usermgmt.persistence import cache
from usermgmt.persistence.keys import Keys

TTL = 300
ALICE = UserView(id=1, username="Alice", wallet=50, win_count=2, loss_count=1, earnings=90, rank=3)
BOB = UserView(
    id=2, username="bob", wallet=-5, win_count=0, loss_count=4, earnings=0, rank=9,
    session="eu-1:000042",
)  # fmt: skip
CAROL = Player(3, "Carol", 30, 10**12, 7, 0, 10**12, rank=1)  # free again
DAVE = Player(4, "dave.d", 40, 0, 0, 1, 0, rank=9)  # in a live session
SESSIONS = {
    "eu-1:000042": (["bob", "dave.d"], "in_progress", '{"map":"dust"}'),
    "eu-1:000043": (["Ünïcode"], "waiting", "{}"),
}
SCORES = {"Alice": 90, "bob": 0, "Carol": 10**12, "dave.d": 3}


# -- the former redis-py calls, as they were ------------------------------------------


def former_write_user(pipe: Pipeline, keys: Keys, user: UserView, ttl: int) -> None:
    key = keys.user(user.username)
    fields = ("id", "username", "wallet", "win_count", "loss_count", "earnings", "rank")
    pipe.hset(key, mapping={field: getattr(user, field) for field in fields})
    if user.session is None:
        pipe.hdel(key, "session")
    else:
        pipe.hset(key, "session", user.session)
    pipe.expire(key, ttl)


def former_write_session(pipe: Pipeline, keys: Keys, session_id: str, **fields: Any) -> None:
    key = keys.session(session_id)
    pipe.delete(key)
    pipe.hset(
        key,
        mapping={
            "session_id": session_id,
            "players": orjson.dumps(list(fields["players"])).decode(),
            "status": fields["status"],
            "meta": fields["meta"],
            "created_at": fields["created_at"],
            "updated_at": fields["updated_at"],
        },
    )


def former_set_leaderboard_scores(pipe: Pipeline, keys: Keys, scores: dict[str, int]) -> None:
    if scores:
        pipe.zadd(keys.leaderboard, scores, gt=True)  # type: ignore[arg-type]


# -- one run of every write, from the same starting state -------------------------------


def _as_view(player: Player, session: str | None) -> UserView:
    return UserView(
        id=player.id, username=player.username, wallet=player.wallet,
        win_count=player.win_count, loss_count=player.loss_count,
        earnings=player.earnings, rank=player.rank, session=session,
    )  # fmt: skip


def _session_fields(session_id: str) -> dict[str, Any]:
    players, status, meta = SESSIONS[session_id]
    return {
        "players": players,
        "status": status,
        "meta": meta,
        "created_at": "2024-05-01T10:00:00+00:00",
        "updated_at": "2024-05-01T10:05:00.123456+00:00",
    }


def _start(redis: Redis, keys: Keys) -> None:
    """Stale caches: every write must replace what it finds."""
    for key in redis.scan_iter(match=f"{keys.prefix}:*"):
        redis.delete(key)
    redis.hset(keys.user("alice"), mapping={"id": 1, "wallet": 1, "session": "old:1"})
    redis.hset(keys.user("carol"), mapping={"id": 3, "rank": 40, "session": "old:2"})
    redis.hset(keys.session("eu-1:000042"), mapping={"status": "waiting", "players": "[]"})
    redis.zadd(keys.leaderboard, {"Alice": 500, "bob": -1, "someone": 7})


def _former(redis: Redis, keys: Keys) -> None:
    pipe = redis.pipeline(transaction=False)
    former_write_user(pipe, keys, ALICE, TTL)
    former_write_user(pipe, keys, BOB, TTL)
    former_write_user(pipe, keys, _as_view(CAROL, None), TTL)
    former_write_user(pipe, keys, _as_view(DAVE, "eu-1:000042"), TTL)
    for session_id in SESSIONS:
        former_write_session(pipe, keys, session_id, **_session_fields(session_id))
    former_set_leaderboard_scores(pipe, keys, SCORES)
    former_set_leaderboard_scores(pipe, keys, {})
    pipe.execute()


def _batch(redis: Redis, keys: Keys) -> None:
    batch = cache.CommandBatch()
    cache.queue_user(batch, keys, ALICE, TTL)
    cache.queue_user(batch, keys, BOB, TTL)
    hashes = cache.PlayerHashes(keys, TTL)  # the event worker's way
    hashes.queue(batch, CAROL, None)
    hashes.queue(batch, DAVE, "eu-1:000042")
    for session_id in SESSIONS:
        cache.queue_session(batch, keys, session_id, **_session_fields(session_id))
    cache.queue_leaderboard_scores(batch, keys, SCORES)
    cache.queue_leaderboard_scores(batch, keys, {})
    batch.send(redis).wait()


def _state(redis: Redis, keys: Keys) -> dict[str, Any]:
    """Every key under the prefix: its type, its contents, and its expiry (none, or TTL)."""
    found: dict[str, Any] = {}
    for raw in sorted(redis.scan_iter(match=f"{keys.prefix}:*")):
        key = raw.decode()
        kind = redis.type(key).decode()
        if kind == "hash":
            value: Any = redis.hgetall(key)
        else:
            value = redis.zrange(key, 0, -1, withscores=True)
        ttl = redis.ttl(key)
        expiry = "none" if ttl == -1 else "ttl" if TTL - 2 <= ttl <= TTL else f"other: {ttl}"
        found[key] = (kind, value, expiry)
    return found


def _run(backend: Backend, write: Callable[[Redis, Keys], None]) -> dict[str, Any]:
    _start(backend.redis, backend.keys)
    write(backend.redis, backend.keys)
    return _state(backend.redis, backend.keys)


def test_the_batch_leaves_what_the_redis_py_calls_left(backend: Backend) -> None:
    keys = backend.keys
    former = _run(backend, _former)
    assert _run(backend, _batch) == former
    # The reference itself: what a reader of the caches relies on.
    assert set(former) == {
        keys.user("alice"), keys.user("bob"), keys.user("carol"), keys.user("dave.d"),
        keys.session("eu-1:000042"), keys.session("eu-1:000043"), keys.leaderboard,
    }  # fmt: skip
    assert former[keys.user("alice")][1] == {
        b"id": b"1", b"username": b"Alice", b"wallet": b"50", b"win_count": b"2",
        b"loss_count": b"1", b"earnings": b"90", b"rank": b"3",
    }  # fmt: skip
    assert former[keys.user("bob")][1][b"session"] == b"eu-1:000042"
    assert b"session" not in former[keys.user("carol")][1]
    expiries = {key: expiry for key, (_, _, expiry) in former.items()}
    assert expiries == {key: "ttl" if ":user:" in key else "none" for key in former}
    assert former[keys.session("eu-1:000043")][1][b"players"] == '["Ünïcode"]'.encode()
    assert former[keys.leaderboard][1] == [
        (b"bob", 0.0), (b"dave.d", 3.0), (b"someone", 7.0), (b"Alice", 500.0),
        (b"Carol", 1e12),
    ]  # fmt: skip
    assert cache.read_user(backend.redis, keys, "ALICE") == ALICE
    assert cache.read_user(backend.redis, keys, "bob") == BOB
