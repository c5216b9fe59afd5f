"""How long to wait before trying again: reconnects, and transactions that lost a race.

An outage is said in few lines (`Backoff.retry`): its first failure at once, then one
reminder a minute with how long it has lasted, and one line when it is over
(`Backoff.recovered`); the retries in between are logged at debug level.
"""

from __future__ import annotations

import time
from typing import Any

from structlog.typing import FilteringBoundLogger

REMIND_EVERY_S = 60.0


class Backoff:
    """Exponential backoff: `first` seconds doubling to `cap`, reset on success."""

    def __init__(self, first: float = 0.2, cap: float = 10.0) -> None:
        self.first, self.cap = first, cap
        self.delay = 0.0
        self.since: float | None = None  # when the failures began
        self.said: float | None = None  # when the outage was last logged as an error

    def next_delay(self) -> float:
        if self.since is None:
            self.since = time.monotonic()
        self.delay = self.first if self.delay == 0 else min(self.cap, self.delay * 2)
        return self.delay

    def reset(self) -> None:
        self.delay, self.since, self.said = 0.0, None, None

    def retry(self, log: FilteringBoundLogger, message: str, **fields: Any) -> float:
        """The delay before the next try; `message` is logged as an error at the first
        failure and once a minute after (with `down_s`), at debug level otherwise."""
        delay = self.next_delay()
        now = time.monotonic()
        if self.said is not None and now - self.said < REMIND_EVERY_S:
            log.debug(message, retry_in_s=round(delay, 2), **fields)
            return delay
        if self.said is not None and self.since is not None:
            fields["down_s"] = round(now - self.since, 1)
        self.said = now
        log.error(message, retry_in_s=round(delay, 2), **fields)
        return delay

    def recovered(self, log: FilteringBoundLogger, what: str) -> None:
        """Success: after an outage that was logged, say that `what` works again."""
        if self.said is not None and self.since is not None:
            log.info(f"{what} works again", down_s=round(time.monotonic() - self.since, 1))
        self.reset()
