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
- While a batch's COMMIT runs (SQLite writing the WAL, or PostgreSQL's round trip:
  the driver lets the GIL go), a helper thread packs the batch's cache writes
  (`apply(pack=...)`): in small batches the commit and the packing each took about a
  sixth of the time, and now overlap. They are sent only once the commit is done.
- On SQLite its commits do not wait for the disk (`synchronous=NORMAL` on this
  connection only): the helper thread fsyncs the WAL right after each one, while the
  consumer reads its next entries, and `wait_durable` holds every ack and dead letter
  until that is done. A power loss therefore never rolls back anything acked, and the
  worker does not stand still for the sync (about 0.2 ms a commit here; done inside
  COMMIT it raised the p99 at half load by 16-50% in three pairs of runs, beside it
  by a median of about 10% in six, within this machine's noise).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime
from typing import NamedTuple

import structlog
from sqlalchemy import Connection, Engine, RootTransaction

from usermgmt.domain.events import EventKind, entry_id_key, entry_order, parse_event
from usermgmt.domain.games import Decision, Order, PlannedEntry, World, event_usernames
from usermgmt.domain.planner import Plan, plan_batch
from usermgmt.domain.waiting import Limits, Waiters
from usermgmt.persistence.cache import CommandBatch
from usermgmt.persistence.db import IMMEDIATE, fit_page_cache, is_sqlite, sync_wal
from usermgmt.persistence.games import (
    load_checkpoints,
    load_world,
    lock_decisions,
    save_checkpoints,
    write_changes,
)
from usermgmt.persistence.sql import pipelined
from usermgmt.persistence.waiting import (
    StoredWaiter,
    decided_already,
    load_dead,
    load_waiting,
    save_dead,
    save_waiting,
)
from usermgmt.persistence.world_cache import WorldCache
from usermgmt.workers.runtime.connections import DATABASE_ERRORS

log = structlog.get_logger("usermgmt.events")


class CommitNotDurable(RuntimeError):
    """A committed batch could not be made durable (the WAL's fsync failed)."""


class Applied(NamedTuple):
    """A committed batch: what was decided, the world its caches are written from, and
    those writes when they were packed beside the commit (None: not packed yet)."""

    plan: Plan
    world: World
    caches: CommandBatch | None = None


Packer = Callable[[Plan, World], CommandBatch]


class EventStore:
    """The event consumer's database connection, world cache and waiting entries.

    `streams`: each event stream's key by its kind (`update`, `terminate`), for the
    per-stream checkpoints.
    """

    def __init__(self, engine: Engine, streams: dict[str, str], limits: Limits) -> None:
        self.engine = engine
        self.streams = streams
        self.limits = limits
        self.sqlite = is_sqlite(engine)
        self.db: Connection | None = None
        self.known = WorldCache()
        self.helper: ThreadPoolExecutor | None = None  # packs caches, syncs commits
        self.syncing: list[Future[None]] = []  # WAL syncs of commits not yet waited for
        # When the transaction in hand began (monotonic), for the worker's stall watch.
        self.busy_since: float | None = None

    def apply(
        self,
        planned: list[PlannedEntry],
        horizon_ms: int | None,
        now: datetime,
        pack: Packer | None = None,
    ) -> Applied:
        """Load, decide (with the waiting entries), write and commit one batch.

        `pack`: run on the helper thread while the commit runs; what it returns comes
        back as `Applied.caches` (None if it failed: the caller packs them itself).
        """
        self.busy_since = time.monotonic()
        try:
            return self._apply(planned, horizon_ms, now, pack)
        finally:
            self.busy_since = None

    def _apply(
        self,
        planned: list[PlannedEntry],
        horizon_ms: int | None,
        now: datetime,
        pack: Packer | None,
    ) -> Applied:
        conn = self.connection()
        transaction = conn.begin()
        try:
            lock_decisions(conn)
            world = self.known.world_for(conn)
            waiters = self.known.waiters
            restored: list[tuple[PlannedEntry, str]] = []
            if waiters is None:
                waiters = Waiters()
                restored = [_restore(row) for row in load_waiting(conn)]
                known_waiting: Collection[Order] = {entry.order for entry, _ in restored}
            else:
                known_waiting = waiters.by_order.keys()
            # An entry taken over from another consumer may be recorded as waiting already:
            # it is decided as such, once.
            if known_waiting:
                planned = [p for p in planned if p.order not in known_waiting]
            everything = planned + [entry for entry, _ in restored]
            events = [p.event for p in everything]
            world = load_world(
                conn,
                event_ids=[p.event_id for p in everything],
                username_keys=event_usernames(events),
                session_ids=[event.session_id for event in events],
                lock=not self.sqlite,
                world=world,
            )
            committed = load_checkpoints(conn)
            recorded = self._recorded(conn, planned, committed)
            plan = plan_batch(world, planned, waiters, self.limits, horizon_ms, restored, recorded)
            with pipelined(conn):  # about ten statements, one wait (PostgreSQL)
                write_changes(conn, world, plan.changes, now)
                save_waiting(conn, plan.waits_added, plan.waits_removed)
                save_dead(conn, plan.decided)
                save_checkpoints(conn, self._checkpoints(plan), now, committed)
                self.known.bump(conn)
            packing = self._helper().submit(_packed, pack, plan, world) if pack else None
            try:
                transaction.commit()
            finally:
                caches = packing.result() if packing else None  # never raises
            self._sync_later()
        except BaseException as exc:
            self._failed(conn, transaction, exc)
            raise
        self.known.waiters = waiters
        self.known.committed()
        return Applied(plan, world, caches)

    def _helper(self) -> ThreadPoolExecutor:
        if self.helper is None:
            self.helper = ThreadPoolExecutor(1, thread_name_prefix="usermgmt-pack")
        return self.helper

    def _checkpoints(self, plan: Plan) -> dict[str, str]:
        """The last entry id the plan decided, per stream."""
        checkpoints: dict[str, str] = {}
        for entry, _ in plan.decided:
            stream = self.streams[entry.stream_kind]
            if stream not in checkpoints or entry.order > _order(entry, checkpoints[stream]):
                checkpoints[stream] = entry.entry_id
        return checkpoints

    def _recorded(
        self, conn: Connection, planned: list[PlannedEntry], committed: dict[str, str]
    ) -> dict[tuple[str, str], Decision] | None:
        """Dead-letter decisions already committed for entries that may be decided.

        Those are the redelivered entries (this consumer may have decided them before
        a crash) and those at or before their stream's checkpoint (another worker
        decided them: it woke one this consumer holds, or its ack was lost). A
        recorded decision stands; the rest are duplicates by their event ids.
        """
        done = {
            kind: entry_id_key(committed[stream])
            for kind, stream in self.streams.items()
            if stream in committed
        }
        again = [
            (p.stream_kind, p.entry_id)
            for p in planned
            if p.redelivered
            or (p.stream_kind in done and (p.order[0], p.order[2]) <= done[p.stream_kind])
        ]
        return load_dead(conn, again) if again else None

    def decided_already(self, entries: Sequence[tuple[str, str, str]]) -> set[tuple[str, str]]:
        """Of these (stream kind, entry id, event id)s, those a committed batch decided
        (`persistence.waiting.decided_already`), read in a transaction of their own."""
        with self.transaction() as conn:
            return decided_already(conn, entries)

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """One write transaction on the held connection, committed on leaving."""
        self.busy_since = time.monotonic()
        try:
            conn = self.connection()
            transaction = conn.begin()
            try:
                yield conn
                transaction.commit()
                self._sync_later()
            except BaseException as exc:
                self._failed(conn, transaction, exc)
                raise
        finally:
            self.busy_since = None

    def connection(self) -> Connection:
        """The held connection, opened on first use."""
        if self.db is None:
            conn = self.engine.connect().execution_options(**{IMMEDIATE: True})
            if self.sqlite:
                driver = conn.connection.driver_connection
                driver.execute("PRAGMA foreign_keys=OFF")  # type: ignore[union-attr]
                driver.execute("PRAGMA synchronous=NORMAL")  # type: ignore[union-attr]
                fit_page_cache(driver)
            self.db = conn
        return self.db

    def wait_durable(self) -> None:
        """Return once every commit made so far is on disk; before anything they decided
        is acked. A WAL that cannot be synced raises `CommitNotDurable`: what the
        commit wrote may be lost, so nothing of it may be acked."""
        pending, self.syncing = self.syncing, []
        for sync in pending:
            try:
                sync.result()
            except OSError as exc:
                raise CommitNotDurable(
                    f"the database's write-ahead log could not be synced to disk ({exc})"
                ) from exc

    def _sync_later(self) -> None:
        """Sync the WAL on the helper thread (it has packed this batch's caches by now)."""
        if self.sqlite:
            self.syncing.append(self._helper().submit(sync_wal, self.engine))

    def close(self) -> None:
        """Let the connection go (never back to the pool: foreign keys are off on it),
        and the helper thread (idle: `apply` waits for it; started again when needed)."""
        conn, self.db = self.db, None
        self.known.forget()
        helper, self.helper = self.helper, None
        if helper is not None:
            helper.shutdown()
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


def _packed(pack: Packer, plan: Plan, world: World) -> CommandBatch | None:
    """`pack(plan, world)` on the helper thread; None if it failed (logged), so that a
    failure shows where the caller packs the caches again, never as a failed commit."""
    try:
        return pack(plan, world)
    except Exception as exc:
        log.warning("packing cache writes beside the commit failed", error=repr(exc))
        return None


def _restore(row: StoredWaiter) -> tuple[PlannedEntry, str]:
    """A recorded waiting entry, to decide again (it was valid when it was recorded)."""
    event = parse_event(EventKind(row.stream), row.payload)
    return PlannedEntry(event, row.stream, row.entry_id, row.payload), row.waits_for


def _order(entry: PlannedEntry, entry_id: str) -> tuple[int, int, int]:
    return entry_order(entry.stream_kind, entry_id)
