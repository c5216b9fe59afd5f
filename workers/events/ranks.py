"""The `leaderboard` table's ranks, refreshed beside the event hot path.

The table is a ranked snapshot of `stats` that may lag by `rank_refresh_s` under
continuous load and is exact once the worker is idle (docs/protocol.md, "SQL
tables"). Nearly every rank moves between two refreshes, and at a million players
one refresh statement took 14 s on this project's bench machine, all of it a stall
of event application. So a refresh runs in two parts:

- a thread of its own ranks `stats` in one read on a connection of its own
  (`read_rank_snapshot`; on SQLite under `long_read`, so no WAL RESTART waits for
  it) and keeps the rows whose rank or earnings differ;
- the consumer writes those between batches (`step`), a slice at a time, each slice
  a transaction of its own sized to take about `STEP_TARGET_S`;
- while the slices fall behind their pace (every row written within `PACE_SHARE` of
  `rank_refresh_s` of the snapshot), a few go back to back between two batches (up
  to `GAP_BUDGET_S`), and the consumer reads fewer entries at a time (`read_size`):
  under a backlog its batches would otherwise space the slices a second or more
  apart, and a refresh at a million players would take minutes. Event application
  never stands still for much longer than `GAP_BUDGET_S`.

Rows not yet written keep the previous snapshot; each refresh starts early by the
time the last one took, so it ends about `rank_refresh_s` after the one before and
no row lags by more. Once the last slice is committed the table is exactly the
snapshot. A batch committed after the snapshot was taken leaves the ranks dirty,
for the next refresh.
"""

from __future__ import annotations

import threading
import time
from contextlib import nullcontext

from sqlalchemy import Engine
from structlog.typing import FilteringBoundLogger

from usermgmt.persistence.db import is_sqlite, long_read
from usermgmt.persistence.ranking import RankSnapshot, read_rank_snapshot, write_ranks
from usermgmt.workers.events.store import EventStore
from usermgmt.workers.runtime.metrics import Metrics

STEP_TARGET_S = 0.012  # one slice's transaction
SLOW_STEP_S = 0.05  # a slice longer than this is logged
FIRST_STEP_ROWS = 1_000
MIN_STEP_ROWS = 100
MAX_STEP_ROWS = 10_000
READ_CACHE_KIB = 8 * 1024  # the snapshot read's SQLite page cache (and sort memory)
READING_POLL_MS = 50  # how long a read for new entries blocks while the snapshot is read
PACE_SHARE = 0.5  # a snapshot's rows are written within this share of `interval_s`
GAP_BUDGET_S = 0.04  # slices back to back between two batches while a refresh is behind
MIN_READ = 100  # entries a stream per read while a refresh is behind its pace, at the least


class RankRefresher:
    """When a refresh is due, its snapshot read on a thread, and its slices written.

    `dirty`: `stats` changed since the last snapshot was taken (true at start-up: a
    previous worker may have stopped before its refresh).
    """

    def __init__(
        self,
        store: EventStore,
        interval_s: float,
        log: FilteringBoundLogger,
        metrics: Metrics,
    ) -> None:
        self.store = store
        self.engine: Engine = store.engine
        self.interval_s = interval_s
        self.log = log
        self.metrics = metrics
        self.dirty = True
        # The clock starts now, so a backlog met at start-up is not held up by a
        # refresh before its first batch; the first idle moment (or `interval_s` of
        # continuous load) starts one.
        self.last_snapshot = time.monotonic()
        self.started = 0.0
        self.last_duration = 0.0  # of the last refresh, from its snapshot to its last slice
        self.reader: threading.Thread | None = None
        # What the reader leaves: one list per read, so a read dropped by `abandon(wait=
        # False)` that ends later writes only to its own.
        self.read: list[RankSnapshot | BaseException] = []
        self.snapshot: RankSnapshot | None = None  # read, being written
        self.written = 0
        self.step_rows = FIRST_STEP_ROWS
        self.read_limit: int | None = None  # entries a stream per read; None: as configured

    @property
    def reading(self) -> bool:
        return self.reader is not None

    @property
    def writing(self) -> bool:
        """A snapshot is read and has slices left to write (or is about to)."""
        return self.snapshot is not None or (self.reader is not None and not self.reader.is_alive())

    def behind(self) -> bool:
        """Whether the snapshot in hand is written more slowly than its pace: every row
        within `PACE_SHARE` of `interval_s` of the snapshot, so the next refresh (started
        early by this one's time) ends before any row lags by more than `interval_s`."""
        snapshot = self.snapshot
        if snapshot is None:
            return False
        elapsed = time.perf_counter() - self.started
        return self.written < len(snapshot) * min(1.0, elapsed / (self.interval_s * PACE_SHARE))

    def read_size(self, configured: int) -> int:
        """Entries a stream the next read may take: halved (down to `MIN_READ`) at each
        read while the refresh is `behind`, so its slices come between shorter batches;
        doubled back towards `configured` at each read once it is not."""
        limit = self.read_limit or configured
        if self.behind():
            limit = max(min(MIN_READ, configured), limit // 2)
        else:
            limit = min(configured, limit * 2)
        self.read_limit = None if limit >= configured else limit
        return limit

    def due(self, idle: bool) -> bool:
        """Whether to take a snapshot now: the ranks are dirty, none is under way, and
        the worker is idle or the last snapshot is `interval_s` old, less the time the
        last refresh took (so it ends by then: a row lags by about `interval_s` at most)."""
        if not self.dirty or self.reading or self.snapshot is not None:
            return False
        lead = min(self.last_duration, self.interval_s)
        return idle or time.monotonic() - self.last_snapshot >= self.interval_s - lead

    def start(self) -> None:
        """Read a snapshot on a thread of its own; `step` writes it once read."""
        self.dirty = False  # a batch committed from now on is not in this snapshot
        self.last_snapshot = time.monotonic()
        self.started = time.perf_counter()
        self.read = []
        self.reader = threading.Thread(
            target=self._read, args=(self.read,), name="rank-snapshot", daemon=True
        )
        self.reader.start()

    def _read(self, into: list[RankSnapshot | BaseException]) -> None:
        try:
            sqlite = is_sqlite(self.engine)
            with long_read() if sqlite else nullcontext(), self.engine.connect() as conn:
                if sqlite:  # its sort spills to disk: 64 MiB more at 1M players otherwise
                    conn.exec_driver_sql(f"PRAGMA cache_size=-{READ_CACHE_KIB}")
                snapshot = read_rank_snapshot(conn)
                conn.rollback()
                if sqlite:
                    conn.invalidate()  # not pooled: its page cache filled with every row
        except BaseException as exc:  # handed to the consumer's thread by `step`
            into.append(exc)
        else:
            into.append(snapshot)

    def step(self) -> bool:
        """Write the slices due between two batches; returns whether any was.

        One slice, and more while the refresh is `behind` its pace, as long as the
        stand-still stays within `GAP_BUDGET_S` (another slice starts only if one as
        long as the last still fits). The metrics see the whole stand-still.
        """
        began = slice_began = time.perf_counter()
        written = False
        while self._slice():
            written = True
            now = time.perf_counter()
            if not self.behind() or (now - began) + (now - slice_began) > GAP_BUDGET_S:
                break
            slice_began = now
        if written:
            self.metrics.observe_rank_step(time.perf_counter() - began)
        return written

    def _slice(self) -> bool:
        """Write the next slice of a snapshot already read; returns whether one was.

        A slice's transaction failing raises here (the database is away or lost a
        race): nothing of it is counted written, so the next step writes it again.
        """
        if self.reader is not None:
            if self.reader.is_alive():
                return False
            self.reader.join()
            self.reader = None
            read = self.read[0] if self.read else None
            if not isinstance(read, RankSnapshot):
                self.dirty = True  # taken again at the next chance
                self.log.warning("rank snapshot failed; ranks refreshed later", error=repr(read))
                return False
            self.snapshot, self.written = read, 0
        snapshot = self.snapshot
        if snapshot is None:
            return False
        start, stop = self.written, min(len(snapshot), self.written + self.step_rows)
        began = time.perf_counter()
        locked = wrote = began  # when the write lock was had, when the rows were written
        if stop > start:
            with self.store.transaction() as conn:
                locked = time.perf_counter()
                write_ranks(conn, snapshot, start, stop)
                wrote = time.perf_counter()
        ended = time.perf_counter()
        self.written = stop
        if ended - began > SLOW_STEP_S:
            self.log.warning(
                "rank refresh slice slow",
                rows=stop - start,
                duration_ms=round((ended - began) * 1000),
                lock_ms=round((locked - began) * 1000),
                write_ms=round((wrote - locked) * 1000),
                commit_ms=round((ended - wrote) * 1000),
            )
        self._size_next_step(stop - start, ended - began)
        if stop >= len(snapshot):
            self._done(snapshot)
        return True

    def _size_next_step(self, rows: int, seconds: float) -> None:
        """Rows for the next slice, at this one's pace (at most half as many again: the
        rows whose earnings changed cost five times the others, and come unevenly)."""
        if rows < self.step_rows:
            return  # the last slice: too small to tell the pace
        fit = int(rows * STEP_TARGET_S / max(seconds, 1e-4))
        self.step_rows = max(MIN_STEP_ROWS, min(MAX_STEP_ROWS, rows * 3 // 2, fit))

    def _done(self, snapshot: RankSnapshot) -> None:
        self.snapshot = None
        if len(snapshot):
            self.store.known.forget()  # cached players hold the ranks of before
        seconds = self.last_duration = time.perf_counter() - self.started
        self.metrics.observe_rank_refresh(seconds)
        self.log.info("ranks refreshed", changed=len(snapshot), duration_ms=round(seconds * 1000))

    def abandon(self, wait: bool = True) -> None:
        """Drop a refresh under way; the ranks stay dirty. `wait`: for a read that runs
        (else it ends on its own, its snapshot unused)."""
        if self.reader is not None or self.snapshot is not None:
            self.dirty = True
        if self.reader is not None and wait:
            self.reader.join()
        self.reader, self.read, self.snapshot = None, [], None
