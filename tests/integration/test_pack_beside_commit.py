"""A batch's cache writes are packed on a helper thread while its COMMIT runs, and
handed back only with a committed batch; a packing that fails costs no commit."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa

from usermgmt.domain.events import EventKind, UpdateEvent
from usermgmt.domain.games import PlannedEntry, World
from usermgmt.domain.planner import Plan
from usermgmt.domain.waiting import Limits
from usermgmt.persistence.accounts import create_user
from usermgmt.persistence.cache import CommandBatch
from usermgmt.persistence.db import make_engine, upgrade
from usermgmt.workers.events.store import EventStore

STREAMS = {EventKind.UPDATE: "um:{events}:update", EventKind.TERMINATE: "um:{events}:terminate"}


@pytest.fixture(params=["sqlite", "postgres"])
def engine(request: pytest.FixtureRequest) -> Iterator[sa.Engine]:
    url: str = request.getfixturevalue(f"{request.param}_url")
    upgrade(url)
    engine = make_engine(url)
    for name in ("alice", "bob_22", "carol", "dave_44"):
        create_user(engine, name, "$2b$04$" + "x" * 53, 0)
    yield engine
    engine.dispose()


def planned(
    session_id: str, *players: str, entry_id: str = "1700000000000-0"
) -> list[PlannedEntry]:
    event = UpdateEvent(event_id=uuid.uuid4(), session_id=session_id, players=list(players))
    return [PlannedEntry(event, EventKind.UPDATE, entry_id)]


def live_sessions(engine: sa.Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.execute(sa.text("SELECT session_id FROM game_sessions")).scalars())


def test_the_caches_are_packed_on_the_helper_while_the_batch_commits(engine: sa.Engine) -> None:
    store = EventStore(engine, STREAMS, Limits())
    seen: list[tuple[str, list[str]]] = []

    def pack(plan: Plan, world: World) -> CommandBatch:
        seen.append((threading.current_thread().name, sorted(plan.changes.sessions)))
        writes = CommandBatch()
        writes.add("HSET", "um:session:s1", "status", "in_progress")
        return writes

    try:
        applied = store.apply(planned("s1", "alice", "bob_22"), None, datetime.now(UTC), pack)
    finally:
        store.close()
    assert seen == [(seen[0][0], ["s1"])]
    assert seen[0][0].startswith("usermgmt-pack")
    assert applied.caches is not None and applied.caches.count == 1
    assert live_sessions(engine) == ["s1"]
    assert store.helper is None  # closed with the connection


def test_a_failed_packing_leaves_the_commit_and_the_packing_to_the_caller(
    engine: sa.Engine,
) -> None:
    store = EventStore(engine, STREAMS, Limits())

    def pack(plan: Plan, world: World) -> CommandBatch:
        raise RuntimeError("a bug in the packing")

    try:
        applied = store.apply(planned("s2", "alice", "bob_22"), None, datetime.now(UTC), pack)
        later = planned("s3", "carol", "dave_44", entry_id="1700000000001-0")
        again = store.apply(later, None, datetime.now(UTC))  # no packer: none packed
    finally:
        store.close()
    assert applied.caches is None
    assert again.caches is None
    assert sorted(live_sessions(engine)) == ["s2", "s3"]
