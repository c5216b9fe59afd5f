"""Login tokens (stored only as SHA-256 digests) and the failed-login lockout, in Redis."""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass

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


def queue_session(
    pipe: Pipeline, keys: Keys, username: str, user_id: int, counted: Iterable[bytes | str]
) -> str:
    """After a good password: forget the failed logins and issue a token (two commands).

    `counted`: the lockout set's members as this login's check was counted (its own
    among them, `queue_attempt`). Only those are forgotten: a failure counted while
    the password was being checked stays. Were the set emptied, a slow success ending
    after five failures had locked the name would empty it, and a login that had
    asked for the lock just before it was set would find no failures when it counts
    its check, and be checked: a sixth guess (on a cluster the two keys live on
    different nodes, and the two reads are never one step).

    Only the token's digest is stored; the token itself goes back to the caller.
    """
    token = secrets.token_urlsafe(TOKEN_BYTES)
    members = list(counted)
    if members:
        pipe.zrem(keys.login_failures(username), *members)
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


# A login's check in flight counts toward the lockout for this long at most: a
# worker killed while hashing leaves its attempts behind, and they must not lock the
# player out for the whole window. A bcrypt check takes well under a second.
CHECK_MAX_S = 10
_CHECKING, _FAILED = "c:", "f:"


@dataclass(frozen=True)
class Attempts:
    """The lockout's sorted set, read: requests whose check runs, and failed ones.

    Members are `c:<entry id>` and `f:<entry id>`: a request is its stream entry, whose
    id Redis chose, never its `request_id`, which a client could send again and again
    to have many failures counted as one."""

    checking: int
    failed: int

    @classmethod
    def of(cls, members: list[bytes] | list[str]) -> Attempts:
        """Counted by entry: a request served again (reclaimed) counts once."""
        names = [m.decode() if isinstance(m, bytes) else m for m in members]
        failed = {m[2:] for m in names if m.startswith(_FAILED)}
        checking = {m[2:] for m in names if m.startswith(_CHECKING)} - failed
        return cls(checking=len(checking), failed=len(failed))

    @property
    def locks(self) -> bool:
        return self.failed >= LOCKOUT_MAX_FAILURES

    @property
    def too_many_at_once(self) -> bool:
        """More checks than guesses left in the window: this one must wait its turn."""
        return self.checking + self.failed > LOCKOUT_MAX_FAILURES


def queue_attempt(pipe: Pipeline, keys: Keys, username: str, entry_id: str) -> None:
    """Count a login's check as running *before* the password is checked (four
    commands; the third's reply is the set, for `Attempts.of`).

    A check in flight counts like a failure, so logins sent side by side cannot all
    be checked before the first failure is counted: at most `LOCKOUT_MAX_FAILURES`
    guesses a window, however many run at once, on however many workers. It counts
    until its outcome (`record_failure` turns it into a failure, a success forgets what
    was counted beside it, `queue_session`) or for `CHECK_MAX_S`: its score is set so
    that the window's trim drops it then.
    """
    now = time.time()
    key = keys.login_failures(username)
    pipe.zremrangebyscore(key, "-inf", now - LOCKOUT_WINDOW_S)
    pipe.zadd(key, {_CHECKING + entry_id: now - LOCKOUT_WINDOW_S + CHECK_MAX_S})
    pipe.zrange(key, 0, -1)
    pipe.expire(key, LOCKOUT_WINDOW_S)


def forget_attempt(client: Redis, keys: Keys, username: str, entry_id: str) -> None:
    """A check that did not run (locked, or waiting its turn) counts nothing."""
    client.zrem(keys.login_failures(username), _CHECKING + entry_id)


def record_failure(client: Redis, keys: Keys, username: str, entry_id: str) -> bool:
    """A checked password was wrong: the failure that makes `LOCKOUT_MAX_FAILURES` in
    the window locks the username for `LOCKOUT_DURATION_S`. Returns whether it did.

    One transaction on one key (a cluster keeps it on one node): the check becomes a
    failure, and the failures are counted as they stand after it.
    """
    key = keys.login_failures(username)
    pipe = client.pipeline(transaction=True)
    pipe.zrem(key, _CHECKING + entry_id)
    pipe.zadd(key, {_FAILED + entry_id: time.time()})
    pipe.zrange(key, 0, -1)
    pipe.expire(key, LOCKOUT_WINDOW_S)
    if not Attempts.of(pipe.execute()[2]).locks:
        return False
    # The failures stay (they leave the window before the lock ends): a login that
    # asked for the lock just before it was set still finds them when it counts its
    # check (`queue_attempt`), and is refused. Deleted here, such a login found an
    # empty set and was checked: a sixth guess (on a cluster the two keys live on
    # different nodes, and the two reads are never one step).
    client.set(keys.login_lock(username), 1, ex=LOCKOUT_DURATION_S)
    return True
