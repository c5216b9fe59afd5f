"""The simulated players: their names, their password, and registering their accounts.

Accounts are created through the real request/reply stream, so a simulation also
exercises the auth server (and finds out early when no worker is running).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from usermgmt.domain.accounts import PASSWORD_MAX_BYTES, PASSWORD_MIN_BYTES
from usermgmt.domain.errors import ErrorCode
from usermgmt.workers.client.auth import AuthClient, AuthError, AuthTimeout


def player_names(count: int, prefix: str = "player") -> list[str]:
    """`player0001`, `player0002`, …: the same names every run, so a re-run reuses them."""
    return [player_name(number, count, prefix) for number in range(1, count + 1)]


def player_name(number: int, count: int, prefix: str = "player") -> str:
    """The name of player `number` (from 1) out of `count`."""
    return f"{prefix}{number:0{max(4, len(str(count)))}d}"


@dataclass(frozen=True)
class Registered:
    """How many accounts a run created, how many already existed, and how long it took."""

    created: int
    existing: int
    elapsed: float


class NoWorker(Exception):
    """Nothing answered the first registration: no worker serves the auth stream."""


def check_password(password: str) -> str | None:
    """Why `password` cannot be used for the simulated accounts, or None."""
    size = len(password.encode("utf-8"))
    if PASSWORD_MIN_BYTES <= size <= PASSWORD_MAX_BYTES:
        return None
    return f"--password must be {PASSWORD_MIN_BYTES}-{PASSWORD_MAX_BYTES} bytes of UTF-8"


def register_players(
    client: AuthClient,
    names: Sequence[str],
    password: str,
    concurrency: int = 16,
    on_done: Callable[[int], None] | None = None,
    first_timeout: float = 10.0,
) -> Registered:
    """Register every name through the request/reply stream; `username_taken` counts
    as already registered, so a simulation can run again with the same players.

    The first request goes alone, so a missing worker is reported after one timeout
    rather than once per player. The rest run `concurrency` at a time, enough to
    keep the worker's bcrypt threads busy without queueing past the reply timeout.
    """
    started = time.perf_counter()

    def one(name: str, timeout: float | None = None) -> bool:
        try:
            client.call("register", timeout=timeout, username=name, password=password)
        except AuthError as exc:
            if exc.code != ErrorCode.USERNAME_TAKEN:
                raise
            return False
        return True

    if not names:
        return Registered(0, 0, 0.0)
    try:
        first = one(names[0], first_timeout)
    except AuthTimeout:
        raise NoWorker(
            f"no reply on {client.keys.auth_requests} within {first_timeout:g} s; "
            "start `usermgmt worker` (same USERMGMT_REDIS_URL and USERMGMT_KEY_PREFIX) first"
        ) from None
    created = int(first)
    done = 1
    if on_done is not None:
        on_done(done)
    pool = ThreadPoolExecutor(max_workers=max(1, concurrency))
    try:
        for made in pool.map(one, names[1:]):
            created += made
            done += 1
            if on_done is not None:
                on_done(done)
    finally:
        # Interrupted (Ctrl-C, which stops the worker too): the requests in flight would
        # each wait out their reply timeout; nobody waits for them.
        pool.shutdown(wait=False, cancel_futures=True)
    return Registered(created, len(names) - created, time.perf_counter() - started)
