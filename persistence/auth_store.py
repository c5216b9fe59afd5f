"""Login tokens (stored only as SHA-256 digests) and the failed-login lockout, in Redis."""

from __future__ import annotations

import hashlib
import secrets
import time

from redis import Redis
from redis.client import Pipeline

from usermgmt.domain.accounts import (
    LOCKOUT_DURATION_S,
    LOCKOUT_MAX_FAILURES,
    LOCKOUT_WINDOW_S,
    TOKEN_BYTES,
    TOKEN_TTL_S,
)
from usermgmt.persistence.keys import Keys


def token_digest(token: str) -> str:
    """The stored form of a token: a SHA-256 hex digest (tokens are random, so no salt)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def queue_session(pipe: Pipeline, keys: Keys, username: str, user_id: int) -> str:
    """After a good password: forget the failed logins and issue a token (two commands).

    Only the token's digest is stored; the token itself goes back to the caller.
    """
    token = secrets.token_urlsafe(TOKEN_BYTES)
    pipe.delete(keys.login_failures(username))
    pipe.set(keys.token(token_digest(token)), user_id, ex=TOKEN_TTL_S)
    return token


def resolve_token(client: Redis, keys: Keys, token: str) -> int | None:
    """The user id a live token belongs to, or None."""
    value = client.get(keys.token(token_digest(token)))
    return int(value) if value is not None else None


def queue_is_locked(pipe: Pipeline, keys: Keys, username: str) -> None:
    """Whether logins for `username` are locked after repeated failures: the reply to
    this command is truthy when they are."""
    pipe.exists(keys.login_lock(username))


def queue_attempt(pipe: Pipeline, keys: Keys, username: str) -> str:
    """Count a login attempt in the 15-minute window *before* its password is checked
    (four commands; the third's reply is the count, this attempt included).

    An attempt counts as a failure until it succeeds (`queue_session` forgets them
    all), so logins sent side by side cannot all be checked before the first failure
    is counted: at most `LOCKOUT_MAX_FAILURES` guesses a window, however many run at
    once, on however many workers. Returns the attempt's member, for `forget_attempt`.
    """
    now = time.time()
    key = keys.login_failures(username)
    attempt = secrets.token_hex(8)
    pipe.zremrangebyscore(key, "-inf", now - LOCKOUT_WINDOW_S)
    pipe.zadd(key, {attempt: now})
    pipe.zcard(key)
    pipe.expire(key, LOCKOUT_WINDOW_S)
    return attempt


def too_many(attempts: int) -> bool:
    """An attempt counted as this one (`queue_attempt`) is not checked: refused as locked."""
    return attempts > LOCKOUT_MAX_FAILURES


def forget_attempt(client: Redis, keys: Keys, username: str, attempt: str) -> None:
    """An attempt refused unchecked counts no failure."""
    client.zrem(keys.login_failures(username), attempt)


def record_failure(client: Redis, keys: Keys, username: str, attempts: int) -> bool:
    """A counted attempt failed: the one that makes `LOCKOUT_MAX_FAILURES` locks the
    username for `LOCKOUT_DURATION_S`. Returns whether it did."""
    if attempts < LOCKOUT_MAX_FAILURES:
        return False
    lock = client.pipeline(transaction=False)
    lock.set(keys.login_lock(username), 1, ex=LOCKOUT_DURATION_S)
    lock.delete(keys.login_failures(username))
    lock.execute()
    return True
