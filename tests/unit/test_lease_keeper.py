"""The reader lease's renewal thread: it stops once the lease is lost or let go, and
a client that fails (Redis away, or closed) loses the lease after its ttl, never the
thread with an exception."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from redis.exceptions import RedisClusterException

from usermgmt.workers.events import lease
from usermgmt.workers.events.lease import Lease


class Client:
    """Just enough of a Redis client for the lease; `fail` makes every call raise."""

    def __init__(self) -> None:
        self.values: dict[str, bytes] = {}
        self.fail = False

    def _check(self) -> None:
        if self.fail:
            raise RedisClusterException("The cluster has no default node (client closed)")

    def set(self, key: str, value: str, nx: bool, px: int) -> bool:
        self._check()
        if key in self.values:
            return False
        self.values[key] = value.encode()
        return True

    def get(self, key: str) -> bytes | None:
        self._check()
        return self.values.get(key)

    def pexpire(self, key: str, ms: int) -> bool:
        self._check()
        return key in self.values

    def delete(self, key: str) -> int:
        self._check()
        return 1 if self.values.pop(key, None) is not None else 0


@pytest.fixture(autouse=True)
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lease, "TTL_MS", 200)
    monkeypatch.setattr(lease, "RENEW_EVERY_S", 0.02)


def make(client: Client) -> Lease:
    return Lease(client, "um:{events}:reader", "A")  # type: ignore[arg-type]


def test_the_keeper_renews_while_the_lease_is_ours_and_stops_on_release() -> None:
    client = Client()
    held = make(client)
    assert held.held()
    first = held.renewed
    time.sleep(0.1)
    assert held.renewed > first  # renewed by the thread, not by `held`
    keeper = held.keeper
    assert keeper is not None and keeper.is_alive()
    held.release()
    keeper.join(1)
    assert not keeper.is_alive() and "um:{events}:reader" not in client.values


def test_the_keeper_stops_when_another_worker_holds_the_lease() -> None:
    client = Client()
    held = make(client)
    assert held.held()
    client.values["um:{events}:reader"] = b"B"
    assert held.keeper is not None
    held.keeper.join(1)
    assert held.renewed == float("-inf") and not held.held()


def test_a_failing_client_loses_the_lease_after_its_ttl_without_an_exception(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client = Client()
    held = make(client)
    assert held.held()
    errors: list[Any] = []
    monkeypatch.setattr(threading, "excepthook", errors.append)
    client.fail = True
    assert held.keeper is not None
    held.keeper.join(2)
    assert not held.keeper.is_alive() and errors == []
    assert held.renewed == float("-inf")
