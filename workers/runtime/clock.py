"""The Redis server's clock, which stamps entry ids: asked, or followed from this host's."""

from __future__ import annotations

import time

from redis import Redis


def redis_time_ms(client: Redis) -> int:
    """The Redis server's clock, which also stamps entry ids."""
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


class RedisClock:
    """`redis_time_ms` without a round trip each time: the offset between the Redis
    server's clock and this host's, asked again every `refresh_s` seconds."""

    def __init__(self, client: Redis, refresh_s: float = 10.0) -> None:
        self.client, self.refresh_s = client, refresh_s
        self.offset_ms = 0.0
        self.asked = -refresh_s

    def now_ms(self) -> int:
        if time.monotonic() - self.asked >= self.refresh_s:
            self.offset_ms = redis_time_ms(self.client) - time.time() * 1000
            self.asked = time.monotonic()
        return int(time.time() * 1000 + self.offset_ms)
