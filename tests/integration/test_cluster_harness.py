"""The local Redis Cluster harness (tests/cluster.py) gives a real, working cluster."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest
import redis
from redis.cluster import RedisCluster

if TYPE_CHECKING:
    from tests.cluster import LocalCluster

# Registers the fixtures (a no-op once tests/conftest.py lists the same plugin).
pytest_plugins = ["tests.cluster"]


@pytest.fixture
def client(redis_cluster: LocalCluster) -> Iterator[RedisCluster]:
    cluster_client = RedisCluster.from_url(redis_cluster.url, decode_responses=True)
    yield cluster_client
    cluster_client.close()


def _node(port: int) -> redis.Redis:
    """A plain (non-cluster) client to one node."""
    return redis.Redis(host="127.0.0.1", port=port, decode_responses=True)


def _keys_on_every_master(cluster: LocalCluster, prefix: str) -> dict[int, str]:
    """One key per master: {master port: key}."""
    found: dict[int, str] = {}
    for i in range(200):
        key = f"{prefix}:{i}"
        found.setdefault(cluster.master_of(key), key)
        if len(found) == len(cluster.masters()):
            break
    return found


def test_cluster_is_whole(redis_cluster: LocalCluster) -> None:
    assert len(redis_cluster.ports) == 6
    assert len(redis_cluster.masters()) == 3
    assert redis_cluster.url == f"redis://127.0.0.1:{redis_cluster.masters()[0]}/0"


def test_keys_land_on_every_master(redis_cluster: LocalCluster, client: RedisCluster) -> None:
    prefix = f"t{uuid.uuid4().hex[:10]}"
    keys = _keys_on_every_master(redis_cluster, prefix)
    assert sorted(keys) == redis_cluster.masters()
    for port, key in keys.items():
        assert client.set(key, f"on {port}")
    for port, key in keys.items():
        assert client.get(key) == f"on {port}"
        with _node(port) as node:  # the key really is on the master master_of named
            assert node.get(key) == f"on {port}"
    client.delete(*keys.values())


def test_hash_tagged_keys_share_a_node(redis_cluster: LocalCluster, client: RedisCluster) -> None:
    tag = f"{{t{uuid.uuid4().hex[:10]}}}"
    profile, sessions = f"{tag}:profile", f"{tag}:sessions"
    port = redis_cluster.master_of(profile)
    assert redis_cluster.master_of(sessions) == port
    assert client.mset({profile: "p", sessions: "s"})  # one slot: no CROSSSLOT error
    assert client.mget(profile, sessions) == ["p", "s"]
    with _node(port) as node:
        assert node.mget(profile, sessions) == ["p", "s"]
    client.delete(profile, sessions)


def test_failover_keeps_an_acknowledged_write(private_redis_cluster: LocalCluster) -> None:
    """Kill the master owning a key: its replica takes over and still has the key.

    Runs on a cluster of its own so the session cluster stays whole. The key is picked
    on a master other than the URL's node, so the URL still answers afterwards.
    """
    cluster = private_redis_cluster
    url_port = int(cluster.url.rsplit(":", 1)[1].split("/")[0])
    keys = _keys_on_every_master(cluster, "failover")
    old_master, key = next((port, key) for port, key in keys.items() if port != url_port)

    with _node(old_master) as node:  # SET then WAIT on the same connection
        assert node.set(key, "kept")
        assert node.wait(1, 1000) == 1  # the replica has it
    client = RedisCluster.from_url(cluster.url, decode_responses=True)
    assert client.get(key) == "kept"

    cluster.kill(old_master)
    cluster.wait_failover(old_master)

    new_master = cluster.master_of(key)
    assert new_master != old_master
    assert old_master not in cluster.masters()
    with _node(new_master) as node:
        assert node.get(key) == "kept"
    assert client.get(key) == "kept"  # the old client follows the new topology
    client.close()
    with RedisCluster.from_url(cluster.url, decode_responses=True) as fresh:
        assert fresh.get(key) == "kept"
