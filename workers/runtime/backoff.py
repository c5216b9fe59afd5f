"""How long to wait before trying again: reconnects, and transactions that lost a race."""

from __future__ import annotations

import time


class Backoff:
    """Exponential backoff: `first` seconds doubling to `cap`, reset on success."""

    def __init__(self, first: float = 0.2, cap: float = 10.0) -> None:
        self.first, self.cap = first, cap
        self.delay = 0.0
        self.since: float | None = None

    def next_delay(self) -> float:
        if self.since is None:
            self.since = time.monotonic()
        self.delay = self.first if self.delay == 0 else min(self.cap, self.delay * 2)
        return self.delay

    def reset(self) -> None:
        self.delay, self.since = 0.0, None
