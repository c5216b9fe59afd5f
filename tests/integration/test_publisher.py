"""The publisher API for Python services: validated events the worker applies."""

from __future__ import annotations

import uuid

import orjson
import pytest

from tests.conftest import Backend
from tests.integration.helpers import dead_letters, drain, rows
from usermgmt.persistence import accounts
from usermgmt.workers.cli.commands.publish import parse_lines
from usermgmt.workers.client import publisher
from usermgmt.workers.client.publisher import InvalidEvent, Publisher
from usermgmt.workers.runtime.bootstrap import Services

RESULTS = [
    {"username": "alice", "outcome": "win", "earnings": 150},
    {"username": "bob", "outcome": "loss", "earnings": 0},
]


def register(services: Services, *names: str) -> None:
    for name in names:
        accounts.create_user(services.engine, name, "x" * 60, wallet=0)


def payloads(backend: Backend, stream: str) -> list[dict[str, object]]:
    return [orjson.loads(fields[b"payload"]) for _, fields in backend.redis.xrange(stream)]


def test_published_update_and_terminate_are_applied(services: Services, backend: Backend) -> None:
    register(services, "alice", "bob")
    client = Publisher(backend.redis, prefix=backend.prefix)
    update = client.update("eu-1", ["alice", "bob"], meta={"map": "dust"})
    done = client.terminate("eu-1", RESULTS)
    drain(services)

    assert rows(
        services,
        "SELECT u.username, s.win_count, s.loss_count, s.earnings, u.wallet FROM users u "
        "JOIN stats s ON s.user_id = u.id ORDER BY u.username",
    ) == [("alice", 1, 0, 150, 150), ("bob", 0, 1, 0, 0)]
    assert dead_letters(backend.redis, backend.keys) == []
    (sent,) = payloads(backend, backend.keys.update_stream)
    assert sent["event_id"] == str(update.event_id)
    assert sent["meta"] == {"map": "dust"}
    assert uuid.UUID(str(sent["event_id"])).version == 7  # time-ordered (domain.ids)
    assert payloads(backend, backend.keys.terminate_stream)[0]["event_id"] == str(done.event_id)


def test_the_same_event_id_published_twice_applies_once(
    services: Services, backend: Backend
) -> None:
    register(services, "alice", "bob")
    client = Publisher(backend.redis, prefix=backend.prefix)
    client.update("eu-2", ["alice", "bob"])
    event_id = uuid.uuid4()
    client.terminate("eu-2", RESULTS, event_id=event_id)
    client.terminate("eu-2", RESULTS, event_id=event_id)
    worker = drain(services)

    assert worker.stats.duplicates == 1
    assert rows(services, "SELECT count(*) FROM game_results") == [(2,)]
    assert rows(services, "SELECT wallet FROM users WHERE username = 'alice'") == [(150,)]


def test_a_batch_is_one_round_trip_in_order(services: Services, backend: Backend) -> None:
    register(services, "alice", "bob", "carol", "dave")
    client = Publisher(backend.redis, prefix=backend.prefix)
    with client.batch() as batch:
        batch.update("b-1", ["alice", "bob"])
        batch.update("b-2", ["carol", "dave"], status="waiting")
        batch.terminate("b-1", RESULTS)
        assert backend.redis.xlen(backend.keys.update_stream) == 0  # nothing sent yet
    assert len(batch.entry_ids) == 3
    sent = [fields[b"payload"] for _, fields in backend.redis.xrange(backend.keys.update_stream)]
    assert [orjson.loads(p)["session_id"] for p in sent] == ["b-1", "b-2"]
    drain(services)

    assert rows(services, "SELECT session_id, status FROM game_sessions ORDER BY session_id") == [
        ("b-1", "ended"),
        ("b-2", "waiting"),
    ]
    assert backend.redis.hget(backend.keys.session("b-2"), "status") == b"waiting"


def test_invalid_events_are_refused_before_anything_is_sent(backend: Backend) -> None:
    client = Publisher(backend.redis, prefix=backend.prefix)
    with pytest.raises(InvalidEvent, match="session_id"):
        client.update("has spaces", ["alice"])
    with pytest.raises(InvalidEvent, match="players"):
        client.update("s-1", ["alice", "ALICE"])
    with pytest.raises(InvalidEvent, match="earnings"):
        client.terminate("s-1", [{"username": "alice", "outcome": "win", "earnings": -1}])
    with pytest.raises(InvalidEvent, match="at least one result"):
        client.terminate("s-1", [])
    with pytest.raises(InvalidEvent), client.batch() as batch:
        batch.update("s-2", ["alice"])
        batch.update("s-3", [])  # the whole batch is dropped
    assert not backend.redis.exists(backend.keys.update_stream)
    assert not backend.redis.exists(backend.keys.terminate_stream)
    # An aborted game may have no results.
    client.terminate("s-1", [], reason="aborted")
    assert backend.redis.xlen(backend.keys.terminate_stream) == 1


def test_json_lines_keep_given_event_ids_add_missing_ones_and_number_errors() -> None:
    given = str(uuid.uuid4())
    lines = [
        orjson.dumps({"event_id": given, "session_id": "a", "players": ["alice"]}).decode(),
        "",
        '{"session_id": "b", "players": ["bob"]}',
        "{not json",
        '{"session_id": "c", "players": []}',
        "[1, 2]",
    ]
    events, errors = parse_lines(publisher.EventKind.UPDATE, lines)
    assert str(events[0].event_id) == given
    assert events[1].session_id == "b" and events[1].event_id is not None
    assert [number for number, _ in errors] == [4, 5, 6]
    assert "not JSON" in errors[0][1]
    assert "players" in errors[1][1]
    assert "JSON object" in errors[2][1]
