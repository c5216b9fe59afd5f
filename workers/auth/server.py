"""The request/reply server's loop: reading `um:auth:requests` and serving each entry.

`AuthServer` reads requests up to its free worker slots, reclaims abandoned ones,
drops stale ones and runs the rest on the hashing pool (`pool.py`). One request is
parsed, answered by `Handlers` (`handlers.py`) and finished by `replies.finish`.
See docs/protocol.md, "Accounts".
"""

from __future__ import annotations

import functools
import threading
import time
from concurrent.futures import Future

import structlog
from redis.exceptions import ResponseError

from usermgmt.domain.auth import REQUEST_MAX_AGE_S, InvalidRequest, error_reply, parse_request
from usermgmt.domain.errors import ErrorCode, InvalidPayload
from usermgmt.persistence.keys import AUTH_GROUP
from usermgmt.workers.auth.handlers import Handlers
from usermgmt.workers.auth.pool import hashing_pool
from usermgmt.workers.auth.relay import Relay
from usermgmt.workers.auth.replies import finish, finishing
from usermgmt.workers.runtime.bootstrap import Services
from usermgmt.workers.runtime.connections import REDIS_ERRORS, redis_unreachable
from usermgmt.workers.runtime.metrics import NO_METRICS, Metrics
from usermgmt.workers.runtime.pending import claim_own, own_pending
from usermgmt.workers.runtime.streams import (
    Backoff,
    Entry,
    RedisClock,
    claim_idle,
    ensure_group,
    is_missing_group,
    keep_fresh,
    read_new,
)

log = structlog.get_logger("usermgmt.auth")

BLOCK_MS = 1_000
# How often the server looks for its own pending requests it does not hold (a read's
# lost reply): one XPENDING of its own entries.
TAKE_BACK_EVERY_S = 1.0


class AuthServer:
    """Consumes `um:auth:requests` in group `usermgmt-auth` and answers on reply keys.

    Requests run on a pool of `auth_concurrency` threads (`pool.hashing_pool`): bcrypt
    releases the GIL, so several logins hash at once and one slow request never stalls
    the others. With a `relay`, a registration is published before its reply.
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
        self.keys = services.keys
        self.redis = services.redis
        self.consumer = consumer
        self.stop = stop
        self.limit = services.settings.auth_concurrency
        # Up to twice as many requests in hand as threads: the next one is queued in the
        # pool when a thread frees up, so no thread waits for a read from Redis.
        self.depth = 2 * self.limit
        self.slots = threading.Semaphore(self.depth)
        self.pool = hashing_pool(self.limit, services.settings.auth_nice)
        self.backoff = Backoff()
        self.clock = RedisClock(self.redis)  # request ages, as Redis stamps entry ids
        self.last_claim = 0.0
        self.take_back_at = 0.0  # when to look for own pending requests not in hand
        self.retrying_crash = True  # those found first were left by a crash
        # Requests in hand are kept fresh this often, so no other worker reclaims them.
        self.fresh_every_s = services.settings.claim_idle_ms / 1000 / 3
        self.last_fresh = 0.0
        # Entry ids being served now, so a reclaim of a slow one does not run it twice.
        self.in_flight: set[str] = set()
        self.in_flight_lock = threading.Lock()
        self.log = log.bind(consumer=consumer, stream=self.keys.auth_requests)
        self.handlers = Handlers(services, self.log, relay)

    # -- the loop ------------------------------------------------------------------

    def run(self) -> None:
        """Serve until `stop` is set, then let in-flight requests finish."""
        self.log.info("auth consumer started", concurrency=self.limit)
        first = True
        while not self.stop.is_set():
            try:
                if first:
                    ensure_group(self.redis, self.keys.auth_requests, AUTH_GROUP)
                    self.take_back_at = 0.0  # a crash of this name may have left some
                    self.retrying_crash = True
                    first = False
                self.poll_once()
                self.backoff.recovered(self.log, "the auth consumer")
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
        """Take up to the free slots' worth of requests: this consumer's own left pending
        (`take_back`), then abandoned ones now and then (`claim_idle`), then new ones.

        No more are taken than can start at once: one waiting in hand for a slot would
        not be kept fresh, and another worker would take it over and answer it again.
        """
        self.keep_fresh()
        free = self.acquire_slots()
        if free == 0:
            return
        entries: list[Entry] = []
        try:
            entries += self.take_back(free)
            now = time.monotonic()
            claim_every = self.services.settings.claim_idle_ms / 1000 / 2
            if len(entries) < free and now - self.last_claim >= claim_every:
                self.last_claim = now
                entries += claim_idle(
                    self.redis,
                    self.keys.auth_requests,
                    AUTH_GROUP,
                    self.consumer,
                    self.services.settings.claim_idle_ms,
                    free - len(entries),
                )
            if len(entries) < free:
                block_ms = max(1, min(BLOCK_MS, int(self.fresh_every_s * 1000)))
                entries += read_new(
                    self.redis,
                    AUTH_GROUP,
                    self.consumer,
                    [self.keys.auth_requests],
                    free - len(entries),
                    None if entries else block_ms,
                )
        except BaseException:
            # A failed read must give its slots back, or the server never reads again;
            # what it took stays pending here, and is taken back.
            self.release_slots(free)
            raise
        self.release_slots(free - len(entries))
        self.dispatch(entries, slots_taken=True)

    def take_back(self, limit: int) -> list[Entry]:
        """Up to `limit` of this consumer's pending requests that it does not hold.

        A read whose reply was lost (the connection dropped after XREADGROUP ran, and
        redis-py read again) left them pending here, unseen: nobody else would take them
        for `claim_idle_ms`, and by then the client has given up. At start, what a
        crashed worker of the same name left (a retry, counted as a delivery). Looked for
        every `TAKE_BACK_EVERY_S`, and again at once while more are left than `limit`.
        """
        now = time.monotonic()
        if now < self.take_back_at:
            return []
        self.take_back_at = now + TAKE_BACK_EVERY_S
        with self.in_flight_lock:  # before the pending list: none can join it meanwhile
            in_hand = set(self.in_flight)
        stream = self.keys.auth_requests
        pending = own_pending(self.redis, stream, AUTH_GROUP, self.consumer)
        lost = [entry_id for entry_id in pending if entry_id not in in_hand]
        retry = self.retrying_crash
        if len(lost) > limit:
            self.take_back_at = now  # the rest as slots free up
        else:
            self.retrying_crash = False
        if not lost:
            return []
        why = "retrying requests a crash left pending" if retry else "took back unseen requests"
        self.log.info(why, count=len(lost[:limit]), left=len(lost[limit:]))
        return claim_own(self.redis, stream, AUTH_GROUP, self.consumer, lost[:limit], retry)

    def acquire_slots(self) -> int:
        """Take as many free worker slots as are available (at least one, or none on stop)."""
        while not self.slots.acquire(timeout=min(0.2, self.fresh_every_s)):
            if self.stop.is_set():
                return 0
            self.keep_fresh()  # every slot busy: the requests in hand are slow ones
        taken = 1
        while taken < self.depth and self.slots.acquire(blocking=False):
            taken += 1
        return taken

    def keep_fresh(self) -> None:
        """Reset the idle time of the requests in hand (XCLAIM JUSTID, every
        `claim_idle_ms / 3`): a slow request is busy, not abandoned, and another
        worker's reclaim must not serve it a second time (a second reply, a failed
        login counted twice). One another worker took anyway stays theirs."""
        now = time.monotonic()
        if now - self.last_fresh < self.fresh_every_s:
            return
        self.last_fresh = now
        with self.in_flight_lock:
            in_hand = sorted(self.in_flight)
        if not in_hand:
            return
        stream = self.keys.auth_requests
        gone = keep_fresh(self.redis, AUTH_GROUP, self.consumer, {stream: in_hand})
        # Not pending here: answered and acked meanwhile, or taken over (still pending).
        taken = [entry_id for entry_id in sorted(gone) if self._pending(entry_id)]
        if taken:
            self.log.warning(
                "requests in hand were taken over by another worker and may be answered "
                "twice; USERMGMT_CLAIM_IDLE_MS is shorter than this worker stalled",
                entry_ids=taken,
            )

    def _pending(self, entry_id: str) -> bool:
        stream = self.keys.auth_requests
        return bool(self.redis.xpending_range(stream, AUTH_GROUP, entry_id, entry_id, 1))

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
            finish(self.redis, self.keys, entry, reply=None)
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
        self.stop.wait(self.backoff.retry(self.log, message))

    # -- one request -----------------------------------------------------------------

    def serve(self, entry: Entry) -> None:
        """Answer one entry, then ack and delete it so no password stays in Redis."""
        started = time.perf_counter()
        try:
            request = parse_request(entry.payload)
        except InvalidPayload as exc:
            finish(self.redis, self.keys, entry, reply=None, dead=(str(exc.reason), exc.message))
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
            finish(self.redis, self.keys, entry, reply=(exc.request_id, reply))
            self.metrics.observe_auth("invalid", "invalid_request", time.perf_counter() - started)
            self.log.info(
                "request answered",
                entry_id=entry.entry_id,
                request_id=str(exc.request_id),
                outcome=ErrorCode.INVALID_REQUEST,
                duration_ms=_ms(started),
            )
            return
        except Exception as exc:  # a bug reading it: never a request failing for ever
            self.log.exception("request could not be read", entry_id=entry.entry_id)
            message = f"the request could not be read ({type(exc).__name__})"
            finish(self.redis, self.keys, entry, reply=None, dead=("invalid_request", message))
            self.metrics.observe_auth("unknown", "dead_lettered", time.perf_counter() - started)
            return
        # Commands a handler queues here run just before the reply is pushed, in the
        # same round trip (a login's token exists before its reply can be read).
        pipe = finishing(self.redis)
        reply = self.handlers.answer(request, pipe, entry.entry_id)
        try:
            finish(self.redis, self.keys, entry, reply=(request.request_id, reply), pipe=pipe)
        except TypeError as exc:  # orjson refused the reply (a bug): still one reply
            self.log.exception("reply could not be encoded", op=request.op, error=repr(exc))
            reply = error_reply(
                request.request_id, ErrorCode.INTERNAL, "the request could not be served"
            )
            finish(self.redis, self.keys, entry, reply=(request.request_id, reply))
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


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 2)
