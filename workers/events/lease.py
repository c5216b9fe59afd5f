"""Which event worker reads new entries: one at a time, the others stand by.

Decisions are serial by contract (a later entry may depend on any earlier one, and on
PostgreSQL each batch holds an advisory lock), so several workers reading at once
only hand entries back and forth: measured, two workers drained a backlog at 0.56x
and four at 0.37x of one worker's rate. The lease keeps one reader and makes the
others hot standbys that take over within `ttl` of the reader's death.

The lease is an optimisation, never a guard: two workers that both believe they hold
it (a paused reader outliving its ttl) still decide every entry once, in order,
through the consumer group and the tables. So a plain SET NX PX is enough, with a
GET + PEXPIRE renewal that may, in a race, extend another worker's lease.

It is taken on the consumer's loop and renewed by a thread of its own while the
process lives: a long step of the loop (a batch of thousands of entries, or taking in
tens of thousands handed over) ran past the ttl under load, the standby took the
lease, the old reader handed everything over, and in the soak the two then passed a
growing heap of entries back and forth while kills counted deliveries against it. A
reader loses the lease now when it dies, stops, or is paused (its thread with it)
past the ttl.
"""

from __future__ import annotations

import threading
import time

from redis import Redis

from usermgmt.domain.payloads import text_of

TTL_MS = 3_000
RENEW_EVERY_S = TTL_MS / 1000 / 3
STANDBY_POLL_S = 0.25  # how often a standby looks for a free lease


class Lease:
    """`um:{events}:reader`: the consumer name of the worker reading new entries."""

    def __init__(self, redis: Redis, key: str, consumer: str, enabled: bool = True) -> None:
        self.redis, self.key, self.consumer, self.enabled = redis, key, consumer, enabled
        self.renewed = float("-inf")  # monotonic time of the last successful claim
        self.keeper: threading.Thread | None = None  # renews while the lease is ours

    def held(self) -> bool:
        """Whether this worker may read new entries now (claims or renews when due)."""
        if not self.enabled:
            return True
        now = time.monotonic()
        if now - self.renewed < RENEW_EVERY_S:
            return True
        if self.redis.set(self.key, self.consumer, nx=True, px=TTL_MS) or self._renew():
            self._kept(now)
            return True
        self.renewed = float("-inf")
        return False

    def _renew(self) -> bool:
        """Extend the lease if it is ours."""
        holder = self.redis.get(self.key)
        if holder is None or text_of(holder) != self.consumer:
            return False
        self.redis.pexpire(self.key, TTL_MS)
        return True

    def _kept(self, now: float) -> None:
        self.renewed = now
        if self.keeper is None or not self.keeper.is_alive():
            self.keeper = threading.Thread(
                target=self._keep, name="usermgmt-reader-lease", daemon=True
            )
            self.keeper.start()

    def _keep(self) -> None:
        """Renew every `RENEW_EVERY_S` until the lease is lost or let go. While Redis
        fails (away, or the client closed), the lease is taken as lost once the ttl has
        run out since the last renewal: the loop's next look claims it again, or not."""
        while True:
            time.sleep(RENEW_EVERY_S)
            if self.renewed == float("-inf"):
                return
            try:
                ours = self._renew()
            except Exception:  # any failure of the client: nothing to renew with
                if time.monotonic() - self.renewed > TTL_MS / 1000:
                    self.renewed = float("-inf")
                    return
                continue
            if not ours:
                self.renewed = float("-inf")
                return
            self.renewed = time.monotonic()

    def holder(self) -> str | None:
        raw = self.redis.get(self.key)
        return None if raw is None else text_of(raw)

    def release(self) -> None:
        """Hand the lease over at once (a clean stop), if it is still ours."""
        if not self.enabled or self.renewed == float("-inf"):
            return
        self.renewed = float("-inf")
        if self.holder() == self.consumer:
            self.redis.delete(self.key)


__all__ = ["RENEW_EVERY_S", "STANDBY_POLL_S", "TTL_MS", "Lease"]
