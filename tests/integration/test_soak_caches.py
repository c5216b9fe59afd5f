"""The soak's cache check finds a cache that differs from the tables, and only then."""

from __future__ import annotations

from bench.soak_caches import cache_mismatches
from tests.conftest import Backend
from tests.integration.helpers import add_players, drain, publish
from usermgmt.workers.runtime.bootstrap import Services


def test_caches_written_by_the_worker_match_and_each_spoilt_one_is_found(
    services: Services, backend: Backend
) -> None:
    redis, keys = backend.redis, backend.keys
    add_players(services, "ann", "bob", "cat", "dan")
    publish(redis, keys, "update", session_id="s-1", players=["ann", "bob"])
    publish(redis, keys, "update", session_id="s-2", players=["cat", "dan"])
    publish(
        redis,
        keys,
        "terminate",
        session_id="s-1",
        results=[
            {"username": "ann", "outcome": "win", "earnings": 150},
            {"username": "bob", "outcome": "loss", "earnings": 0},
        ],
    )
    drain(services)
    assert cache_mismatches(redis, keys, backend.database_url) == []

    redis.hset(keys.user("ann"), "wallet", 149)  # a stale wallet
    redis.hdel(keys.user("cat"), "session")  # cat still plays s-2
    redis.zadd(keys.leaderboard, {"ann": 10})  # a stale score
    redis.hset(keys.session("s-1"), "players", "[]")  # an ended game's hash
    redis.delete(keys.session("s-2"))  # a live game without one
    found = cache_mismatches(redis, keys, backend.database_url)
    assert len(found) == 5, found
    assert any("user hash of ann" in line for line in found)
    assert any("user hash of cat: session None, playing s-2" in line for line in found)
    assert any("leaderboard score of ann" in line for line in found)
    assert any("s-1, which is not live" in line for line in found)
    assert any("no session hash for the live session s-2" in line for line in found)
