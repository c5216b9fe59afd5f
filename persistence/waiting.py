"""The `waiting_events` table: game events waiting for what they depend on; and
`dead_events`, the dead-letter decisions of the rules.

Written in the same transaction as the decisions that made them wait or set them
free, so every worker (and a replay) sees the same waiting entries and decides
them again when their turn comes; `usermgmt status` reads it too.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import NamedTuple

from sqlalchemy import Connection

from usermgmt.domain.errors import DeadLetterReason
from usermgmt.domain.games import Decision, Outcome, PlannedEntry
from usermgmt.domain.waiting import Waiter
from usermgmt.persistence.sql import Driver, chunks, marks


class StoredWaiter(NamedTuple):
    """A waiting entry as recorded: enough to decide it again."""

    stream: str  # update | terminate
    entry_id: str
    payload: bytes
    waits_for: str


def load_waiting(conn: Connection) -> list[StoredWaiter]:
    """Every waiting entry, oldest first (usually none)."""
    rows = Driver(conn).rows("SELECT stream, entry_id, payload, waits_for FROM waiting_events")
    return [
        StoredWaiter(str(stream), str(entry_id), str(payload).encode(), str(waits_for))
        for stream, entry_id, payload, waits_for in rows
    ]


def save_waiting(
    conn: Connection, added: Sequence[Waiter], removed: Sequence[PlannedEntry]
) -> None:
    """Record new (or changed) waiters and forget the decided ones."""
    if not added and not removed:
        return
    db = Driver(conn)
    gone = [(w.entry.stream_kind, w.entry.entry_id) for w in added]
    gone += [(entry.stream_kind, entry.entry_id) for entry in removed]
    for stream in {kind for kind, _ in gone}:
        ids = sorted({entry_id for kind, entry_id in gone if kind == stream})
        for chunk in chunks(ids):
            where = f"stream = ? AND entry_id IN ({marks(len(chunk))})"
            db.run(f"DELETE FROM waiting_events WHERE {where}", (stream, *chunk))  # noqa: S608
    db.many(
        "INSERT INTO waiting_events (stream, entry_id, event_id, session_id, payload, "
        "waits_for, since) VALUES (?, ?, ?, ?, ?, ?, ?)",
        [
            (
                w.entry.stream_kind,
                w.entry.entry_id,
                w.entry.event_id,
                w.entry.event.session_id,
                (w.entry.payload or b"").decode(),
                w.waits_for,
                db.time(datetime.fromtimestamp(w.entry.ms / 1000, UTC)),
            )
            for w in added
        ],
    )


def waiting_keys(conn: Connection) -> set[tuple[str, str]]:
    """(stream kind, entry id) of every waiting entry."""
    rows = Driver(conn).rows("SELECT stream, entry_id FROM waiting_events")
    return {(str(stream), str(entry_id)) for stream, entry_id in rows}


class WaitingSummary(NamedTuple):
    """How many entries wait, and the oldest one (for `usermgmt status`)."""

    entries: int
    oldest_entry_id: str | None
    oldest_stream: str | None
    oldest_since: datetime | None
    oldest_waits_for: str | None


def waiting_summary(conn: Connection) -> WaitingSummary:
    db = Driver(conn)
    ((count,),) = db.rows("SELECT COUNT(*) FROM waiting_events")
    oldest = db.rows(
        "SELECT stream, entry_id, since, waits_for FROM waiting_events "
        "ORDER BY since, stream, entry_id LIMIT 1"
    )
    if not oldest:
        return WaitingSummary(int(count), None, None, None, None)
    stream, entry_id, since, waits_for = oldest[0]
    moment = db.read_time(since)
    return WaitingSummary(int(count), str(entry_id), str(stream), moment, str(waits_for))


def load_dead(conn: Connection, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], Decision]:
    """The recorded dead-letter decisions of these (stream kind, entry id)s."""
    found: dict[tuple[str, str], Decision] = {}
    db = Driver(conn)
    for stream in {kind for kind, _ in keys}:
        ids = sorted({entry_id for kind, entry_id in keys if kind == stream})
        for chunk in chunks(ids):
            where = f"stream = ? AND entry_id IN ({marks(len(chunk))})"
            for entry_id, reason, message in db.rows(
                f"SELECT entry_id, reason, message FROM dead_events WHERE {where}",  # noqa: S608
                (stream, *chunk),
            ):
                decision = Decision(Outcome.DEAD, DeadLetterReason(reason), str(message))
                found[(stream, str(entry_id))] = decision
    return found


def save_dead(conn: Connection, decided: Sequence[tuple[PlannedEntry, Decision]]) -> None:
    """Record the dead-letter decisions of a batch (with its effects, in its transaction)."""
    save_dead_rows(
        conn,
        [
            (entry.stream_kind, entry.entry_id, str(decision.reason), decision.message)
            for entry, decision in decided
            if decision.outcome is Outcome.DEAD
        ],
    )


def save_dead_rows(conn: Connection, rows: list[tuple[str, str, str, str]]) -> None:
    """Record dead-letter decisions as (stream kind, entry id, reason, message); a
    decision already recorded stays as it is."""
    Driver(conn).many(
        "INSERT INTO dead_events (stream, entry_id, reason, message) VALUES (?, ?, ?, ?) "
        "ON CONFLICT (stream, entry_id) DO NOTHING",
        rows,
    )


def decided_already(
    conn: Connection, entries: Sequence[tuple[str, str, str]]
) -> set[tuple[str, str]]:
    """Of these (stream kind, entry id, event id)s, the entries with a committed decision:
    their event applied (under any entry), or the entry dead-lettered by the planner."""
    db = Driver(conn)
    event_ids = sorted({event_id for _, _, event_id in entries})
    applied: set[str] = set()
    for chunk in chunks(event_ids):
        where = f"event_id IN ({marks(len(chunk))})"
        applied.update(
            str(row[0])
            for row in db.rows(f"SELECT event_id FROM processed_events WHERE {where}", chunk)  # noqa: S608
        )
    dead = load_dead(conn, [(kind, entry_id) for kind, entry_id, _ in entries])
    return {
        (kind, entry_id)
        for kind, entry_id, event_id in entries
        if event_id in applied or (kind, entry_id) in dead
    }
