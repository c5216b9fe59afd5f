"""The four account operations: register, login, get_user and verify_token.

`Handlers.answer` turns a valid request into its reply body. Database trouble and
bugs become an `internal` error for the client; a Redis failure is raised, for the
server's loop to back off. See docs/protocol.md, "Accounts".
"""

from __future__ import annotations

import random
import threading
import time
from typing import Any, Generic, TypeVar

import bcrypt
from redis.client import Pipeline
from redis.exceptions import WatchError
from structlog.typing import FilteringBoundLogger

from usermgmt.domain.auth import (
    REQUEST_MAX_AGE_S,
    AuthRequest,
    GetUserRequest,
    LoginRequest,
    RegisterRequest,
    UserView,
    VerifyTokenRequest,
    error_reply,
    ok_reply,
)
from usermgmt.domain.errors import ErrorCode
from usermgmt.persistence import accounts, auth_store, cache
from usermgmt.persistence.command_batch import WrongType
from usermgmt.workers.auth.relay import Relay
from usermgmt.workers.runtime.backoff import Backoff
from usermgmt.workers.runtime.bootstrap import Services
from usermgmt.workers.runtime.connections import (
    DATABASE_ERRORS,
    REDIS_ERRORS,
    database_unreachable,
)

# How often a login waiting for the checks before it (`Handlers.begin_check`) looks
# again, give or take half, so that logins waiting side by side do not move in step.
TURN_POLL_S = 0.05
T = TypeVar("T")


class Recent(Generic[T]):
    """Values by key for `max_age_s`, thread-safe; older ones are dropped as new come."""

    def __init__(self, max_age_s: float) -> None:
        self.max_age_s = max_age_s
        self.items: dict[str, tuple[float, T]] = {}
        self.lock = threading.Lock()

    def put(self, key: str, value: T) -> None:
        now = time.monotonic()
        with self.lock:
            self.items = {k: v for k, v in self.items.items() if now - v[0] < self.max_age_s}
            self.items[key] = (now, value)

    def get(self, key: str) -> T | None:
        with self.lock:
            found = self.items.get(key)
        if found is None or time.monotonic() - found[0] >= self.max_age_s:
            return None
        return found[1]


class Handlers:
    """Answers requests from the database and the Redis caches; thread-safe.

    With a `relay`, a registration's accounts entry is published (the outbox) before
    its reply is sent.
    """

    def __init__(
        self, services: Services, log: FilteringBoundLogger, relay: Relay | None = None
    ) -> None:
        self.services = services
        self.log = log
        self.relay = relay
        self.keys = services.keys
        self.redis = services.redis
        self.rounds = services.settings.bcrypt_rounds
        self.registered = Recent[UserView](REQUEST_MAX_AGE_S * 2)  # see `register`
        self.outage = Backoff()  # only its logging: a request is answered at once
        self.outage_lock = threading.Lock()  # requests are served on several threads
        # Unknown users are checked against this hash so both failures cost one bcrypt.
        self.dummy_hash = bcrypt.hashpw(b"usermgmt-timing-equaliser", bcrypt.gensalt(self.rounds))

    def answer(self, request: AuthRequest, pipe: Pipeline, entry_id: str) -> dict[str, Any]:
        """The reply to a valid request; database trouble becomes an `internal` error.

        Commands a handler queues on `pipe` must run just before the reply is pushed.
        `entry_id`: the request's stream entry id. What must count a request once, however
        often it is served (a failed login, a registration made), is keyed by it: Redis
        gives each entry its own, where a client may send one `request_id` many times.
        """
        try:
            match request:
                case RegisterRequest():
                    reply = self.register(request, entry_id)
                case LoginRequest():
                    reply = self.login(request, pipe, entry_id)
                case GetUserRequest():
                    reply = self.get_user(request)
                case VerifyTokenRequest():
                    reply = self.verify_token(request)
            if self.outage.since is not None:
                with self.outage_lock:
                    self.outage.recovered(self.log, "the auth consumer's database")
            return reply
        except DATABASE_ERRORS as exc:
            # Said once, then once a minute, as every outage is (not once a request).
            with self.outage_lock:
                self.outage.retry(
                    self.log, database_unreachable(self.services.settings.database_url, exc)
                )
        except REDIS_ERRORS:
            raise
        except Exception as exc:  # a bug must not kill the server; the client gets told
            self.log.exception("request failed", op=request.op, error=repr(exc))
        return error_reply(
            request.request_id, ErrorCode.INTERNAL, "the request could not be served"
        )

    def register(self, request: RegisterRequest, entry_id: str) -> dict[str, Any]:
        """Create the account, then its caches; the reply carries the live rank.

        Redis may fail after the account is committed (at its memory limit, a dropped
        connection): the request stays pending and this worker serves it again within a
        second (`AuthServer.take_back`). The account it created then is remembered by
        entry id (`registered`), so that second pass answers it as created rather than
        `username_taken`.
        """
        settings = self.services.settings
        user = self.registered.get(entry_id)
        if user is None:
            if accounts.find_credentials(self.services.engine, request.username) is not None:
                return self._taken(request)
            password = request.password.encode()
            password_hash = bcrypt.hashpw(password, bcrypt.gensalt(self.rounds))
            try:
                user = accounts.create_user(
                    self.services.engine,
                    request.username,
                    password_hash.decode(),
                    settings.starting_wallet,
                )
            except accounts.UsernameTaken:
                return self._taken(request)
            self.registered.put(entry_id, user)
        if self.relay is not None:
            # The accounts entry goes out before the reply, so any event a client
            # publishes about the new player comes after it in entry-id order.
            self.relay.publish_quietly()
        # Cached as `get_user` fills a miss: a game applied for the new player since the
        # commit (a producer that did not wait for this reply; a second pass) wrote a
        # newer hash, which stays.
        user = self.fill_user(request.username) or user
        batch = cache.CommandBatch()
        cache.queue_leaderboard_scores(batch, self.keys, {user.username: 0})
        try:
            batch.send(self.redis).wait()
        except WrongType as exc:  # the account exists: a cache is no reason to fail it
            self.log.error("a cache key holds another type of value", error=str(exc))
        return ok_reply(request.request_id, self.with_live_rank(user))

    def _taken(self, request: RegisterRequest) -> dict[str, Any]:
        return error_reply(
            request.request_id,
            ErrorCode.USERNAME_TAKEN,
            f"the username {request.username!r} is taken",
        )

    def login(self, request: LoginRequest, pipe: Pipeline, entry_id: str) -> dict[str, Any]:
        """Two Redis round trips besides bcrypt, as a rule: the lock, the check's count
        and the live rank before it, the token with the reply after it (`pipe`)."""
        found = accounts.find_login(self.services.engine, request.username)
        checked = self.begin_check(request.username, entry_id, found)
        if checked is None:
            return error_reply(
                request.request_id,
                ErrorCode.LOCKED,
                "too many failed logins; try again in 15 minutes",
            )
        stored = found[0].encode() if found else self.dummy_hash
        matches = bcrypt.checkpw(request.password.encode(), stored)
        if found is None or not matches:
            auth_store.record_failure(self.redis, self.keys, request.username, entry_id)
            return error_reply(
                request.request_id,
                ErrorCode.INVALID_CREDENTIALS,
                "unknown username or wrong password",
            )
        user = found[1]
        if hash_cost(found[0]) != self.rounds:
            self.upgrade_hash(user, found[0], request.password)
        token = auth_store.queue_session(pipe, self.keys, request.username, user.id, checked[3])
        rank = cache.live_rank_reply(self.redis, self.keys, user.username, user.earnings, checked)
        return ok_reply(request.request_id, _with_rank(user, rank), token=token)

    def upgrade_hash(self, user: UserView, stored: str, password: str) -> None:
        """Hash a password again at `USERMGMT_BCRYPT_ROUNDS` once it has been checked
        against a hash of another cost (the setting changed since the account was made):
        otherwise a login's time tells such accounts from unknown names, which are
        checked against a hash of today's cost. A failure only leaves the old hash."""
        new_hash = bcrypt.hashpw(password.encode(), bcrypt.gensalt(self.rounds)).decode()
        try:
            upgraded = accounts.replace_password_hash(
                self.services.engine, user.id, stored, new_hash
            )
        except DATABASE_ERRORS as exc:
            self.log.warning("a password hash could not be upgraded", error=repr(exc))
            return
        if upgraded:
            self.log.info(
                "password hash upgraded", user_id=user.id, cost=hash_cost(stored), to=self.rounds
            )

    def begin_check(
        self, username: str, entry_id: str, found: tuple[str, UserView] | None
    ) -> list[Any] | None:
        """Count this login's check as running; None when the username is locked.

        When as many checks already run as guesses are left in the window (logins sent
        side by side), this one waits for their outcome: a failure may lock the name,
        a success clears the count. It never waits longer than a check may count
        (`auth_store.CHECK_MAX_S`). Returns the pipeline's replies (the live rank's too).
        """
        deadline = time.monotonic() + auth_store.CHECK_MAX_S + 1  # theirs end by then
        while True:
            check = self.redis.pipeline(transaction=False)
            auth_store.queue_is_locked(check, self.keys, username)
            auth_store.queue_attempt(check, self.keys, username, entry_id)
            if found is not None:
                cache.queue_live_rank(check, self.keys, found[1].username, found[1].earnings)
            # The rank's replies may be an error (a leaderboard key of another type):
            # the database's rank is answered then. The lockout's are raised.
            checked = check.execute(raise_on_error=False)
            for reply in checked[:5]:
                if isinstance(reply, Exception):
                    raise reply
            attempts = auth_store.Attempts.of(checked[3])
            if not (checked[0] or attempts.locks or attempts.too_many_at_once):
                return checked
            auth_store.forget_attempt(self.redis, self.keys, username, entry_id)
            if checked[0] or attempts.locks or time.monotonic() > deadline:
                return None
            time.sleep(random.uniform(0.5, 1.5) * TURN_POLL_S)

    def get_user(self, request: GetUserRequest) -> dict[str, Any]:
        user = cache.read_user(self.redis, self.keys, request.username)
        if user is None:
            user = self.fill_user(request.username)
            if user is None:
                return error_reply(
                    request.request_id, ErrorCode.NOT_FOUND, f"no user named {request.username!r}"
                )
        return ok_reply(request.request_id, self.with_live_rank(user))

    def fill_user(self, username: str) -> UserView | None:
        """A user missed in the cache, read from SQL and cached (None if there is none).

        The hash is watched before the account is read: a game committed after the read
        writes the hash after its commit, and such a newer hash makes the fill a no-op
        (WATCH, then MULTI/EXEC on one key) rather than being overwritten with the
        older record for the whole TTL.
        """
        with self.redis.pipeline(transaction=True) as fill:
            fill.watch(self.keys.user(username))  # type: ignore[no-untyped-call]
            user = accounts.load_user(self.services.engine, username=username)
            if user is None:
                return None
            fill.multi()
            cache.queue_user_whole(fill, self.keys, user, self.services.settings.user_cache_ttl)
            try:
                fill.execute()
            except WatchError:
                pass  # a newer hash was written meanwhile: it stays
        return user

    def verify_token(self, request: VerifyTokenRequest) -> dict[str, Any]:
        user_id = auth_store.resolve_token(self.redis, self.keys, request.token)
        user = accounts.load_user(self.services.engine, user_id=user_id) if user_id else None
        if user is None:
            return error_reply(
                request.request_id, ErrorCode.INVALID_TOKEN, "the token is unknown or expired"
            )
        return ok_reply(request.request_id, self.with_live_rank(user))

    def with_live_rank(self, user: UserView) -> UserView:
        """The user with the rank the leaderboard sorted set gives right now."""
        return _with_rank(user, cache.live_rank(self.redis, self.keys, user.username))


def hash_cost(password_hash: str) -> int | None:
    """The cost (log2 rounds) of a bcrypt hash (`$2b$12$...`); None if it names none."""
    parts = password_hash.split("$")
    return int(parts[2]) if len(parts) > 3 and parts[2].isdigit() else None


def _with_rank(user: UserView, rank: int | None) -> UserView:
    """`user` with the leaderboard's live rank (the database's when the set lacks it)."""
    return user if rank is None else user.model_copy(update={"rank": rank})
