"""One live worker per consumer name: the heartbeat key is the name's claim."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import structlog
from structlog.testing import capture_logs

from tests.conftest import Backend
from tests.integration.helpers import publish
from tests.integration.replay_helpers import wait_until
from usermgmt.persistence.keys import EVENTS_GROUP
from usermgmt.workers.runtime import consumer_name
from usermgmt.workers.runtime.bootstrap import Services
from usermgmt.workers.runtime.consumer_name import NameClaim, NameTaken, beat_of
from usermgmt.workers.runtime.redis_info import group_infos
from usermgmt.workers.runtime.runner import Worker

NAME = "shared-name"


def other_worker(host: str = "other-host", pid: int = 4242, **more: Any) -> dict[str, Any]:
    return {"host": host, "pid": pid, "at": time.time(), "instance": "twin", **more}


@pytest.fixture
def twin(backend: Backend) -> Iterator[threading.Event]:
    """A live worker of another host under NAME, beating five times a second."""
    stop = threading.Event()
    key = backend.keys.heartbeat(NAME)

    def beat() -> None:
        while not stop.is_set():
            backend.redis.set(key, orjson.dumps(other_worker()), ex=15)
            stop.wait(0.2)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    wait_until(lambda: backend.redis.exists(key))
    yield stop
    stop.set()
    thread.join(5)


def run_in_thread(worker: Worker) -> threading.Thread:
    thread = threading.Thread(target=worker.run, kwargs={"handle_signals": False}, daemon=True)
    thread.start()
    return thread


def heartbeat(backend: Backend) -> dict[str, Any]:
    return beat_of(backend.redis.get(backend.keys.heartbeat(NAME)))


def test_a_worker_refuses_the_name_of_a_live_one_and_reads_nothing(
    services: Services, backend: Backend, twin: threading.Event
) -> None:
    publish(backend.redis, backend.keys, "update", session_id="s1", players=["alice"])
    with pytest.raises(NameTaken) as refused:
        Worker(services, NAME).run(handle_signals=False)
    assert str(refused.value) == (
        f"another worker is running as consumer {NAME!r} (pid 4242 on other-host); "
        "give this one another --consumer name"
    )
    assert heartbeat(backend)["instance"] == "twin"  # the live worker's claim stands
    for group in group_infos(backend.redis, backend.keys.update_stream):
        assert group.name != EVENTS_GROUP or group.pending == 0
        assert NAME not in [consumer.name for consumer in group.consumers]


def test_a_heartbeat_that_stands_still_is_taken_over_once_watched(
    services: Services, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker that crashed on another host: its heartbeat is watched, then taken."""
    monkeypatch.setattr(consumer_name, "CONFIRM_S", 0.5)
    key = backend.keys.heartbeat(NAME)
    backend.redis.set(key, orjson.dumps(other_worker()), ex=15)
    worker = Worker(services, NAME, only="auth")
    thread = run_in_thread(worker)
    try:
        wait_until(lambda: heartbeat(backend).get("instance") == worker.name.instance)
    finally:
        worker.stop.set()
        thread.join(30)
    assert not thread.is_alive() and not worker.failed
    assert not backend.redis.exists(key)  # a clean stop gives the name back


def test_the_heartbeat_of_a_dead_process_of_this_host_is_taken_over_at_once(
    services: Services, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker restarted after a crash on the same host does not wait to take its name."""
    monkeypatch.setattr(consumer_name, "CONFIRM_S", 600.0)  # a watch would time the test out
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    dead = other_worker(host=socket.gethostname(), pid=int(gone.stdout))
    backend.redis.set(backend.keys.heartbeat(NAME), orjson.dumps(dead), ex=15)
    worker = Worker(services, NAME, only="auth")
    thread = run_in_thread(worker)
    try:
        wait_until(lambda: heartbeat(backend).get("instance") == worker.name.instance, 20)
    finally:
        worker.stop.set()
        thread.join(30)
    assert not worker.failed


def test_a_beat_that_replaces_another_workers_heartbeat_says_so_once(backend: Backend) -> None:
    key = backend.keys.heartbeat(NAME)
    claim = NameClaim(backend.redis, key, NAME, threading.Event(), structlog.get_logger())
    with capture_logs() as logs:
        claim.beat({"at": 1})
        backend.redis.set(key, orjson.dumps(other_worker()))
        claim.beat({"at": 2})
        backend.redis.set(key, orjson.dumps(other_worker()))
        claim.beat({"at": 3})
    errors = [log for log in logs if log["log_level"] == "error"]
    assert [(e["event"], e["other_host"], e["other_pid"]) for e in errors] == [
        ("another worker is also running as this consumer; stop one of them", "other-host", 4242)
    ]
    assert heartbeat(backend) == {"at": 3, "instance": claim.instance}
    claim.release()
    assert not backend.redis.exists(key)


def test_release_leaves_another_workers_heartbeat(backend: Backend) -> None:
    key = backend.keys.heartbeat(NAME)
    claim = NameClaim(backend.redis, key, NAME, threading.Event(), structlog.get_logger())
    backend.redis.set(key, orjson.dumps(other_worker()))
    claim.release()
    assert heartbeat(backend)["instance"] == "twin"


def test_unreadable_heartbeats_read_as_none() -> None:
    assert beat_of(None) == {} and beat_of(b"not json") == {} and beat_of(b"[1]") == {}
    assert beat_of(b'{"pid": 1}') == {"pid": 1}
