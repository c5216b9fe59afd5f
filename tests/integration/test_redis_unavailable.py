"""A Redis that restarts answers `-LOADING` until its data is back in memory.

Replies to packed writes (`CommandBatch`) are parsed by hiredis, which gives an error
reply's text only: they must still say "unreachable for now", as redis-py's own replies
do, so the worker backs off and tries again instead of stopping (the soak test's worker
once exited on one, its Redis restarted with an append-only file). The writes it lost
hold acks of committed entries: the consumer takes those entries back at once and acks
them as duplicates, caches written; on a cluster, no ack is sent after a node failed
the caches or dead letters before it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from hiredis import Reader
from redis import ConnectionPool, Redis
from redis.exceptions import BusyLoadingError, ResponseError

from bench.soak import RedisServer
from tests.conftest import Backend, make_settings
from tests.e2e.conftest import USERMGMT
from tests.integration.helpers import (
    add_players,
    another_client,
    dead_letters,
    drain,
    pending_count,
)
from tests.integration.rematch import PLAYERS, assert_exact, publish_games
from tests.integration.replay_helpers import wait_until
from usermgmt.persistence.command_batch import CommandBatch, InFlight
from usermgmt.persistence.db import make_engine, upgrade
from usermgmt.workers.auth.handlers import Handlers
from usermgmt.workers.auth.server import AuthServer
from usermgmt.workers.client.auth import AuthClient
from usermgmt.workers.events import consumer as consumer_module
from usermgmt.workers.events.consumer import EventConsumer
from usermgmt.workers.runtime.backoff import Backoff
from usermgmt.workers.runtime.bootstrap import Services
from usermgmt.workers.runtime.connections import REDIS_ERRORS

LOADING = "LOADING Redis is loading the dataset in memory"
# redis-py's handshake on connecting: HELLO (a RESP2 server does not know it), CLIENT SETINFO.
HANDSHAKE = {b"HELLO": b"-ERR unknown command 'HELLO'\r\n", b"CLIENT": b"+OK\r\n"}


@pytest.fixture
def answering() -> Iterator[tuple[list[str], int]]:
    """A server on a free port that answers each command with the error it is given
    (`errors[0]`), once redis-py's handshake is through."""
    errors = [LOADING]
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve(conn: socket.socket) -> None:
        reader = Reader()
        with conn:
            while data := conn.recv(65536):
                reader.feed(data)
                while (command := reader.gets()) is not False:
                    conn.sendall(HANDSHAKE.get(command[0].upper(), f"-{errors[0]}\r\n".encode()))

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield errors, port
    finally:
        listener.close()


def write_two(port: int) -> None:
    client = Redis(port=port, protocol=2)
    batch = CommandBatch()
    batch.add("HSET", "um:user:alice", "wallet", 5)
    batch.add("EXPIRE", "um:user:alice", 300)
    try:
        batch.send(client).wait()
    finally:
        client.close()


@pytest.mark.parametrize(
    "error",
    [
        LOADING,
        "MASTERDOWN Link with MASTER is down",
        "READONLY You can't write against a read only replica.",  # during a failover
    ],
)
def test_a_server_that_cannot_serve_yet_is_an_outage(
    answering: tuple[list[str], int], error: str
) -> None:
    errors, port = answering
    errors[0] = error
    with pytest.raises(REDIS_ERRORS) as raised:
        write_two(port)
    if error == LOADING:
        assert isinstance(raised.value, BusyLoadingError)
        assert str(raised.value) == "Redis is loading the dataset in memory"  # as redis-py has it
    else:
        assert str(raised.value) == error


def test_any_other_error_reply_is_a_failed_command(answering: tuple[list[str], int]) -> None:
    errors, port = answering
    errors[0] = "WRONGTYPE Operation against a key holding the wrong kind of value"
    with pytest.raises(ResponseError) as raised:
        write_two(port)
    assert not isinstance(raised.value, REDIS_ERRORS)
    assert str(raised.value).startswith("WRONGTYPE")


MAX_DELIVERIES = 5  # the default, which the test settings keep


def outages_reported(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every outage line the event consumer means to log, one a retry; retries 10-50 ms
    apart instead of 0.2 s doubling."""
    reported: list[str] = []
    real_wait_backoff = EventConsumer.wait_backoff

    def recording(consumer: EventConsumer, message: str) -> None:
        reported.append(message)
        real_wait_backoff(consumer, message)

    monkeypatch.setattr(EventConsumer, "wait_backoff", recording)
    monkeypatch.setattr(consumer_module, "Backoff", lambda: Backoff(first=0.01, cap=0.05))
    return reported


@pytest.mark.parametrize("loading_replies", [1, 3, MAX_DELIVERIES + 2])
def test_the_consumer_waits_out_a_redis_that_is_loading(
    services: Services,
    backend: Backend,
    answering: tuple[list[str], int],
    monkeypatch: pytest.MonkeyPatch,
    loading_replies: int,
) -> None:
    """The first writes of the caches, dead letters and acks (once, or several times in
    a row) reach a Redis that is loading and are answered `LOADING`: the consumer backs
    off and goes on. Every event applies exactly once, its caches written and its entry
    acked, and the one bad entry is dead-lettered once: taking back entries whose acks
    were lost counts no delivery, however often it happens."""
    add_players(services, *PLAYERS)
    keys = backend.keys
    bad, totals = publish_games([backend.redis, another_client(backend)], keys)

    # The first writes go to a server that is loading: none of them runs.
    _, port = answering
    loading = ConnectionPool(host="127.0.0.1", port=port, protocol=2)
    real_write = InFlight.write.__func__  # type: ignore[attr-defined]
    injected: list[int] = []

    def write(
        cls: type[InFlight], pool: Any, packed: bytes, count: int, *args: Any, **kwargs: Any
    ) -> InFlight:
        if count and len(injected) < loading_replies:
            injected.append(count)
            pool = loading
        return real_write(cls, pool, packed, count, *args, **kwargs)  # type: ignore[no-any-return]

    monkeypatch.setattr(InFlight, "write", classmethod(write))
    reported = outages_reported(monkeypatch)
    drain(services)

    assert len(injected) == loading_replies  # the replies did say LOADING
    # One report a batch of writes; on a cluster a batch writes to several nodes.
    assert 1 <= len(reported) <= loading_replies
    assert backend.cluster or len(reported) == loading_replies
    assert all("cannot serve writes now (Redis is loading" in line for line in reported)
    assert_exact(services, backend.redis, keys, totals)
    letters = dead_letters(backend.redis, keys)
    assert {(letter["reason"], letter["payload"]) for letter in letters} == {("unknown_user", bad)}
    # On a cluster the acks are on another node than the dead letters: when that node
    # fails after the dead letter was written, the retry writes it again (as after a
    # crash between the two). One Redis fails them all, or none.
    assert len(letters) == 1 or backend.cluster


def test_a_full_redis_pauses_the_consumer_and_acks_nothing(
    tmp_path: Path, sqlite_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Redis at its memory limit (`noeviction`) refuses the caches and dead letters
    but would take the acks: a batch's writes go in MULTI/EXEC, so none of them runs,
    and the consumer waits (no crash, nothing acked) until Redis has room again."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    redis = Redis(port=server.port)
    url = f"redis://127.0.0.1:{server.port}/0"
    upgrade(sqlite_url)
    backend = Backend("sqlite-private-redis", sqlite_url, redis, url, prefix)
    services = Services(
        settings=make_settings(backend),
        redis=redis,
        engine=make_engine(sqlite_url),
        keys=backend.keys,
    )
    reported = outages_reported(monkeypatch)
    producer = Redis(port=server.port)
    try:
        add_players(services, *PLAYERS)
        keys = backend.keys
        bad, totals = publish_games([redis, producer], keys)
        events = sum(int(redis.xlen(keys.event_stream(kind))) for kind in ("update", "terminate"))
        stop = threading.Event()
        worker = EventConsumer(services, "full", stop)
        worker.setup()  # its groups and leaderboard cache, made before Redis fills up
        redis.config_set("maxmemory-policy", "noeviction")
        redis.config_set("maxmemory", 1)
        thread = threading.Thread(target=worker.run, daemon=True)
        thread.start()
        try:
            wait_until(lambda: sum("maxmemory" in line for line in reported) >= 3)
            assert thread.is_alive()
            assert all("cannot serve writes now (command not allowed" in line for line in reported)
            assert worker.stats.applied == events - 1  # committed in SQL meanwhile
            assert pending_count(redis, keys) == events  # but none acked
            assert dead_letters(redis, keys) == []
            assert not any(redis.exists(keys.user(name)) for name in PLAYERS)

            redis.config_set("maxmemory", 0)
            wait_until(lambda: pending_count(redis, keys) == 0)
        finally:
            stop.set()
            thread.join(10)
        assert not thread.is_alive()
        assert_exact(services, redis, keys, totals)
        letters = dead_letters(redis, keys)
        assert [(letter["reason"], letter["payload"]) for letter in letters] == [
            ("unknown_user", bad)
        ]
    finally:
        services.engine.dispose()
        producer.close()
        redis.close()
        server.stop()


def test_a_replica_is_waited_for_until_it_is_promoted(tmp_path: Path) -> None:
    """A worker pointed at a replica (a failover not finished yet): one line saying the
    server cannot take writes now, no traceback; it serves once the node is promoted."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        Redis(port=server.port).replicaof("127.0.0.1", 1)  # a master that never answers
        env = {
            **os.environ,
            "USERMGMT_REDIS_URL": f"redis://127.0.0.1:{server.port}/0",
            "USERMGMT_DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite'}",
            "USERMGMT_BCRYPT_ROUNDS": "4",
            "USERMGMT_LOG_FORMAT": "json",
        }
        subprocess.run([*USERMGMT, "migrate"], env=env, capture_output=True, check=True)
        worker = subprocess.Popen(
            [*USERMGMT, "worker"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        time.sleep(2)
        Redis(port=server.port).replicaof("NO", "ONE")
        client = AuthClient(Redis(port=server.port), timeout=20)
        assert client.register("alice", "Correct-Horse-9")["username"] == "alice"
        worker.send_signal(signal.SIGTERM)
        output, _ = worker.communicate(timeout=30)
        assert worker.returncode == 0, output
        assert "Traceback" not in output
        assert "cannot serve writes now" in output and "read only replica" in output
    finally:
        server.stop()


def test_a_reply_refused_by_a_full_redis_leaves_the_request_pending_until_answered(
    tmp_path: Path, sqlite_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis reaches its memory limit (`noeviction`) while a request is served: it
    refuses the reply but would run the ack and delete. Sent as one transaction, nothing
    runs, and the request is answered once Redis takes writes again."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    redis = Redis(port=server.port)
    upgrade(sqlite_url)
    url = f"redis://127.0.0.1:{server.port}/0"
    backend = Backend("sqlite-private-redis", sqlite_url, redis, url, prefix)
    engine = make_engine(sqlite_url)
    services = Services(make_settings(backend), redis, engine, backend.keys)
    keys = backend.keys
    real_answer = Handlers.answer

    def answer_then_fill(handlers: Handlers, request: Any, pipe: Any, entry_id: str) -> Any:
        reply = real_answer(handlers, request, pipe, entry_id)
        if not filled:
            filled.append(True)
            redis.config_set("maxmemory", 1)  # full from now on: writes refused
        return reply

    filled: list[bool] = []
    monkeypatch.setattr(Handlers, "answer", answer_then_fill)
    stop = threading.Event()
    try:
        request_id = uuid.uuid4()
        request = {"request_id": str(request_id), "op": "get_user", "username": "nobody"}
        thread = threading.Thread(target=AuthServer(services, "a1", stop).run, daemon=True)
        thread.start()
        redis.xadd(keys.auth_requests, {"payload": orjson.dumps(request)})
        wait_until(lambda: filled, timeout=10)
        time.sleep(1.5)  # refused, and taken back at least once
        assert not redis.exists(keys.reply(request_id))
        assert redis.xlen(keys.auth_requests) == 1  # neither acked nor deleted
        redis.config_set("maxmemory", 0)
        popped = redis.blpop([keys.reply(request_id)], timeout=15)
        assert popped is not None and orjson.loads(popped[1])["error"]["code"] == "not_found"
        wait_until(lambda: redis.xlen(keys.auth_requests) == 0, timeout=15)
        time.sleep(1.5)
        assert not redis.exists(keys.reply(request_id))  # one reply, popped: no second
    finally:
        stop.set()
        engine.dispose()
        server.stop()
