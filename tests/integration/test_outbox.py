"""The transactional outbox: a registration and its event commit together; the relay
publishes each once, in order, and a replay recognises a copy published twice."""

from __future__ import annotations

import threading
from typing import Any

import orjson
import pytest
import sqlalchemy as sa

from tests.conftest import Backend
from tests.integration.helpers import rows, services_for
from tests.integration.replay_helpers import wait_until
from usermgmt.persistence import accounts, outbox
from usermgmt.persistence.db import make_engine, upgrade
from usermgmt.workers.auth.relay import Relay
from usermgmt.workers.ops.replay import Replayer
from usermgmt.workers.runtime.bootstrap import Services
from usermgmt.workers.runtime.runner import Worker

HASH = "$2b$04$" + "h" * 53


def stream_payloads(services: Services) -> list[dict[str, Any]]:
    return [
        orjson.loads(fields[b"payload"])
        for _, fields in services.redis.xrange(services.keys.accounts_stream)
    ]


def test_a_registration_commits_its_outbox_row(services: Services) -> None:
    user = accounts.create_user(services.engine, "Alice", HASH, wallet=25)
    [(kind, payload, published)] = rows(services, "SELECT kind, payload, published_at FROM outbox")
    event = orjson.loads(payload)
    assert kind == "accounts" and published is None
    assert set(event) == {
        "event_id",
        "user_id",
        "username",
        "password_hash",
        "wallet",
        "created_at",
    }
    assert (event["user_id"], event["username"], event["password_hash"], event["wallet"]) == (
        user.id,
        "Alice",
        HASH,
        25,
    )
    [(created_at,)] = rows(services, "SELECT created_at FROM users")
    assert event["created_at"].startswith(str(created_at)[:19].replace(" ", "T"))


def test_a_failure_before_commit_leaves_neither_row(
    services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = outbox.add_registration

    def crash_after_writing(*args: Any, **kwargs: Any) -> None:
        original(*args, **kwargs)
        raise RuntimeError("crash before the commit")

    monkeypatch.setattr(outbox, "add_registration", crash_after_writing)
    with pytest.raises(RuntimeError):
        accounts.create_user(services.engine, "alice", HASH, wallet=0)
    for table in ("users", "stats", "leaderboard", "outbox"):
        assert rows(services, f"SELECT COUNT(*) FROM {table}") == [(0,)]  # noqa: S608


def test_a_taken_username_leaves_no_outbox_row(services: Services) -> None:
    accounts.create_user(services.engine, "alice", HASH, wallet=0)
    with pytest.raises(accounts.UsernameTaken):
        accounts.create_user(services.engine, "ALICE", HASH, wallet=0)
    assert rows(services, "SELECT COUNT(*) FROM outbox") == [(1,)]


def test_the_relay_publishes_each_registration_once_across_restarts(
    services: Services,
) -> None:
    for name in ("alice", "bob", "carol"):
        accounts.create_user(services.engine, name, HASH, wallet=0)
    assert Relay(services, threading.Event()).publish_pending() == 3
    assert Relay(services, threading.Event()).publish_pending() == 0  # a restarted relay
    accounts.create_user(services.engine, "dave", HASH, wallet=0)
    assert Relay(services, threading.Event(), batch=2).publish_pending() == 1

    published = stream_payloads(services)
    assert [p["username"] for p in published] == ["alice", "bob", "carol", "dave"]
    assert [p["user_id"] for p in published] == [1, 2, 3, 4]
    entries = [
        entry_id.decode() for entry_id, _ in services.redis.xrange(services.keys.accounts_stream)
    ]
    marked = rows(
        services, "SELECT entry_id FROM outbox WHERE published_at IS NOT NULL ORDER BY id"
    )
    assert [entry_id for (entry_id,) in marked] == entries
    assert rows(
        services,
        "SELECT last_entry_id FROM stream_checkpoints WHERE stream = :s",
        s=services.keys.accounts_stream,
    ) == [(entries[-1],)]


def test_two_workers_relays_publish_each_registration_once(
    services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each worker process has a relay; passes that overlap sent the same rows twice (the
    outside check: 150 registrations, 205-249 accounts entries with two workers)."""
    for index in range(40):
        accounts.create_user(services.engine, f"player{index}", HASH, wallet=0)
    real_unpublished = outbox.unpublished
    both_read = threading.Barrier(2, timeout=2)

    def unpublished_together(engine: sa.Engine, limit: int) -> list[outbox.OutboxRow]:
        found = real_unpublished(engine, limit)
        try:
            both_read.wait()  # without the relay lock both read the same rows here
        except threading.BrokenBarrierError:
            pass  # the other relay waits for the lock: only one reads at a time
        return found

    monkeypatch.setattr(outbox, "unpublished", unpublished_together)
    relays = [Relay(services, threading.Event(), batch=7) for _ in range(2)]
    counts: list[int] = []
    threads = [
        threading.Thread(target=lambda r=relay: counts.append(r.publish_pending()))
        for relay in relays
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sum(counts) == 40
    assert [p["user_id"] for p in stream_payloads(services)] == list(range(1, 41))
    assert not services.redis.exists(services.keys.accounts_relay)


def test_relay_batches_publish_everything_in_id_order(services: Services) -> None:
    for index in range(7):
        accounts.create_user(services.engine, f"player{index}", HASH, wallet=0)
    assert Relay(services, threading.Event(), batch=3).publish_pending() == 7
    assert [p["user_id"] for p in stream_payloads(services)] == list(range(1, 8))
    assert outbox.count_unpublished(services.engine) == 0


def test_a_crash_between_publish_and_mark_publishes_again_and_replay_counts_a_duplicate(
    services: Services, backend: Backend, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    for name in ("alice", "bob"):
        accounts.create_user(services.engine, name, HASH, wallet=5)

    def crash(*_args: Any, **_kwargs: Any) -> None:
        raise sa.exc.OperationalError("UPDATE outbox", {}, Exception("disk I/O error"))

    with monkeypatch.context() as patch:
        patch.setattr(outbox, "mark_published", crash)
        with pytest.raises(sa.exc.OperationalError):
            Relay(services, threading.Event()).publish_pending()
    assert services.redis.xlen(services.keys.accounts_stream) == 2
    assert Relay(services, threading.Event()).publish_pending() == 2  # at least once
    assert services.redis.xlen(services.keys.accounts_stream) == 4

    url = f"sqlite:///{tmp_path / 'replayed.db'}"
    upgrade(url)
    target = Services(services.settings, services.redis, make_engine(url), services.keys)
    summary = Replayer(target.redis, target.keys, target.engine).run()
    assert (summary.applied, summary.duplicates) == (2, 2)
    assert rows(target, "SELECT id, username, wallet FROM users ORDER BY id") == [
        (1, "alice", 5),
        (2, "bob", 5),
    ]
    target.engine.dispose()


def test_register_publishes_before_it_replies(services: Services) -> None:
    from usermgmt.domain.auth import parse_request
    from usermgmt.workers.auth.server import AuthServer

    relay = Relay(services, threading.Event())
    server = AuthServer(services, "c1", threading.Event(), relay=relay)
    request = parse_request(
        orjson.dumps(
            {
                "request_id": "6f1c2b9e-1d3a-4e5f-8a7b-9c0d1e2f3a4b",
                "op": "register",
                "username": "alice",
                "password": "correct-horse",
            }
        )
    )
    reply = server.handlers.register(request, "1-0")  # type: ignore[arg-type]
    server.pool.shutdown()
    assert reply["ok"]
    [event] = stream_payloads(services)
    assert event["username"] == "alice" and event["user_id"] == reply["user"]["id"]
    assert "password" not in event and event["password_hash"].startswith("$2b$")
    assert outbox.count_unpublished(services.engine) == 0


def test_the_worker_runs_the_relay(backend: Backend) -> None:
    with services_for(backend, trim_interval_s=0) as services:
        worker = Worker(services, "relay-test", only="auth")
        thread = threading.Thread(target=worker.run, kwargs={"handle_signals": False})
        thread.start()
        try:
            accounts.create_user(services.engine, "late", HASH, wallet=0)  # outside the auth server
            wait_until(lambda: services.redis.xlen(services.keys.accounts_stream) == 1)
        finally:
            worker.stop.set()
            thread.join(30)
        assert not thread.is_alive()
        assert stream_payloads(services)[0]["username"] == "late"
        assert outbox.count_unpublished(services.engine) == 0
