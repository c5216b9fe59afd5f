"""The request/reply server: register, login, get_user and verify_token.

See docs/protocol.md, "Accounts".
"""

from __future__ import annotations

import functools
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import bcrypt
import orjson
import structlog
from redis.client import Pipeline
from redis.exceptions import ResponseError

from usermgmt.domain.auth import (
    REPLY_TTL_S,
    REQUEST_MAX_AGE_S,
    AuthRequest,
    GetUserRequest,
    InvalidRequest,
    LoginRequest,
    RegisterRequest,
    UserView,
    VerifyTokenRequest,
    error_reply,
    ok_reply,
    parse_request,
    redact,
)
from usermgmt.domain.errors import ErrorCode, InvalidPayload
from usermgmt.persistence import accounts, auth_store, cache
from usermgmt.persistence.keys import AUTH_GROUP
from usermgmt.workers.auth.relay import Relay
from usermgmt.workers.runtime.bootstrap import Services
from usermgmt.workers.runtime.connections import (
    DATABASE_ERRORS,
    REDIS_ERRORS,
    database_unreachable,
    redis_unreachable,
)
from usermgmt.workers.runtime.metrics import NO_METRICS, Metrics
from usermgmt.workers.runtime.streams import (
    Backoff,
    Entry,
    RedisClock,
    claim_idle,
    dead_letter,
    ensure_group,
    is_missing_group,
    read_history,
    to_entries,
)

log = structlog.get_logger("usermgmt.auth")

BLOCK_MS = 1_000


class AuthServer:
    """Consumes `um:auth:requests` in group `usermgmt-auth` and answers on reply keys.

    Requests run on a pool of `auth_concurrency` threads: bcrypt releases the GIL, so
    several logins hash at once and one slow request never stalls the others.
    """

    def __init__(
        self,
        services: Services,
        consumer: str,
        stop: threading.Event,
        metrics: Metrics = NO_METRICS,
        relay: Relay | None = None,
    ) -> None:
        self.services = services
        self.metrics = metrics
        self.relay = relay
        self.keys = services.keys
        self.redis = services.redis
        self.consumer = consumer
        self.stop = stop
        self.limit = services.settings.auth_concurrency
        # Up to twice as many requests in hand as threads: the next one is queued in the
        # pool when a thread frees up, so no thread waits for a read from Redis.
        self.depth = 2 * self.limit
        self.slots = threading.Semaphore(self.depth)
        self.pool = ThreadPoolExecutor(
            self.limit,
            thread_name_prefix="auth",
            initializer=_lower_priority,
            initargs=(services.settings.auth_nice,),
        )
        self.backoff = Backoff()
        self.clock = RedisClock(self.redis)  # request ages, as Redis stamps entry ids
        self.rounds = services.settings.bcrypt_rounds
        # Unknown users are checked against this hash so both failures cost one bcrypt.
        self.dummy_hash = bcrypt.hashpw(b"usermgmt-timing-equaliser", bcrypt.gensalt(self.rounds))
        self.last_claim = 0.0
        # Entry ids being served now, so a reclaim of a slow one does not run it twice.
        self.in_flight: set[str] = set()
        self.in_flight_lock = threading.Lock()
        self.log = log.bind(consumer=consumer, stream=self.keys.auth_requests)

    # -- the loop ------------------------------------------------------------------

    def run(self) -> None:
        """Serve until `stop` is set, then let in-flight requests finish."""
        self.log.info("auth consumer started", concurrency=self.limit)
        first = True
        while not self.stop.is_set():
            try:
                if first:
                    ensure_group(self.redis, self.keys.auth_requests, AUTH_GROUP)
                    self.dispatch(
                        read_history(
                            self.redis, [self.keys.auth_requests], AUTH_GROUP, self.consumer, 1000
                        )
                    )
                    first = False
                self.poll_once()
                self.backoff.reset()
            except REDIS_ERRORS as exc:
                self.wait_backoff(redis_unreachable(self.services.settings.redis_url, exc))
            except ResponseError as exc:
                if not is_missing_group(exc):
                    raise
                self.log.warning("consumer group missing; recreating it")
                first = True
        self.pool.shutdown(wait=True)
        self.log.info("auth consumer stopped")

    def poll_once(self) -> None:
        """Claim abandoned requests now and then, else read new ones up to the free slots."""
        now = time.monotonic()
        claim_every = self.services.settings.claim_idle_ms / 1000 / 2
        if now - self.last_claim >= claim_every:
            self.last_claim = now
            self.dispatch(
                claim_idle(
                    self.redis,
                    self.keys.auth_requests,
                    AUTH_GROUP,
                    self.consumer,
                    self.services.settings.claim_idle_ms,
                    100,
                )
            )
        free = self.acquire_slots()
        if free == 0:
            return
        try:
            response = self.redis.xreadgroup(
                AUTH_GROUP,
                self.consumer,
                {self.keys.auth_requests: ">"},
                count=free,
                block=BLOCK_MS,
            )
            entries = to_entries(response)
        except BaseException:
            # A failed read must give its slots back, or the server never reads again.
            self.release_slots(free)
            raise
        self.release_slots(free - len(entries))
        self.dispatch(entries, slots_taken=True)

    def acquire_slots(self) -> int:
        """Take as many free worker slots as are available (at least one, or none on stop)."""
        while not self.slots.acquire(timeout=0.2):
            if self.stop.is_set():
                return 0
        taken = 1
        while taken < self.depth and self.slots.acquire(blocking=False):
            taken += 1
        return taken

    def release_slots(self, count: int) -> None:
        for _ in range(count):
            self.slots.release()

    def dispatch(self, entries: list[Entry], slots_taken: bool = False) -> None:
        """Hand entries to the pool; stale ones are dropped without an answer.

        With `slots_taken` the caller holds one slot per entry. Every slot that does not
        go to a running request is given back, also when Redis fails half-way (the
        entries left stay pending and are reclaimed later).
        """
        unused = len(entries) if slots_taken else 0
        try:
            now_ms = self.clock.now_ms() if entries else 0
            for entry in entries:
                if slots_taken:
                    unused -= 1
                with self.in_flight_lock:
                    busy = entry.entry_id in self.in_flight
                if busy:
                    # Reclaimed while still being served here: slow, not abandoned.
                    if slots_taken:
                        self.slots.release()
                    continue
                if not slots_taken:
                    self.slots.acquire()
                try:
                    self.start(entry, now_ms)
                except BaseException:
                    self.slots.release()
                    raise
        finally:
            self.release_slots(unused)

    def start(self, entry: Entry, now_ms: int) -> None:
        """Serve one entry on the pool (it holds a slot), or drop it when stale."""
        if now_ms - entry.timestamp_ms > REQUEST_MAX_AGE_S * 1000:
            self.finish(entry, reply=None)
            self.metrics.observe_auth("unknown", "stale", 0.0)
            self.log.info(
                "request dropped as stale",
                entry_id=entry.entry_id,
                age_ms=now_ms - entry.timestamp_ms,
            )
            self.slots.release()
            return
        with self.in_flight_lock:
            self.in_flight.add(entry.entry_id)
        future = self.pool.submit(self.serve, entry)
        future.add_done_callback(functools.partial(self._release, entry.entry_id))

    def _release(self, entry_id: str, future: Future[None]) -> None:
        with self.in_flight_lock:
            self.in_flight.discard(entry_id)
        self.slots.release()
        if (exc := future.exception()) is not None:
            self.log.error("request handler failed", error=repr(exc))

    def wait_backoff(self, message: str) -> None:
        delay = self.backoff.next_delay()
        self.log.error(message, retry_in_s=round(delay, 2))
        self.stop.wait(delay)

    # -- one request -----------------------------------------------------------------

    def serve(self, entry: Entry) -> None:
        """Answer one entry, then ack and delete it so no password stays in Redis."""
        started = time.perf_counter()
        try:
            request = parse_request(entry.payload)
        except InvalidPayload as exc:
            self.finish(entry, reply=None, dead=(str(exc.reason), exc.message))
            self.metrics.observe_auth("unknown", "dead_lettered", time.perf_counter() - started)
            self.log.warning(
                "request dead-lettered",
                entry_id=entry.entry_id,
                reason=str(exc.reason),
                error=exc.message,
            )
            return
        except InvalidRequest as exc:
            reply = error_reply(exc.request_id, ErrorCode.INVALID_REQUEST, exc.message)
            self.finish(entry, reply=(exc.request_id, reply))
            self.metrics.observe_auth("invalid", "invalid_request", time.perf_counter() - started)
            self.log.info(
                "request answered",
                entry_id=entry.entry_id,
                request_id=str(exc.request_id),
                outcome=ErrorCode.INVALID_REQUEST,
                duration_ms=_ms(started),
            )
            return
        # Commands a handler queues here run just before the reply is pushed, in the
        # same round trip (a login's token exists before its reply can be read).
        pipe = self.redis.pipeline(transaction=False)
        reply = self.answer(request, pipe)
        self.finish(entry, reply=(request.request_id, reply), pipe=pipe)
        outcome = "ok" if reply["ok"] else reply["error"]["code"]
        self.metrics.observe_auth(request.op, outcome, time.perf_counter() - started)
        self.log.info(
            "request answered",
            entry_id=entry.entry_id,
            request_id=str(request.request_id),
            op=request.op,
            outcome=outcome,
            duration_ms=_ms(started),
        )

    def answer(self, request: AuthRequest, pipe: Pipeline) -> dict[str, Any]:
        """The reply to a valid request; database trouble becomes an `internal` error."""
        try:
            match request:
                case RegisterRequest():
                    return self.register(request)
                case LoginRequest():
                    return self.login(request, pipe)
                case GetUserRequest():
                    return self.get_user(request)
                case VerifyTokenRequest():
                    return self.verify_token(request)
        except DATABASE_ERRORS as exc:
            self.log.error(database_unreachable(self.services.settings.database_url, exc))
        except REDIS_ERRORS:
            raise
        except Exception as exc:  # a bug must not kill the server; the client gets told
            self.log.exception("request failed", op=request.op, error=repr(exc))
        return error_reply(
            request.request_id, ErrorCode.INTERNAL, "the request could not be served"
        )

    def register(self, request: RegisterRequest) -> dict[str, Any]:
        settings = self.services.settings
        if accounts.find_credentials(self.services.engine, request.username) is not None:
            return self._taken(request)
        password_hash = bcrypt.hashpw(request.password.encode(), bcrypt.gensalt(self.rounds))
        try:
            user = accounts.create_user(
                self.services.engine,
                request.username,
                password_hash.decode(),
                settings.starting_wallet,
            )
        except accounts.UsernameTaken:
            return self._taken(request)
        if self.relay is not None:
            # The accounts entry goes out before the reply, so any event a client
            # publishes about the new player comes after it in entry-id order.
            self.relay.publish_quietly()
        pipe = self.redis.pipeline(transaction=False)
        cache.write_user(pipe, self.keys, user, settings.user_cache_ttl)
        cache.set_leaderboard_scores(pipe, self.keys, {user.username: 0})
        pipe.execute()
        return ok_reply(request.request_id, self.with_live_rank(user))

    def _taken(self, request: RegisterRequest) -> dict[str, Any]:
        return error_reply(
            request.request_id,
            ErrorCode.USERNAME_TAKEN,
            f"the username {request.username!r} is taken",
        )

    def login(self, request: LoginRequest, pipe: Pipeline) -> dict[str, Any]:
        """Two Redis round trips besides bcrypt: the lock and the live rank before it,
        the token with the reply after it (`pipe`)."""
        found = accounts.find_login(self.services.engine, request.username)
        check = self.redis.pipeline(transaction=False)
        auth_store.queue_is_locked(check, self.keys, request.username)
        if found is not None:
            cache.queue_live_rank(check, self.keys, found[1].username, found[1].earnings)
        checked = check.execute()
        if checked[0]:
            return error_reply(
                request.request_id,
                ErrorCode.LOCKED,
                "too many failed logins; try again in 15 minutes",
            )
        stored = found[0].encode() if found else self.dummy_hash
        matches = bcrypt.checkpw(request.password.encode(), stored)
        if found is None or not matches:
            auth_store.record_failure(self.redis, self.keys, request.username)
            return error_reply(
                request.request_id,
                ErrorCode.INVALID_CREDENTIALS,
                "unknown username or wrong password",
            )
        user = found[1]
        token = auth_store.queue_session(pipe, self.keys, request.username, user.id)
        rank = cache.live_rank_reply(self.redis, self.keys, user.username, user.earnings, checked)
        return ok_reply(request.request_id, _with_rank(user, rank), token=token)

    def get_user(self, request: GetUserRequest) -> dict[str, Any]:
        user = cache.read_user(self.redis, self.keys, request.username)
        if user is None:
            user = accounts.load_user(self.services.engine, username=request.username)
            if user is None:
                return error_reply(
                    request.request_id, ErrorCode.NOT_FOUND, f"no user named {request.username!r}"
                )
            pipe = self.redis.pipeline(transaction=False)
            cache.write_user(pipe, self.keys, user, self.services.settings.user_cache_ttl)
            pipe.execute()
        return ok_reply(request.request_id, self.with_live_rank(user))

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

    # -- acknowledging ---------------------------------------------------------------

    def finish(
        self,
        entry: Entry,
        reply: tuple[Any, dict[str, Any]] | None,
        dead: tuple[str, str] | None = None,
        pipe: Pipeline | None = None,
    ) -> None:
        """Reply (or dead-letter), then ack and delete the entry, in one round trip.

        `pipe` may already hold commands that must run before the reply is pushed.
        """
        if pipe is None:
            pipe = self.redis.pipeline(transaction=False)
        if reply is not None:
            request_id, body = reply
            key = self.keys.reply(request_id)
            pipe.lpush(key, orjson.dumps(body))
            pipe.expire(key, REPLY_TTL_S)
        if dead is not None:
            reason, message = dead
            dead_letter(
                pipe,
                self.keys.dlq,
                entry,
                reason,
                message,
                payload_text=_redacted_text(entry.payload),
            )
        pipe.xack(entry.stream, AUTH_GROUP, entry.entry_id)
        pipe.xdel(entry.stream, entry.entry_id)
        pipe.execute()


def _lower_priority(nice: int) -> None:
    """Run this auth thread at a lower CPU priority than the event consumer.

    bcrypt keeps a core busy for its whole cost; on a small machine a login flood
    would otherwise starve the event thread. Linux applies nice per thread; elsewhere
    this does nothing.
    """
    if nice <= 0 or not hasattr(os, "setpriority"):
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except OSError:
        log.warning("could not lower the priority of an auth thread", nice=nice)


def _with_rank(user: UserView, rank: int | None) -> UserView:
    """`user` with the leaderboard's live rank (the database's when the set lacks it)."""
    return user if rank is None else user.model_copy(update={"rank": rank})


def _redacted_text(payload: bytes | None) -> str:
    """The payload without any password or token, for a dead letter."""
    if payload is None:
        return ""
    try:
        return orjson.dumps(redact(orjson.loads(payload))).decode()
    except orjson.JSONDecodeError:
        # Not JSON: keep it only if it cannot hide a secret.
        text = payload.decode("utf-8", "replace")
        lowered = text.lower()
        if "password" in lowered or "token" in lowered:
            return "[not JSON; withheld because it may contain a secret]"
        return text[:4096]


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 2)
