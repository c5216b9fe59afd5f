"""The outbox relay: publishes committed registrations on `um:{events}:accounts`.

Two callers share one `Relay`:
- the auth server, right after a registration commits and before it replies, so the
  accounts entry precedes (by entry id) every event a client publishes about the new
  player — a replay in entry-id order then never meets a player before their account;
- a background thread, every second, for rows left behind (a crash between the
  commit and the publish, Redis away for a moment, users created outside the auth
  server).

Across processes, one relay publishes at a time (a short Redis lock,
`um:{events}:accounts-relay`): two workers' relays would otherwise read the same
unpublished rows and both send them. Delivery is still at least once: a crash between
the XADD and the marking publishes a row again on the next pass, and a lock held past
`LOCK_WAIT_S` is not waited for. Replay recognises a copy (same event id and user id).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

import structlog
from redis.exceptions import RedisError

from usermgmt.domain.payloads import text_of
from usermgmt.persistence import outbox
from usermgmt.workers.runtime.backoff import Backoff
from usermgmt.workers.runtime.bootstrap import Services
from usermgmt.workers.runtime.connections import (
    DATABASE_ERRORS,
    REDIS_ERRORS,
    database_unreachable,
    redis_unreachable,
)

log = structlog.get_logger("usermgmt.relay")

RELAY_INTERVAL_S = 1.0
RELAY_BATCH = 500
LOCK_TTL_MS = 5_000  # a relay that dies holding the lock holds it this long at most
LOCK_WAIT_S = 5.0


class Relay:
    """Publishes unpublished outbox rows in id order, then marks them published."""

    def __init__(
        self,
        services: Services,
        stop: threading.Event,
        interval_s: float = RELAY_INTERVAL_S,
        batch: int = RELAY_BATCH,
    ) -> None:
        self.services = services
        self.stop = stop
        self.interval_s = interval_s
        self.batch = batch
        self.lock = threading.Lock()  # one publisher per process keeps id order
        self.published = 0
        self.backoff = Backoff()

    def run(self) -> None:
        """Publish leftovers every `interval_s` until `stop`; one last pass on the way out."""
        log.info("outbox relay started", interval_s=self.interval_s)
        while not self.stop.is_set():
            delay = self.interval_s
            try:
                if count := self.publish_pending():
                    log.info("outbox rows published by the relay pass", count=count)
                self.backoff.recovered(log, "the outbox relay")
            except REDIS_ERRORS as exc:
                delay = self.backoff.retry(
                    log, redis_unreachable(self.services.settings.redis_url, exc)
                )
            except DATABASE_ERRORS as exc:
                delay = self.backoff.retry(
                    log, database_unreachable(self.services.settings.database_url, exc)
                )
            except RedisError as exc:  # refused by Redis (an ACL): try again later
                delay = self.backoff.retry(log, "Redis refused the outbox publish", error=str(exc))
            self.stop.wait(delay)
        self.publish_quietly()
        log.info("outbox relay stopped", published=self.published)

    def publish_quietly(self) -> int:
        """`publish_pending` for callers that must not fail: trouble is logged, and the
        background pass publishes the rows later."""
        try:
            return self.publish_pending()
        except (RedisError, *REDIS_ERRORS, *DATABASE_ERRORS) as exc:
            log.warning("outbox rows left for the next relay pass", error=repr(exc))
            return 0

    def publish_pending(self) -> int:
        """XADD every unpublished row (oldest first) and mark it; returns how many."""
        engine, redis, keys = self.services.engine, self.services.redis, self.services.keys
        total = 0
        with self.lock, self.one_publisher():
            while True:
                rows = outbox.unpublished(engine, self.batch)
                if not rows:
                    break
                pipe = redis.pipeline(transaction=False)
                for row in rows:
                    pipe.xadd(keys.event_stream(row.kind), {"payload": row.payload})
                entry_ids = [text_of(entry_id) for entry_id in pipe.execute()]
                checkpoints = {
                    keys.event_stream(row.kind): entry_id
                    for row, entry_id in zip(rows, entry_ids, strict=True)
                }
                outbox.mark_published(
                    engine,
                    [(row.id, entry_id) for row, entry_id in zip(rows, entry_ids, strict=True)],
                    checkpoints,
                    datetime.now(UTC),
                )
                total += len(rows)
                if len(rows) < self.batch:
                    break
        self.published += total
        return total

    @contextmanager
    def one_publisher(self) -> Iterator[None]:
        """Hold the relay lock shared by every worker (waiting up to `LOCK_WAIT_S`)."""
        redis, key = self.services.redis, self.services.keys.accounts_relay
        token = os.urandom(8).hex()
        deadline = time.monotonic() + LOCK_WAIT_S
        while not redis.set(key, token, nx=True, px=LOCK_TTL_MS):
            if time.monotonic() > deadline:
                log.warning("the outbox relay lock is held too long; publishing anyway")
                break
            time.sleep(0.005)
        try:
            yield
        finally:
            if redis.get(key) == token.encode():
                redis.delete(key)
