"""The event consumer's side of the database: one held connection and the world it knows.

- The connection is opened on first use and held across batches; its transactions
  begin IMMEDIATE (SQLite), so a batch that reads then writes never deadlocks
  against another writer.
- SQLite's foreign-key checks are off on it: every id a batch writes was read under
  the same write lock or is known exactly (`WorldCache`), and the checks cost a
  quarter of each result insert. It is never handed to anyone else.
- Its page cache is sized to the player tables (`fit_page_cache`).
- Any failure forgets what the world cache knows (the batch changed it in memory);
  a connection the database dropped is closed, to be opened again.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import NamedTuple

import structlog
from sqlalchemy import Connection, Engine, RootTransaction

from domain.games import (
    Changes,
    Decision,
    Outcome,
    PlannedEntry,
    Waiting,
    World,
    event_usernames,
    plan_batch,
)
from persistence.db import IMMEDIATE, fit_page_cache, is_sqlite
from persistence.games import load_world, save_checkpoints, write_changes
from persistence.world_cache import WorldCache
from workers.connections import DATABASE_ERRORS

log = structlog.get_logger("usermgmt.events")


class Applied(NamedTuple):
    """A committed batch: what was decided, and the world and changes to cache."""

    decisions: list[Decision]
    world: World | None
    changes: Changes | None


class EventStore:
    """The event consumer's database connection and world cache."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.sqlite = is_sqlite(engine)
        self.db: Connection | None = None
        self.known = WorldCache()

    def apply(
        self, planned: list[PlannedEntry], streams: list[str], now: datetime, waiting: Waiting
    ) -> Applied:
        """Load, decide, write and commit one batch (`streams`: each entry's stream)."""
        events = [p.event for p in planned]
        conn = self.connection()
        transaction = conn.begin()
        try:
            world = load_world(
                conn,
                event_ids=[p.event_id for p in planned],
                username_keys=event_usernames(events),
                session_ids=[event.session_id for event in events],
                lock=not self.sqlite,
                world=self.known.world_for(conn),
            )
            decisions, changes = plan_batch(world, planned, now, waiting)
            write_changes(conn, world, changes, now)
            checkpoints: dict[str, str] = {}
            for entry, stream, decision in zip(planned, streams, decisions, strict=True):
                if decision.outcome is not Outcome.DEFERRED:
                    checkpoints[stream] = entry.entry_id
            save_checkpoints(conn, checkpoints, now)
            transaction.commit()
        except BaseException as exc:
            self._failed(conn, transaction, exc)
            raise
        return Applied(decisions, world, changes)

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """One write transaction on the held connection, committed on leaving."""
        conn = self.connection()
        transaction = conn.begin()
        try:
            yield conn
            transaction.commit()
        except BaseException as exc:
            self._failed(conn, transaction, exc)
            raise

    def connection(self) -> Connection:
        """The held connection, opened on first use."""
        if self.db is None:
            conn = self.engine.connect().execution_options(**{IMMEDIATE: True})
            if self.sqlite:
                driver = conn.connection.driver_connection
                driver.execute("PRAGMA foreign_keys=OFF")  # type: ignore[union-attr]
                fit_page_cache(driver)
            self.db = conn
        return self.db

    def close(self) -> None:
        """Let the connection go (never back to the pool: foreign keys are off on it)."""
        conn, self.db = self.db, None
        self.known.forget()
        if conn is not None:
            try:
                conn.invalidate()
                conn.close()
            except Exception as exc:  # already broken: nothing left to give back
                log.debug("closing the database connection failed", error=repr(exc))

    def _failed(self, conn: Connection, transaction: RootTransaction, exc: BaseException) -> None:
        self.known.forget()
        if conn.invalidated or isinstance(exc, DATABASE_ERRORS):
            self.close()
            return
        try:
            transaction.rollback()
        except Exception:
            self.close()
