"""A Redis Cluster master dies under load: its replica takes over, the worker carries on.

The master killed is the one holding the event streams (`{events}`), the worst case:
the worker's reads, acks and the consumer group's state all live there.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import cast

from redis import Redis
from redis.cluster import RedisCluster

from tests.cluster import LocalCluster
from tests.conftest import Backend
from tests.integration.helpers import add_players, pending_count, rows, services_for
from tests.integration.test_events_delivery import (
    PLAYERS,
    burst,
    check_history,
    rematch_history,
    running,
    wait_for,
)
from usermgmt.persistence.db import upgrade


def wait_replicated(cluster: LocalCluster, master: int, timeout: float = 10) -> None:
    """Until the master's replica has every write (replication is asynchronous)."""
    node = Redis(port=master)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            info = node.info("replication")
            replica = info.get("slave0")
            if isinstance(replica, dict) and replica["offset"] >= info["master_repl_offset"]:
                return
            time.sleep(0.02)
        raise AssertionError(f"the replica of {master} did not catch up in {timeout} s")
    finally:
        node.close()


def test_the_worker_carries_on_after_the_streams_master_fails_over(
    private_redis_cluster: LocalCluster, tmp_path: Path, prefix: str
) -> None:
    cluster = private_redis_cluster
    client = cast(Redis, RedisCluster.from_url(cluster.url))
    backend = Backend(
        "sqlite-cluster", f"sqlite:///{tmp_path / 'usermgmt.db'}", client, cluster.url, prefix
    )
    upgrade(backend.database_url)
    events = rematch_history(PLAYERS, 600, "f", seed=11)
    games = sum(1 for kind, _ in events if kind == "update")
    ended = "SELECT COUNT(*) FROM game_sessions WHERE ended_at IS NOT NULL"
    master = cluster.master_of(backend.keys.update_stream)
    with services_for(backend, batch_size=16, retry_delay_ms=50, claim_idle_ms=1_000) as services:
        add_players(services, *PLAYERS)
        burst(client, backend, events)
        wait_replicated(cluster, master)  # what was published survives the failover
        with running(services) as worker:
            wait_for(lambda: worker.stats.applied >= len(events) // 4, timeout=60)
            cluster.kill(master)
            applied_at_kill = worker.stats.applied
            cluster.wait_failover(master)
            wait_for(
                lambda: (
                    rows(services, ended) == [(games,)] and pending_count(client, backend.keys) == 0
                ),
                timeout=90,
            )
        assert applied_at_kill < len(events), "the kill came after the work was done"
        assert worker.stats.applied + worker.stats.duplicates >= len(events)
        check_history(services, backend, events)
    client.close()
