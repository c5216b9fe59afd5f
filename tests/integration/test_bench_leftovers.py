"""A killed bench run's keys are swept by the next run; a live run's are kept."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import fakeredis
import pytest
from redis import Redis

from bench import leftovers
from tests.conftest import POSTGRES_URL, REDIS_URL


@pytest.fixture(params=["redis", "fakeredis"])
def redis(request: pytest.FixtureRequest) -> Iterator[Redis]:
    if request.param == "fakeredis":
        client: Redis = fakeredis.FakeRedis(server=fakeredis.FakeServer(version=(7,)))
    else:
        client = Redis.from_url(REDIS_URL)
    yield client
    client.close()


def _run() -> str:
    return f"bench{uuid.uuid4().hex[:8]}"


def _fill(redis: Redis, run: str, scenarios: int, keys: int) -> None:
    pipe = redis.pipeline(transaction=False)
    for n in range(1, scenarios + 1):
        prefix = f"{run}-{n}main"
        for i in range(keys):
            pipe.hset(f"{prefix}:user:p{i}", mapping={"wallet": i})
        pipe.xadd(f"{prefix}:{{events}}:update", {"payload": "{}"})
    pipe.execute()


def _count(redis: Redis, run: str) -> int:
    return sum(1 for _ in redis.scan_iter(match=f"{run}-*", count=1_000))


def test_the_keys_of_a_run_without_a_heartbeat_are_deleted_and_a_live_runs_kept(
    redis: Redis,
) -> None:
    killed, alive, own = _run(), _run(), _run()
    _fill(redis, killed, scenarios=3, keys=2_500)
    _fill(redis, alive, scenarios=2, keys=10)
    _fill(redis, own, scenarios=1, keys=10)
    # Not a bench prefix: the sweep never touches it.
    redis.set(f"{killed}:unrelated", 1)
    redis.set(f"x{killed}-1main:user:p1", 1)
    beating = leftovers.Heartbeat(redis, alive)
    beating.start()
    try:
        swept = leftovers.sweep(redis, own)
        assert swept.get(killed) == 3 * 2_501
        assert alive not in swept and own not in swept
        assert _count(redis, killed) == 0
        assert _count(redis, alive) == 2 * 11
        assert _count(redis, own) == 11
        assert redis.get(f"{killed}:unrelated") == b"1"
        assert redis.get(f"x{killed}-1main:user:p1") == b"1"
    finally:
        beating.stop()
        for run in (killed, alive, own):
            leftovers.delete_run(redis, run)
        redis.delete(f"{killed}:unrelated", f"x{killed}-1main:user:p1")
    assert not redis.exists(leftovers.HEARTBEAT_KEY.format(run=alive))


def test_the_heartbeat_expires_when_its_run_dies(redis: Redis) -> None:
    run = _run()
    beating = leftovers.Heartbeat(redis, run)
    beating.start()
    key = leftovers.HEARTBEAT_KEY.format(run=run)
    try:
        ttl = redis.ttl(key)
        assert 0 < ttl <= leftovers.HEARTBEAT_TTL_S
    finally:
        beating.stop()
    assert not redis.exists(key)


def test_the_schemas_of_a_run_without_a_heartbeat_are_dropped(postgres_url: str) -> None:
    """`postgres_url` only marks the test as needing PostgreSQL; the bench's schemas live
    beside the tests' own in the same database."""
    from bench import postgres

    redis = fakeredis.FakeRedis(server=fakeredis.FakeServer(version=(7,)))
    killed, alive, own = _run(), _run(), _run()
    names = {run: f"{run}_main_pg_{uuid.uuid4().hex[:8]}" for run in (killed, alive, own)}
    with postgres.connect(POSTGRES_URL) as conn:
        for name in names.values():
            conn.execute(f'CREATE SCHEMA "{name}"')
            conn.execute(f'CREATE TABLE "{name}".users (id int)')
    beating = leftovers.Heartbeat(redis, alive)
    beating.start()
    try:
        dropped = leftovers.sweep_schemas(POSTGRES_URL, redis, own)
        left = set(postgres.schemas(POSTGRES_URL))
        assert names[killed] in dropped and names[killed] not in left
        assert names[alive] in left and names[own] in left
        assert postgres_url  # the tests' own schema is never a bench run's
    finally:
        beating.stop()
        for name in names.values():
            postgres.drop_schema(POSTGRES_URL, name)


def test_an_unreachable_server_is_left_for_the_scenarios_to_report() -> None:
    redis = fakeredis.FakeRedis(server=fakeredis.FakeServer(version=(7,)))
    assert leftovers.sweep_schemas("postgresql://postgres@127.0.0.1:1/test", redis, _run()) == []
