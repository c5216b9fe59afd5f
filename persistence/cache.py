"""Redis caches: user hashes (TTL), live session hashes and the leaderboard sorted set."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson
from redis import Redis
from redis.client import Pipeline

from domain.auth import UserView
from persistence.keys import Keys

_USER_FIELDS = ("id", "username", "wallet", "win_count", "loss_count", "earnings", "rank")
_INT_FIELDS = frozenset({"id", "wallet", "win_count", "loss_count", "earnings", "rank"})


def user_mapping(user: UserView) -> dict[str, str | int]:
    """The hash fields of a cached user: public fields only, never a password hash."""
    return {field: getattr(user, field) for field in _USER_FIELDS}


def write_user(pipe: Pipeline, keys: Keys, user: UserView, ttl: int) -> None:
    """Replace a cached user hash (with or without a `session` field) and set its TTL."""
    key = keys.user(user.username)
    pipe.hset(key, mapping=user_mapping(user))
    if user.session is None:
        pipe.hdel(key, "session")
    else:
        pipe.hset(key, "session", user.session)
    pipe.expire(key, ttl)


def read_user(client: Redis, keys: Keys, username: str) -> UserView | None:
    """A cached user, or None on a miss (or a partial hash left by an expiry race)."""
    raw = client.hgetall(keys.user(username))
    if not raw or not set(_USER_FIELDS) <= {_text(key) for key in raw}:
        return None
    values: dict[str, Any] = {}
    for key, value in raw.items():
        name, text = _text(key), _text(value)
        values[name] = int(text) if name in _INT_FIELDS else text
    return UserView.model_validate(values)


def write_session(
    pipe: Pipeline,
    keys: Keys,
    session_id: str,
    *,
    players: Iterable[str],
    status: str,
    meta: str,
    created_at: str,
    updated_at: str,
) -> None:
    """Replace a live session hash: players (JSON list), status, meta (JSON), timestamps."""
    key = keys.session(session_id)
    pipe.delete(key)
    pipe.hset(
        key,
        mapping={
            "session_id": session_id,
            "players": orjson.dumps(list(players)).decode(),
            "status": status,
            "meta": meta,
            "created_at": created_at,
            "updated_at": updated_at,
        },
    )


def delete_session(pipe: Pipeline, keys: Keys, session_id: str) -> None:
    """Remove the hash of a session that ended."""
    pipe.delete(keys.session(session_id))


def set_leaderboard_scores(pipe: Pipeline, keys: Keys, scores: dict[str, int]) -> None:
    """Raise members' scores; `GT` keeps a late writer from lowering a newer score."""
    if scores:
        pipe.zadd(keys.leaderboard, scores, gt=True)  # type: ignore[arg-type]


def live_rank(client: Redis, keys: Keys, username: str) -> int | None:
    """Competition rank from the sorted set, or None when the member is not there."""
    score = client.zscore(keys.leaderboard, username)
    if score is None:
        return None
    higher = client.zcount(keys.leaderboard, f"({score}", "+inf")
    return int(higher) + 1


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
