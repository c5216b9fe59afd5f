"""A slot moving between masters while the worker writes: ASK during the move, MOVED after.

The slot of a user hash is moved by hand, the way `redis-cli --cluster reshard` does
it (SETSLOT IMPORTING / MIGRATING, MIGRATE, SETSLOT NODE), with the client's slot map
left stale on purpose.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import cast

import pytest
from redis import Redis
from redis.cluster import RedisCluster
from redis.exceptions import AskError

from tests.cluster import LocalCluster
from usermgmt.persistence import cache
from usermgmt.persistence.keys import Keys
from usermgmt.workers.runtime.streams import read_new

KEYS = Keys("reshard")


@pytest.fixture
def client(private_redis_cluster: LocalCluster) -> Iterator[Redis]:
    cluster_client = cast(Redis, RedisCluster.from_url(private_redis_cluster.url))
    yield cluster_client
    cluster_client.close()


def node_id(port: int) -> str:
    return str(Redis(port=port).execute_command("CLUSTER", "MYID").decode())


def hset_batch(client: Redis, key: str, value: int) -> list[object]:
    batch = cache.CommandBatch()
    batch.add("HSET", key, "wallet", value)
    batch.add("EXPIRE", key, 300)
    return batch.send(client).wait()


def begin_move(cluster: LocalCluster, key: str) -> tuple[int, int, int]:
    """Mark the key's slot as leaving its master for another one: (slot, source, target)."""
    source = cluster.master_of(key)
    target = next(port for port in cluster.masters() if port != source)
    slot = int(Redis(port=source).execute_command("CLUSTER", "KEYSLOT", key))
    Redis(port=target).execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", node_id(source))
    Redis(port=source).execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", node_id(target))
    return slot, source, target


def end_move(cluster: LocalCluster, slot: int, source: int, target: int) -> None:
    """Move what the slot still holds and hand it to the target on every master."""
    source_node = Redis(port=source)
    while keys := source_node.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
        source_node.execute_command("MIGRATE", "127.0.0.1", target, "", 0, 5000, "KEYS", *keys)
    for port in cluster.masters():
        Redis(port=port).execute_command("CLUSTER", "SETSLOT", slot, "NODE", node_id(target))


def test_batched_writes_follow_ask_during_a_move_and_moved_after_it(
    private_redis_cluster: LocalCluster, client: Redis
) -> None:
    cluster = private_redis_cluster
    key = KEYS.user("alice")
    slot, source, target = begin_move(cluster, key)
    # The key is not on the source: the source answers ASK, the target takes it after
    # ASKING (and only then: without it the target would answer MOVED back).
    assert hset_batch(client, key, 5) == [1, 1]
    with pytest.raises(AskError):  # not on the source: it sends readers on, too
        Redis(port=source).exists(key)
    target_node = Redis(port=target)
    target_node.execute_command("ASKING")
    assert target_node.hget(key, "wallet") == b"5"

    end_move(cluster, slot, source, target)
    # The client's slot map still names the source: MOVED, a refresh, then the target.
    assert hset_batch(client, key, 7) == [0, 1]
    assert client.hget(key, "wallet") == b"7"
    assert cluster.master_of(key) == target


def test_stream_reads_follow_a_moved_slot(
    private_redis_cluster: LocalCluster, client: Redis
) -> None:
    """The event streams' slot moved to another master: the worker's raw read (TIME,
    XREADGROUP) is redirected, refreshes its map and reads there."""
    cluster = private_redis_cluster
    stream = KEYS.update_stream
    client.xgroup_create(stream, "g", id="0", mkstream=True)
    client.xadd(stream, {"payload": b"{}"})
    slot, source, target = begin_move(cluster, stream)
    end_move(cluster, slot, source, target)
    entries = read_new(client, "g", "c", [stream], 10, None)
    assert [entry.stream for entry in entries] == [stream]
    assert cluster.master_of(stream) == target
