"""A stream deleted under a worker that waits on it (`DEL`, `FLUSHDB`, by hand).

Redis unblocks the waiting read with `UNBLOCKED the stream key no longer exists`. The
worker makes the stream and its group again, as after a restart without persistence,
and goes on serving what is published next.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from tests.conftest import Backend
from tests.integration.helpers import add_players, publish, rows
from tests.integration.replay_helpers import wait_until
from usermgmt.workers.auth.server import AuthServer
from usermgmt.workers.client.auth import AuthClient
from usermgmt.workers.events.consumer import EventConsumer
from usermgmt.workers.runtime.bootstrap import Services

RESULTS = [
    {"username": "alice", "outcome": "win", "earnings": 30},
    {"username": "bob", "outcome": "loss", "earnings": 0},
]


@contextmanager
def serving(services: Services) -> Iterator[list[threading.Thread]]:
    stop = threading.Event()
    threads = [
        threading.Thread(target=EventConsumer(services, "c1", stop).run, daemon=True),
        threading.Thread(target=AuthServer(services, "c1", stop).run, daemon=True),
    ]
    for thread in threads:
        thread.start()
    try:
        yield threads
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)


def test_streams_deleted_while_the_worker_waits_on_them_are_made_again(
    services: Services, backend: Backend
) -> None:
    add_players(services, "alice", "bob")
    redis, keys = backend.redis, backend.keys
    streams = [keys.update_stream, keys.terminate_stream, keys.auth_requests]
    with serving(services) as threads:
        wait_until(lambda: all(redis.exists(stream) for stream in streams))
        time.sleep(0.3)  # both consumers now wait in a blocking read (1 s)
        redis.delete(*streams)
        time.sleep(0.3)
        assert all(thread.is_alive() for thread in threads)
        publish(redis, keys, "update", session_id="g1", players=["alice", "bob"])
        publish(redis, keys, "terminate", session_id="g1", results=RESULTS)
        user = AuthClient(redis, prefix=backend.prefix, timeout=20).register("carol", "pw-carol-1")
        wait_until(lambda: rows(services, "SELECT wallet FROM users WHERE id = 1") == [(30,)])
        assert all(thread.is_alive() for thread in threads)
    assert user["username"] == "carol"
    assert rows(services, "SELECT username, wallet FROM users ORDER BY id") == [
        ("alice", 30),
        ("bob", 0),
        ("carol", 0),
    ]
