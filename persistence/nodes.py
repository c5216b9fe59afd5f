"""Which server a raw command goes to: the one Redis, or the cluster node owning its key.

The hot paths (`cache.CommandBatch`, the stream reads) write packed commands straight
to a connection. On a single server that is the client's pool; on a Redis Cluster it is
the pool of the primary owning the key's slot, from the client's slot map. A MOVED or
ASK reply, or a connection that fails, refreshes that map (`refresh`), as redis-py's
own cluster commands do.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any

from redis import Redis
from redis.cluster import RedisCluster
from redis.exceptions import AskError, MovedError

REFRESH_EVERY_S = 0.25  # at most this often: a failover sends errors from every thread


def is_cluster(client: object) -> bool:
    return isinstance(client, RedisCluster)


def pool_for(client: Redis, key: str | bytes) -> Any:
    """The connection pool serving `key`: the client's own, or its slot owner's."""
    if not isinstance(client, RedisCluster):
        return client.connection_pool
    node = client.get_node_from_key(key)
    return client.get_redis_connection(node).connection_pool


def node_name(client: Redis, key: str | bytes) -> str:
    """`host:port` of the server serving `key` (one name on a single server)."""
    if not isinstance(client, RedisCluster):
        return ""
    return str(client.get_node_from_key(key).name)


def pool_at(client: Redis, address: str) -> Any:
    """The pool of the node at `host:port` (an ASK reply's target)."""
    assert isinstance(client, RedisCluster)
    host, _, port = address.rpartition(":")
    node = client.get_node(host=host, port=int(port))
    if node is None:
        refresh(client, force=True)
        node = client.get_node(host=host, port=int(port))
    if node is None:
        raise ConnectionError(f"cluster node {address} is not in the slot map")
    return client.get_redis_connection(node).connection_pool


_refresh_lock = threading.Lock()
_last_refresh: dict[int, float] = {}


def refresh(client: Redis, force: bool = False) -> None:
    """Reload the cluster's slot map (after MOVED, or a node that went away)."""
    if not isinstance(client, RedisCluster):
        return
    with _refresh_lock:
        now = time.monotonic()
        if not force and now - _last_refresh.get(id(client), 0.0) < REFRESH_EVERY_S:
            return
        _last_refresh[id(client)] = now
    with contextlib.suppress(Exception):  # every node away for now: the next error retries
        client.nodes_manager.initialize()


def redirect_of(error: BaseException) -> tuple[str, str] | None:
    """(`MOVED` or `ASK`, `host:port`) of a redirection reply, else None.

    hiredis leaves the code in the message (`MOVED 3999 host:port`); redis-py's parser
    moves it to a `MovedError` / `AskError` holding `3999 host:port`.
    """
    words = str(error).split()
    if isinstance(error, AskError) and len(words) == 2:
        return ("MOVED" if isinstance(error, MovedError) else "ASK"), words[1]
    if len(words) == 3 and words[0] in ("MOVED", "ASK") and words[1].isdigit():
        return words[0], words[2]
    return None


__all__ = ["is_cluster", "node_name", "pool_at", "pool_for", "redirect_of", "refresh"]
