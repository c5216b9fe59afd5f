"""RedisClock: the Redis server's clock without a round trip per question."""

from __future__ import annotations

import time

import fakeredis

from usermgmt.workers.runtime.clock import RedisClock, redis_time_ms


class CountingRedis(fakeredis.FakeRedis):
    asked = 0

    def time(self):  # type: ignore[no-untyped-def]
        self.asked += 1
        seconds, micros = super().time()
        return seconds + 3600, micros  # a server an hour ahead of this host


def test_the_clock_follows_the_server_and_asks_it_now_and_then() -> None:
    client = CountingRedis()
    clock = RedisClock(client, refresh_s=0.2)
    first = clock.now_ms()
    assert abs(first - redis_time_ms(client)) < 200  # the server's clock, not ours
    client.asked = 0
    for _ in range(100):
        clock.now_ms()
    assert client.asked == 0
    time.sleep(0.25)
    assert clock.now_ms() >= first + 250
    assert client.asked == 1
