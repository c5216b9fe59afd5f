"""A Redis that evicts keys at its memory limit can drop a stream, its consumer groups
or a reply: the worker warns at start and whenever the policy changes, and
`usermgmt status` says so, naming the setting to change."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import fakeredis
import pytest
import structlog
from redis import Redis
from rich.console import Console

from bench.soak import RedisServer
from tests.conftest import Backend, all_logs, make_settings
from usermgmt.persistence.db import make_engine, upgrade
from usermgmt.workers.cli.commands.ops import print_status
from usermgmt.workers.ops import status
from usermgmt.workers.runtime.bootstrap import Services
from usermgmt.workers.runtime.redis_info import evicting_policy
from usermgmt.workers.runtime.runner import Worker


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[Redis]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    client = Redis(port=server.port)
    try:
        yield client
    finally:
        client.close()
        server.stop()


def test_an_evicting_policy_is_told_only_while_a_memory_limit_is_set(
    private_redis: Redis,
) -> None:
    assert evicting_policy(private_redis) is None
    private_redis.config_set("maxmemory-policy", "allkeys-lru")
    assert evicting_policy(private_redis) is None  # no limit: nothing is ever evicted
    private_redis.config_set("maxmemory", "512mb")
    assert evicting_policy(private_redis) == "allkeys-lru"
    private_redis.config_set("maxmemory-policy", "noeviction")
    assert evicting_policy(private_redis) is None
    assert evicting_policy(fakeredis.FakeRedis()) is None  # no INFO: nothing to tell


def test_the_worker_warns_at_start_and_when_the_policy_changes(
    private_redis: Redis, sqlite_url: str, prefix: str
) -> None:
    upgrade(sqlite_url)
    port = private_redis.connection_pool.connection_kwargs["port"]
    backend = Backend(
        "sqlite-private", sqlite_url, private_redis, f"redis://127.0.0.1:{port}/0", prefix
    )
    engine = make_engine(sqlite_url)
    services = Services(make_settings(backend), private_redis, engine, backend.keys)
    worker = Worker(services, "w1")
    try:
        private_redis.config_set("maxmemory", "512mb")
        private_redis.config_set("maxmemory-policy", "volatile-lru")
        with all_logs() as logs:
            worker.log = structlog.get_logger("usermgmt.worker").bind(consumer="w1")
            worker._check_eviction()
            worker._check_eviction()  # unchanged: said once
            private_redis.config_set("maxmemory-policy", "allkeys-lfu")
            worker._check_eviction()
            private_redis.config_set("maxmemory-policy", "noeviction")
            worker._check_eviction()
        said = [(log["log_level"], log["event"]) for log in logs]
        assert [level for level, _ in said] == ["warning", "warning", "info"]
        assert "maxmemory-policy volatile-lru" in said[0][1]
        assert "set maxmemory-policy noeviction" in said[0][1]
        assert "maxmemory-policy allkeys-lfu" in said[1][1]

        private_redis.config_set("maxmemory-policy", "allkeys-random")
        report = status.collect(private_redis, engine, backend.keys, sqlite_url)
        assert report.redis_evicts == "allkeys-random"
        assert report.to_json()["redis_evicts"] == "allkeys-random"
        out = io.StringIO()
        print_status(Console(file=out, width=200), report)
        assert (
            "warning: Redis evicts keys at its memory limit (maxmemory-policy allkeys-random)"
            in (out.getvalue())
        )
    finally:
        engine.dispose()
