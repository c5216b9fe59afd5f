"""Replay: apply the retained entries of the accounts, update and terminate streams to a
database, in entry-id order, idempotently.

Entries are read with XRANGE (the consumer groups are not touched), merged across
the three streams and applied in chunks, each in one transaction: registrations
recreate users under their ids; game events go through the live worker's planner and
persistence code (`plan_batch`, `load_world`, `write_changes`, `save_checkpoints`).

How replay matches what the live worker did:
- An entry found in the dead-letter stream is skipped: the live worker refused it.
- An entry the planner defers (a terminate before its session, a busy player) waits
  and is retried on the live worker's schedule, counted in stream time: after
  `retry_delay_ms`, doubling up to 30x. Chunks end where a retry falls due, so the
  retry happens between the same entries as it did live.
- A game event naming a player not registered yet, that the live worker did not
  dead-letter, waits up to `ACCOUNT_GRACE_MS` of stream time for the registration:
  live, the player existed when the event was applied (a registration commits a
  moment before its accounts entry is added).
- Within one millisecond, accounts entries come first.
"""

from __future__ import annotations

import heapq
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import orjson
import structlog
from redis import Redis
from sqlalchemy import Connection, Engine
from sqlalchemy.exc import IntegrityError, OperationalError

from domain.errors import DeadLetterReason, InvalidPayload
from domain.events import EventKind, entry_id_key, entry_order, parse_event
from domain.games import (
    Decision,
    Outcome,
    PlannedEntry,
    Waiting,
    event_usernames,
    plan_batch,
)
from domain.registrations import ACCOUNTS, Registration, parse_registration
from persistence import cache
from persistence.db import IMMEDIATE, is_sqlite
from persistence.games import load_world, save_checkpoints, write_changes
from persistence.keys import Keys
from persistence.ranking import rebuild_leaderboard_cache, refresh_ranks
from persistence.replay import apply_registrations, fix_sequences, live_sessions
from workers.ranges import FIRST, LAST, EntryKey, xrange_pages

log = structlog.get_logger("usermgmt.replay")

ACCOUNT_GRACE_MS = 60_000
TIME_SLICE_MS = 1_000  # one chunk spans at most this much stream time (its `now`)
READ_PAGE = 2_000
RETRY_CAP = 30  # the live worker's retry delay doubles up to 30 x retry_delay_ms
ATTEMPTS = 5  # a chunk that loses a race with a live worker is tried again


@dataclass(frozen=True)
class StreamEntry:
    """One retained entry, with its place in the merged order."""

    stream: str
    kind: str  # accounts | update | terminate
    entry_id: str
    payload: bytes | None

    @property
    def order(self) -> tuple[int, int, int]:
        """The live merge order (`entry_order`: by ms, then accounts, updates, terminates)."""
        return entry_order(self.kind, self.entry_id)

    @property
    def ms(self) -> int:
        return entry_id_key(self.entry_id)[0]


@dataclass(eq=False)
class _Waiting:
    """A game event not applicable yet, retried on the live worker's schedule."""

    entry: StreamEntry
    planned: PlannedEntry
    holds_session: bool
    due_ms: int = 0
    attempts: int = 1
    tried_at_version: int = -1


@dataclass
class ReplaySummary:
    """Counts for the closing summary."""

    read: Counter[str] = field(default_factory=Counter)  # by kind
    applied: int = 0
    duplicates: int = 0
    dead_lettered: int = 0  # skipped: the live worker dead-lettered them
    invalid: Counter[str] = field(default_factory=Counter)  # skipped: replay refused them
    waiting: int = 0  # never applicable before the end (most likely still pending live)
    first_id: str | None = None
    last_id: str | None = None
    elapsed_s: float = 0.0

    @property
    def total_read(self) -> int:
        return sum(self.read.values())

    @property
    def total_invalid(self) -> int:
        return sum(self.invalid.values())


@dataclass
class _Chunk:
    """What one chunk's transaction decided; merged into the summary after its commit."""

    applied: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    invalid: Counter[str] = field(default_factory=Counter)
    waiting: list[_Waiting] = field(default_factory=list)
    resolved: set[tuple[str, str]] = field(default_factory=set)  # waiting entries settled
    changed: bool = False


ProgressCallback = Callable[[int, int], None]  # (entries done, last ms)


class Replayer:
    """Applies retained stream entries to `engine` (SQL only; caches are separate)."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        engine: Engine,
        batch_size: int = 500,
        retry_delay_ms: int = 1_000,
        progress: ProgressCallback | None = None,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.engine = engine
        self.batch_size = batch_size
        self.retry_delay_ms = retry_delay_ms
        self.progress = progress
        self.kinds = {
            keys.accounts_stream: ACCOUNTS,
            keys.update_stream: str(EventKind.UPDATE),
            keys.terminate_stream: str(EventKind.TERMINATE),
        }
        self.summary = ReplaySummary()
        self.dead_letters: set[tuple[str, str]] = set()
        self.waiting: list[_Waiting] = []
        self.version = 0  # bumped by every commit that changed something
        self.due_at: int | None = None

    # -- the run -------------------------------------------------------------------------

    def run(
        self, starts: dict[str, EntryKey] | EntryKey = FIRST, end: EntryKey = LAST
    ) -> ReplaySummary:
        """Replay every stream from its start (one for all, or per stream key) to `end`."""
        started = time.perf_counter()
        if not isinstance(starts, dict):
            starts = dict.fromkeys(self.kinds, starts)
        self.dead_letters = load_dead_letters(self.redis, self.keys.dlq)
        readers = [
            self.read(stream, starts.get(stream, FIRST), min(end, self.last_entry(stream)))
            for stream in self.kinds
        ]
        chunk: list[StreamEntry] = []
        done = 0
        for entry in heapq.merge(*readers, key=lambda e: e.order):
            if self.summary.first_id is None:
                self.summary.first_id = entry.entry_id
            if chunk and (
                len(chunk) >= self.batch_size
                or entry.ms > chunk[0].ms + TIME_SLICE_MS
                or entry.ms >= self.next_due()
            ):
                self.apply(chunk)
                done += len(chunk)
                self.report(done, chunk[-1].ms)
                chunk = []
            self.retry_due(entry.ms)
            chunk.append(entry)
            self.summary.read[entry.kind] += 1
            self.summary.last_id = entry.entry_id
        if chunk:
            self.apply(chunk)
            done += len(chunk)
            self.report(done, chunk[-1].ms)
        self.retry_all()
        self.finish()
        self.summary.elapsed_s = time.perf_counter() - started
        return self.summary

    def read(self, stream: str, start: EntryKey, end: EntryKey) -> Iterator[StreamEntry]:
        """The entries of one stream in [start, end], a page at a time."""
        kind = self.kinds[stream]
        for page in xrange_pages(self.redis, stream, start, end, READ_PAGE):
            for entry_id, fields in page:
                yield StreamEntry(stream, kind, entry_id, fields.get(b"payload"))

    def last_entry(self, stream: str) -> EntryKey:
        """The stream's newest entry now: a replay under load still comes to an end."""
        newest: Any = self.redis.xrevrange(stream, count=1)
        return entry_id_key(_text(newest[0][0])) if newest else FIRST

    def report(self, done: int, last_ms: int) -> None:
        if self.progress is not None:
            self.progress(done, last_ms)

    def finish(self) -> None:
        """Exact ranks, and (PostgreSQL) the users id sequence past the inserted ids."""
        with self.engine.begin() as conn:
            refresh_ranks(conn)
            fix_sequences(conn)

    # -- one chunk -----------------------------------------------------------------------

    def apply(self, chunk: list[StreamEntry]) -> None:
        """Decide and write one chunk in one transaction (tried again if it loses a race)."""
        self.merge(_attempts(lambda: self.apply_once(chunk)))

    def apply_once(self, chunk: list[StreamEntry]) -> _Chunk:
        result = _Chunk()
        stream_ms = chunk[-1].ms
        now = _when(stream_ms)
        checkpoints: dict[str, str] = {}
        runs: list[list[tuple[StreamEntry, Any]]] = []
        for entry in chunk:
            parsed = self.parse(entry, result)
            if parsed is None:
                checkpoints[entry.stream] = entry.entry_id
            elif runs and (runs[-1][0][0].kind == ACCOUNTS) == (entry.kind == ACCOUNTS):
                runs[-1].append((entry, parsed))
            else:
                runs.append([(entry, parsed)])
        with self.connect() as conn, conn.begin():
            for run in runs:
                if run[0][0].kind == ACCOUNTS:
                    registrations = [(reg, entry.entry_id) for entry, reg in run]
                    decisions = apply_registrations(conn, registrations, now)
                else:
                    held = self.holding([*self.waiting, *result.waiting])
                    decisions = self.plan(conn, [p for _, p in run], now, held, result)
                for (entry, parsed), decision in zip(run, decisions, strict=True):
                    verdict = self.judge(entry, decision, result, stream_ms, final=False)
                    if verdict == WAIT:
                        result.waiting.append(_Waiting(entry, parsed, _holds(decision)))
                        self.reschedule(result.waiting[-1], entry.ms)
                    else:
                        checkpoints[entry.stream] = entry.entry_id
            save_checkpoints(conn, checkpoints, now)
        return result

    def parse(self, entry: StreamEntry, result: _Chunk) -> Registration | PlannedEntry | None:
        """The entry's event, or None when it is skipped (dead-lettered live, or invalid)."""
        if (entry.stream, entry.entry_id) in self.dead_letters:
            result.dead_lettered += 1
            return None
        try:
            if entry.kind == ACCOUNTS:
                return parse_registration(entry.payload)
            event = parse_event(EventKind(entry.kind), entry.payload)
        except InvalidPayload as exc:
            result.invalid[str(exc.reason)] += 1
            return None
        return PlannedEntry(event, entry.kind, entry.entry_id)

    def plan(
        self,
        conn: Connection,
        planned: list[PlannedEntry],
        now: datetime,
        held: Waiting,
        result: _Chunk,
    ) -> list[Decision]:
        """The live worker's planner and writer, on a run of game events."""
        events = [p.event for p in planned]
        world = load_world(
            conn,
            event_ids=[p.event_id for p in planned],
            username_keys=event_usernames(events),
            session_ids=[event.session_id for event in events],
            lock=not is_sqlite(self.engine),
        )
        decisions, changes = plan_batch(world, planned, now, waiting=held)
        write_changes(conn, world, changes, now)
        result.changed = result.changed or not changes.empty
        return decisions

    def judge(
        self, entry: StreamEntry, decision: Decision, result: _Chunk, stream_ms: int, final: bool
    ) -> str:
        """Count a decision: applied, duplicate, invalid (skipped) or `WAIT`."""
        if decision.outcome is Outcome.APPLIED:
            result.applied += 1
            result.changed = True
            return "applied"
        if decision.outcome is Outcome.DUPLICATE:
            result.duplicates += 1
            return "duplicate"
        if decision.outcome is Outcome.DEFERRED:
            return WAIT
        unknown = decision.reason is DeadLetterReason.UNKNOWN_USER
        if unknown and not final and stream_ms - entry.ms < ACCOUNT_GRACE_MS:
            return WAIT
        reason = str(decision.reason or "conflict")
        result.invalid[reason] += 1
        log.warning(
            "replay skipped an entry",
            stream=entry.stream,
            entry_id=entry.entry_id,
            reason=reason,
            error=decision.message,
        )
        return "invalid"

    def merge(self, result: _Chunk) -> None:
        """Fold a committed transaction into the summary and the waiting list."""
        self.summary.applied += result.applied
        self.summary.duplicates += result.duplicates
        self.summary.dead_lettered += result.dead_lettered
        self.summary.invalid.update(result.invalid)
        if result.resolved:
            self.waiting = [w for w in self.waiting if _identity(w) not in result.resolved]
        if result.waiting:
            self.waiting = sorted([*self.waiting, *result.waiting], key=lambda w: w.entry.order)
        if result.changed:
            self.version += 1
        self.due_at = None

    def connect(self) -> Connection:
        return self.engine.connect().execution_options(**{IMMEDIATE: True})

    # -- waiting entries ---------------------------------------------------------------

    @staticmethod
    def holding(waiting: list[_Waiting]) -> Waiting:
        """The waiting entries that later entries must not overtake."""
        held = Waiting()
        for item in waiting:
            if item.holds_session:
                held.hold(item.planned.event, item.entry.order)
        return held

    def next_due(self) -> int:
        """When the first waiting entry falls due (stream time), cached between changes."""
        if self.due_at is None:
            self.due_at = min((w.due_ms for w in self.waiting), default=LAST[0])
        return self.due_at

    def retry_due(self, stream_ms: int) -> None:
        """Retry what the live worker would have retried by `stream_ms`, in due order."""
        while self.waiting:
            due_ms = self.next_due()
            if due_ms > stream_ms:
                return
            self.retry([w for w in self.waiting if w.due_ms <= due_ms], due_ms, final=False)

    def retry_all(self) -> None:
        """At the end: retry everything until nothing more settles."""
        while self.waiting:
            before = len(self.waiting)
            self.retry(list(self.waiting), max(w.due_ms for w in self.waiting), final=True)
            if len(self.waiting) == before:
                break
        self.summary.waiting = len(self.waiting)
        for item in self.waiting:
            log.info(
                "replay left an entry waiting",
                stream=item.entry.stream,
                entry_id=item.entry.entry_id,
            )

    def retry(self, due: list[_Waiting], stream_ms: int, final: bool) -> None:
        """Decide `due` again as one batch; what still waits is rescheduled.

        An entry tried since the last change to the database would get the same
        answer: it is only rescheduled.
        """
        fresh = [w for w in due if final or w.tried_at_version != self.version]
        if fresh:
            version = self.version
            self.merge(_attempts(lambda: self.retry_once(fresh, stream_ms, final)))
            for item in fresh:
                item.tried_at_version = version  # a change in this pass makes it fresh again
        for item in due:
            self.reschedule(item, stream_ms)

    def retry_once(self, fresh: list[_Waiting], stream_ms: int, final: bool) -> _Chunk:
        result = _Chunk()
        now = _when(stream_ms)
        retried = {_identity(w) for w in fresh}
        held = self.holding([w for w in self.waiting if _identity(w) not in retried])
        checkpoints: dict[str, str] = {}
        with self.connect() as conn, conn.begin():
            decisions = self.plan(conn, [w.planned for w in fresh], now, held, result)
            for item, decision in zip(fresh, decisions, strict=True):
                if self.judge(item.entry, decision, result, stream_ms, final) == WAIT:
                    item.holds_session = _holds(decision)
                else:
                    result.resolved.add(_identity(item))
                    checkpoints[item.entry.stream] = item.entry.entry_id
            save_checkpoints(conn, checkpoints, now)
        return result

    def reschedule(self, item: _Waiting, stream_ms: int) -> None:
        """The live worker's retry delay: `retry_delay_ms` doubling up to 30 times it."""
        delay = self.retry_delay_ms * min(2 ** (item.attempts - 1), RETRY_CAP)
        item.attempts += 1
        item.due_ms = stream_ms + delay
        self.due_at = None


WAIT = "wait"
T = TypeVar("T")


def _attempts(work: Callable[[], T]) -> T:
    """Run a transaction, again after a lost race with a live worker or a locked database."""
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return work()
        except (IntegrityError, OperationalError) as exc:
            if attempt == ATTEMPTS:
                raise
            log.warning("replay transaction failed; trying again", attempt=attempt, error=repr(exc))
            time.sleep(0.1 * attempt)
    raise AssertionError("unreachable")


def _identity(item: _Waiting) -> tuple[str, str]:
    return item.entry.stream, item.entry.entry_id


def _holds(decision: Decision) -> bool:
    """Whether later entries of the session wait behind this one (as live)."""
    return decision.holds_session or decision.reason is DeadLetterReason.UNKNOWN_USER


def load_dead_letters(redis: Redis, dlq: str) -> set[tuple[str, str]]:
    """(stream, entry id) of every entry in the dead-letter stream."""
    found: set[tuple[str, str]] = set()
    for page in xrange_pages(redis, dlq, FIRST, LAST, READ_PAGE):
        for _, fields in page:
            try:
                letter = orjson.loads(fields.get(b"payload", b""))
                found.add((str(letter["stream"]), str(letter["entry_id"])))
            except (orjson.JSONDecodeError, KeyError, TypeError):
                continue
    return found


def rebuild_caches(engine: Engine, redis: Redis, keys: Keys) -> dict[str, int]:
    """Make the Redis caches agree with the database after a replay or a restore.

    User hashes are dropped (they refill from the database on the next lookup or
    event); session hashes are rewritten for live sessions and dropped for the rest;
    the leaderboard sorted set is rebuilt from the stats.
    """
    dropped_users = _delete_matching(redis, keys.user("*"))
    dropped_sessions = _delete_matching(redis, keys.session("*"))
    sessions = live_sessions(engine)
    pipe = redis.pipeline(transaction=False)
    for session in sessions:
        cache.write_session(
            pipe,
            keys,
            session.session_id,
            players=session.players,
            status=session.status,
            meta=session.meta,
            created_at=session.created_at.isoformat(),
            updated_at=session.updated_at.isoformat(),
        )
    pipe.execute()
    board = redis.pipeline(transaction=True)  # readers never see it half built
    players = rebuild_leaderboard_cache(engine, board, keys)
    board.execute()
    return {
        "user hashes dropped": dropped_users,
        "session hashes dropped": dropped_sessions,
        "live sessions written": len(sessions),
        "leaderboard members": players,
    }


def _delete_matching(redis: Redis, pattern: str) -> int:
    deleted = 0
    batch: list[bytes] = []
    for key in redis.scan_iter(match=pattern, count=1_000):
        batch.append(key)
        if len(batch) >= 500:
            deleted += int(redis.delete(*batch))
            batch = []
    if batch:
        deleted += int(redis.delete(*batch))
    return deleted


def _when(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
