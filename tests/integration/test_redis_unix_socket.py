"""`USERMGMT_REDIS_URL=unix:///…`: the worker's connection over a Unix socket."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from tests.cluster import _die_with_parent
from usermgmt.workers.runtime.connections import make_redis


@pytest.fixture
def socket_path(tmp_path: Path) -> Iterator[Path]:
    """A private redis-server listening only on a Unix socket."""
    path = tmp_path / "redis.sock"
    server = subprocess.Popen(
        [
            "redis-server",
            "--port",
            "0",
            "--unixsocket",
            str(path),
            "--save",
            "",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
        preexec_fn=_die_with_parent,  # noqa: PLW1509 (started before any thread of the test)
    )
    try:
        deadline = time.monotonic() + 10
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        yield path
    finally:
        server.terminate()
        server.wait(10)


def test_a_unix_socket_url_connects(socket_path: Path) -> None:
    client = make_redis(f"unix://{socket_path}?db=3")
    try:
        assert isinstance(client, Redis)
        assert client.set("k", "v") and client.get("k") == b"v"
        assert Redis(unix_socket_path=str(socket_path), db=3).get("k") == b"v"
    finally:
        client.close()


def test_an_absent_socket_is_an_outage_not_a_crash(tmp_path: Path) -> None:
    client = make_redis(f"unix://{tmp_path / 'none.sock'}")
    with pytest.raises(RedisConnectionError):
        client.ping()
