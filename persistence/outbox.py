"""The transactional outbox: events committed with their effect, published later by the relay.

`add_registration` runs inside the transaction that creates the user, so the user
row and its event exist together or not at all. The relay reads `unpublished` rows
in id order, XADDs them, and `mark_published` records the entry ids — together with
the accounts stream's checkpoint — in one transaction.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, DateTime, Engine, bindparam, insert, select, text

from usermgmt.domain.registrations import ACCOUNTS, registration
from usermgmt.persistence.db import IMMEDIATE
from usermgmt.persistence.games import save_checkpoints
from usermgmt.persistence.models import OutboxEvent

# Timestamps bound through the column type, so they are stored as the ORM stores them.
_NOW = bindparam("now", type_=DateTime(timezone=True))


@dataclass(frozen=True)
class OutboxRow:
    """One event waiting to be published."""

    id: int
    kind: str
    payload: str


def add_registration(
    conn: Connection,
    *,
    user_id: int,
    username: str,
    password_hash: str,
    wallet: int,
    created_at: datetime,
) -> None:
    """Record a registration event in the caller's transaction (the user's own)."""
    event = registration(user_id, username, password_hash, wallet, created_at)
    conn.execute(
        insert(OutboxEvent).values(
            event_id=str(event.event_id),
            kind=ACCOUNTS,
            payload=event.to_json(),
            created_at=created_at,
        )
    )


def unpublished(engine: Engine, limit: int) -> list[OutboxRow]:
    """The oldest rows not yet published, in id (commit) order."""
    with engine.connect() as conn:
        rows = conn.execute(
            select(OutboxEvent.id, OutboxEvent.kind, OutboxEvent.payload)
            .where(OutboxEvent.published_at.is_(None))
            .order_by(OutboxEvent.id)
            .limit(limit)
        ).all()
    return [OutboxRow(row.id, row.kind, row.payload) for row in rows]


def mark_published(
    engine: Engine,
    published: list[tuple[int, str]],
    checkpoints: dict[str, str],
    now: datetime,
) -> None:
    """Record `(outbox id, entry id)` pairs and advance the streams' checkpoints, together.

    The accounts checkpoint is the last entry id the relay has recorded: every accounts
    entry up to it belongs to a user already in this database (a user commits before
    its entry is added), which is what a restore of a backup relies on.
    """
    if not published:
        return
    with engine.connect().execution_options(**{IMMEDIATE: True}) as conn, conn.begin():
        conn.execute(
            text(
                "UPDATE outbox SET published_at = :now, entry_id = :entry_id "
                "WHERE id = :id AND published_at IS NULL"
            ).bindparams(_NOW),
            [{"id": row_id, "entry_id": entry_id, "now": now} for row_id, entry_id in published],
        )
        save_checkpoints(conn, checkpoints, now)


def mark_replayed(conn: Connection, events: list[tuple[str, str]], now: datetime) -> None:
    """Mark rows published whose events a replay found on the stream (`(event id, entry id)`).

    After a restore, rows that were unpublished in the backup may already be on the
    stream (the old relay published them later): marking them keeps the relay from
    publishing them a second time.
    """
    if not events:
        return
    conn.execute(
        text(
            "UPDATE outbox SET published_at = :now, entry_id = :entry_id "
            "WHERE event_id = :event_id AND published_at IS NULL"
        ).bindparams(_NOW),
        [{"event_id": event_id, "entry_id": entry_id, "now": now} for event_id, entry_id in events],
    )


def count_unpublished(engine: Engine) -> int:
    """How many rows wait for the relay."""
    with engine.connect() as conn:
        return int(
            conn.execute(
                text("SELECT COUNT(*) FROM outbox WHERE published_at IS NULL")
            ).scalar_one()
        )
