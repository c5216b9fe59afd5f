"""Event ids made by the bundled client, the simulator and the outbox: UUID version 7."""

from __future__ import annotations

import time
import uuid

from usermgmt.domain.events import UpdateEvent
from usermgmt.domain.ids import new_event_id
from usermgmt.workers.client.publisher import build_event


def test_a_version_7_uuid_carrying_its_millisecond() -> None:
    before = time.time_ns() // 1_000_000
    made = new_event_id()
    after = time.time_ns() // 1_000_000
    assert made.version == 7
    assert made.variant == uuid.RFC_4122
    assert before <= made.int >> 80 <= after


def test_ids_of_later_milliseconds_sort_after_earlier_ones_and_never_repeat() -> None:
    start = 1_764_000_000_000 * 1_000_000
    ids = [new_event_id(start + ms * 1_000_000) for ms in range(0, 2_000, 7)]
    assert [str(i) for i in ids] == sorted(str(i) for i in ids)
    same_ms = {new_event_id(start) for _ in range(10_000)}
    assert len(same_ms) == 10_000


def test_the_worker_accepts_them_and_the_client_makes_them() -> None:
    event = UpdateEvent.model_validate(
        {"event_id": str(new_event_id()), "session_id": "s1", "players": ["alice"]}
    )
    assert uuid.UUID(str(event.event_id)).version == 7  # kept as its canonical text
    built = build_event("update", {"session_id": "s1", "players": ["alice"]})
    assert uuid.UUID(str(built.event_id)).version == 7
