"""Every dead-letter reason, with the DLQ payload fields, and the entry acked.

See docs/protocol.md, "Dead letters".
"""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

from tests.conftest import Backend
from tests.integration.helpers import (
    add_players,
    dead_letters,
    drain,
    pending_count,
    publish,
    rows,
    services_for,
    standings,
)
from usermgmt.domain.games import BIGINT_MAX
from usermgmt.workers.events import batch as batch_module

DLQ_FIELDS = {"stream", "entry_id", "payload", "reason", "message", "deliveries", "failed_at"}


def raw(backend: Backend, kind: str, payload: bytes) -> tuple[str, str]:
    """XADD a payload exactly as given; returns (entry id, payload text)."""
    entry_id = backend.redis.xadd(backend.keys.event_stream(kind), {"payload": payload})
    return entry_id.decode(), payload.decode("utf-8", "replace")


def event(backend: Backend, kind: str, **body: Any) -> tuple[str, str]:
    body.setdefault("event_id", str(uuid.uuid4()))
    return raw(backend, kind, orjson.dumps(body))


def test_every_reason_is_dead_lettered_with_its_fields_and_acked(backend: Backend) -> None:
    keys = backend.keys
    with services_for(backend, max_deliveries=3, max_wait_s=0.3) as services:
        add_players(services, "alice", "bob", "carol")
        # A finished game and a live one to break the rules against.
        publish(backend.redis, keys, "update", session_id="done", players=["alice"])
        publish(
            backend.redis,
            keys,
            "terminate",
            session_id="done",
            results=[{"username": "alice", "outcome": "win", "earnings": 10}],
        )
        publish(backend.redis, keys, "update", session_id="live", players=["bob"])
        drain(services)
        before = standings(services)
        started = datetime.now(UTC) - timedelta(seconds=1)

        # (stream, entry id) -> (reason, payload): ids can repeat across the two streams.
        expected: dict[tuple[str, str], tuple[str, str]] = {}

        def expect(reason: str, kind: str, published: tuple[str, str]) -> None:
            expected[(keys.event_stream(kind), published[0])] = (reason, published[1])

        expect("invalid_json", "update", raw(backend, "update", b'{"event_id": "x", oops'))
        expect("invalid_json", "terminate", raw(backend, "terminate", b"\xff\xfe not text"))
        expect("invalid_event", "update", raw(backend, "update", b"[1, 2, 3]"))
        expect(
            "invalid_event",
            "update",
            event(backend, "update", session_id="bad id!", players=["alice"]),
        )
        expect(
            "invalid_event",
            "terminate",
            event(
                backend,
                "terminate",
                session_id="live",
                results=[{"username": "bob", "outcome": "draw", "earnings": 1}],
            ),
        )
        expect(
            "unknown_user",
            "update",
            event(backend, "update", session_id="s9", players=["carol", "nobody"]),
        )
        expect(
            "unknown_user",
            "terminate",
            event(
                backend,
                "terminate",
                session_id="live",
                results=[{"username": "ghost", "outcome": "win", "earnings": 5}],
            ),
        )
        expect(
            "not_in_roster",
            "terminate",
            event(
                backend,
                "terminate",
                session_id="live",
                results=[
                    {"username": "bob", "outcome": "win", "earnings": 5},
                    {"username": "carol", "outcome": "loss", "earnings": 0},
                ],
            ),
        )
        expect(
            "session_ended",
            "terminate",
            event(
                backend,
                "terminate",
                session_id="done",
                results=[{"username": "alice", "outcome": "win", "earnings": 10}],
            ),
        )
        expect(
            "session_ended",
            "update",
            event(backend, "update", session_id="done", players=["alice"]),
        )
        expect(  # waits for its session's first update, which never comes
            "wait_timeout",
            "terminate",
            event(
                backend,
                "terminate",
                session_id="never-started",
                results=[{"username": "carol", "outcome": "win", "earnings": 5}],
            ),
        )
        # An entry without a payload field at all.
        no_payload = backend.redis.xadd(keys.update_stream, {"data": b"{}"}).decode()
        expected[(keys.update_stream, no_payload)] = ("invalid_event", "")

        first = drain(services)
        time.sleep(0.4)  # past max_wait_s: the next pass times the waiting entry out
        worker = drain(services)

        letters = dead_letters(backend.redis, keys)
        assert {(d["stream"], d["entry_id"]): d["reason"] for d in letters} == {
            key: reason for key, (reason, _) in expected.items()
        }
        for letter in letters:
            assert set(letter) == DLQ_FIELDS
            _, payload = expected[(letter["stream"], letter["entry_id"])]
            assert letter["payload"] == payload  # the original text
            assert isinstance(letter["message"], str) and letter["message"]
            failed_at = datetime.fromisoformat(letter["failed_at"])
            assert started <= failed_at <= datetime.now(UTC)
            assert letter["deliveries"] == 1  # waiting counted no delivery
        # Each message says what was wrong.
        by_reason = {letter["reason"]: letter["message"] for letter in letters}
        assert "nobody" in by_reason["unknown_user"] or "ghost" in by_reason["unknown_user"]
        assert "carol" in by_reason["not_in_roster"]
        assert "done" in by_reason["session_ended"]

        dead = first.stats.dead + worker.stats.dead
        assert sum(dead.values()) == len(expected) and dead["wait_timeout"] == 1
        assert pending_count(backend.redis, keys) == 0  # every dead letter was acked
        assert standings(services) == before  # and none of them changed anything
        # The live session is untouched by the entries that broke its rules.
        assert backend.redis.exists(keys.session("live"))


def test_a_result_taking_a_wallet_past_bigint_is_dead_lettered_alike_on_each_database(
    backend: Backend,
) -> None:
    """SQLite would turn the wallet into a float and PostgreSQL refuse the batch until
    `max_deliveries`: the planner decides it first, the same way on both."""
    keys = backend.keys
    with services_for(backend) as services:
        add_players(services, "alice", "bob", wallet=BIGINT_MAX - 5)
        publish(backend.redis, keys, "update", session_id="rich", players=["alice", "bob"])
        results = [{"username": "alice", "outcome": "win", "earnings": 6}]
        too_much = publish(backend.redis, keys, "terminate", session_id="rich", results=results)
        results = [{"username": "alice", "outcome": "win", "earnings": 5}]
        publish(backend.redis, keys, "terminate", session_id="rich", results=results)
        drain(services)
        [letter] = dead_letters(backend.redis, keys)
        assert (letter["entry_id"], letter["reason"]) == (too_much, "invalid_event")
        assert "alice" in letter["message"] and letter["deliveries"] == 1
        wallets = rows(services, "SELECT username, wallet FROM users ORDER BY id")
        assert wallets == [("alice", BIGINT_MAX), ("bob", BIGINT_MAX - 5)]  # ints, exact
        assert standings(services)["alice"][:3] == (1, 0, 5)


def test_dead_letters_are_written_once(backend: Backend) -> None:
    """A dead-lettered entry is acked in the same round trip: a restart does not repeat it."""
    keys = backend.keys
    with services_for(backend) as services:
        raw(backend, "update", b"not json")
        drain(services, consumer="c1")
        drain(services, consumer="c1")
        drain(services, consumer="c2")
        assert [d["reason"] for d in dead_letters(backend.redis, keys)] == ["invalid_json"]
        assert pending_count(backend.redis, keys) == 0


def test_an_entry_the_parser_fails_on_unexpectedly_is_dead_lettered_not_a_crash(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug reading one payload (here a parser that raises on it) must not stop the
    worker, nor come back at every restart: the entry is dead-lettered, the rest applied."""
    real_parse = batch_module.parse_event

    def fragile_parse(kind: Any, payload: Any) -> Any:
        if b"fragile" in payload:
            raise RecursionError("maximum recursion depth exceeded")
        return real_parse(kind, payload)

    monkeypatch.setattr(batch_module, "parse_event", fragile_parse)
    keys = backend.keys
    with services_for(backend) as services:
        add_players(services, "alice")
        event(backend, "update", session_id="fragile", players=["alice"])
        event(backend, "update", session_id="fine", players=["alice"])
        drain(services)
        (letter,) = dead_letters(backend.redis, keys)
        assert (letter["reason"], letter["message"]) == (
            "invalid_event",
            "the payload could not be read (RecursionError)",
        )
        assert rows(services, "SELECT session_id FROM game_sessions") == [("fine",)]
        assert pending_count(backend.redis, keys) == 0
