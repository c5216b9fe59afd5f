"""The CLI pointed at one node of a Redis Cluster: found to be a cluster, and it works.

The same commands as on a single server, as processes: simulate (registrations
through the auth consumer, games through the event consumer), publish, status,
health, dlq, leaderboard, user, backup, replay, trim.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest
from redis import Redis
from redis.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError

from tests.cluster import LocalCluster
from tests.conftest import REDIS_URL, _delete_prefix
from tests.e2e.conftest import REPO, Stack, wait_for
from usermgmt.workers.runtime.connections import make_redis


@pytest.fixture
def cluster_stack(redis_cluster: LocalCluster, tmp_path: Path, prefix: str) -> Iterator[Stack]:
    client = cast(Redis, RedisCluster.from_url(redis_cluster.url))
    database_url = f"sqlite:///{tmp_path / 'usermgmt.db'}"
    env = {
        **os.environ,
        "USERMGMT_REDIS_URL": redis_cluster.url,  # one node; the rest is discovered
        "USERMGMT_DATABASE_URL": database_url,
        "USERMGMT_KEY_PREFIX": prefix,
        "USERMGMT_BCRYPT_ROUNDS": "4",
        "USERMGMT_LOG_FORMAT": "json",
        "PYTHONPATH": str(REPO),
    }
    built = Stack(env=env, redis=client, prefix=prefix, database_url=database_url)
    assert built.cli("migrate").returncode == 0
    yield built
    built.close()
    _delete_prefix(client, prefix)
    client.close()


def test_the_client_kind_is_found_at_connect_time(redis_cluster: LocalCluster) -> None:
    assert isinstance(make_redis(redis_cluster.url), RedisCluster)
    assert not isinstance(make_redis(REDIS_URL), RedisCluster)
    assert not isinstance(make_redis(redis_cluster.url, "off"), RedisCluster)
    with pytest.raises(RedisConnectionError):  # forced, with nothing there: an outage
        make_redis("redis://127.0.0.1:1/0", "on")


def test_every_command_works_against_a_cluster(cluster_stack: Stack, tmp_path: Path) -> None:
    stack = cluster_stack
    worker = stack.start_worker("--consumer", "w1")
    simulated = stack.cli("simulate", "--players", "20", "--games", "40", "--timeout", "60")
    assert simulated.returncode == 0, simulated.stderr
    bad = json.dumps(
        {
            "event_id": "6f7c1c1e-9d0a-4a77-8f43-2d1b6a9f0c29",
            "session_id": "z",
            "players": ["nobody"],
        }
    )
    lines = tmp_path / "bad.jsonl"
    lines.write_text(bad + "\n")
    published = stack.cli("publish", "update", str(lines))
    assert published.returncode == 0, published.stderr

    def one_letter() -> bool:
        return "unknown_user" in stack.cli("dlq", "list").stdout

    wait_for(one_letter)
    health = stack.cli("health")
    assert health.returncode == 0 and "w1" in health.stdout
    status = stack.cli("status")
    assert status.returncode == 0, status.stderr
    assert "dead letters: 1" in status.stdout and "workers alive: 1" in status.stdout
    assert stack.cli("dlq", "purge", "--yes").returncode == 0
    board = stack.cli("leaderboard")
    assert board.returncode == 0 and "of 20 players" in board.stdout
    assert stack.stop_worker(worker) == 0

    snapshot = tmp_path / "snap.db"
    assert stack.cli("backup", str(snapshot)).returncode == 0
    replayed = f"sqlite:///{tmp_path / 'replayed.db'}"
    assert stack.cli("migrate", "--database", replayed).returncode == 0
    replay = stack.cli("replay", "--database", replayed)
    assert replay.returncode == 0, replay.stderr
    again = stack.cli("leaderboard", "--database", replayed)
    assert again.stdout.splitlines()[3:] == board.stdout.splitlines()[3:]
    assert stack.cli("trim").returncode == 0
    assert stack.cli("acl").returncode == 0
