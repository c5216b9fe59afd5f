"""Replay: apply the retained entries of the accounts, update and terminate streams to a
database, in entry-id order, idempotently, deciding each entry as the live worker did.

Entries are read with XRANGE (the consumer groups are not touched), merged across
the three streams and applied in chunks, each in one transaction: registrations
recreate users under their ids; game events go through the live worker's own
store and planner (`EventStore`, `usermgmt.domain.planner`), waiting entries included.

How replay matches what the live worker did:
- The planner's decisions depend only on the entries and their order (entry-id
  time included), so replaying the same streams makes the same decisions,
  dead letters and waiting entries included, however the chunks fall.
- Two decisions depend on more than the streams, and are taken from the
  dead-letter stream (and from `um:dlq:retired`, the letters retried or purged since):
  `max_deliveries` (a worker crashed on the entry) and `unknown_user` (the player
  registered after the event was decided). The live worker's planner recorded the
  second in `dead_events`; so does the replay.
- A registration commits a moment before its accounts entry is added, so live, a
  game event right after a registration already saw the player: accounts entries
  are merged `ACCOUNT_LEAD_MS` ahead of their ids.
- At the end, entries still waiting that the live worker would have timed out by
  now are dead-lettered as `wait_timeout`; the rest stay recorded as waiting.
"""

from __future__ import annotations

import heapq
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple, TypeVar

import orjson
import structlog
from redis import Redis
from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError, OperationalError

from usermgmt.domain.errors import DeadLetterReason, InvalidPayload
from usermgmt.domain.events import EventKind, entry_id_key, entry_order, parse_event
from usermgmt.domain.games import Outcome, PlannedEntry
from usermgmt.domain.payloads import text_of
from usermgmt.domain.registrations import ACCOUNTS, parse_registration
from usermgmt.domain.waiting import Limits
from usermgmt.persistence import cache
from usermgmt.persistence.db import IMMEDIATE
from usermgmt.persistence.games import save_checkpoints
from usermgmt.persistence.keys import Keys
from usermgmt.persistence.ranking import rebuild_leaderboard_cache, refresh_ranks
from usermgmt.persistence.replay import apply_registrations, fix_sequences, live_sessions
from usermgmt.persistence.waiting import save_dead_rows
from usermgmt.workers.events.store import EventStore
from usermgmt.workers.runtime.backoff import Backoff
from usermgmt.workers.runtime.clock import redis_time_ms
from usermgmt.workers.runtime.ranges import FIRST, LAST, EntryKey, xrange_pages

log = structlog.get_logger("usermgmt.replay")

ACCOUNT_LEAD_MS = 60_000
READ_PAGE = 2_000
ATTEMPTS = 5  # a chunk that loses a race with a live worker is tried again
# Dead letters a replay cannot decide from the streams alone: it follows the live worker.
LIVE_ONLY_REASONS = frozenset({DeadLetterReason.MAX_DELIVERIES, DeadLetterReason.UNKNOWN_USER})


@dataclass(frozen=True)
class StreamEntry:
    """One retained entry, with its place in the merged order."""

    stream: str
    kind: str  # accounts | update | terminate
    entry_id: str
    payload: bytes | None

    @property
    def order(self) -> tuple[int, int, int]:
        """The live merge order (`entry_order`); accounts entries `ACCOUNT_LEAD_MS` early."""
        ms, rank, seq = entry_order(self.kind, self.entry_id)
        return (ms - ACCOUNT_LEAD_MS if self.kind == ACCOUNTS else ms), rank, seq

    @property
    def ms(self) -> int:
        return entry_id_key(self.entry_id)[0]


@dataclass
class ReplaySummary:
    """Counts for the closing summary."""

    read: Counter[str] = field(default_factory=Counter)  # by kind
    applied: int = 0
    duplicates: int = 0
    dead_lettered: int = 0  # dead letters the live worker wrote too (or decided alone)
    invalid: Counter[str] = field(default_factory=Counter)  # refused here, not in the dlq
    waiting: int = 0  # still waiting at the end (left to the worker)
    first_id: str | None = None
    last_id: str | None = None
    elapsed_s: float = 0.0

    @property
    def total_read(self) -> int:
        return sum(self.read.values())

    @property
    def total_invalid(self) -> int:
        return sum(self.invalid.values())


ProgressCallback = Callable[[int, int], None]  # (entries done, last ms)


class Replayer:
    """Applies retained stream entries to `engine` (SQL only; caches are separate)."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        engine: Engine,
        limits: Limits | None = None,
        batch_size: int = 500,
        progress: ProgressCallback | None = None,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.engine = engine
        self.batch_size = batch_size
        self.progress = progress
        self.kinds = {
            keys.accounts_stream: ACCOUNTS,
            keys.update_stream: str(EventKind.UPDATE),
            keys.terminate_stream: str(EventKind.TERMINATE),
        }
        game_streams = {kind: stream for stream, kind in self.kinds.items() if kind != ACCOUNTS}
        self.store = EventStore(engine, game_streams, limits or Limits())
        self.summary = ReplaySummary()
        self.dead_letters: dict[tuple[str, str], Letter] = {}

    # -- the run -------------------------------------------------------------------------

    def run(
        self, starts: dict[str, EntryKey] | EntryKey = FIRST, end: EntryKey = LAST
    ) -> ReplaySummary:
        """Replay every stream from its start (one for all, or per stream key) to `end`."""
        started = time.perf_counter()
        if not isinstance(starts, dict):
            starts = dict.fromkeys(self.kinds, starts)
        self.dead_letters = {
            **load_dead_letters(self.redis, self.keys.dlq_retired),
            **load_dead_letters(self.redis, self.keys.dlq),
        }
        clock_ms = redis_time_ms(self.redis)  # entries of later milliseconds are not replayed
        readers = [
            self.read(stream, starts.get(stream, FIRST), min(end, self.last_entry(stream)))
            for stream in self.kinds
        ]
        chunk: list[StreamEntry] = []
        done = 0
        try:
            for entry in heapq.merge(*readers, key=lambda e: e.order):
                if self.summary.first_id is None:
                    self.summary.first_id = entry.entry_id
                if chunk and (
                    len(chunk) >= self.batch_size
                    or (chunk[0].kind == ACCOUNTS) != (entry.kind == ACCOUNTS)
                ):
                    done += self.apply(chunk)
                    self.report(done, chunk[-1].ms)
                    chunk = []
                chunk.append(entry)
                self.summary.read[entry.kind] += 1
                self.summary.last_id = entry.entry_id
            if chunk:
                done += self.apply(chunk)
                self.report(done, chunk[-1].ms)
            # As the live worker would by now: waiting entries past their time are decided.
            self.summary.waiting = self.apply_games(
                [], horizon_ms=clock_ms if end == LAST else None
            )
            self.finish()
        finally:
            self.store.close()
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
        return entry_id_key(text_of(newest[0][0])) if newest else FIRST

    def report(self, done: int, last_ms: int) -> None:
        if self.progress is not None:
            self.progress(done, last_ms)

    def finish(self) -> None:
        """Exact ranks, and (PostgreSQL) the users id sequence past the inserted ids."""
        with self.engine.begin() as conn:
            refresh_ranks(conn)
            fix_sequences(conn)

    # -- one chunk -----------------------------------------------------------------------

    def apply(self, chunk: list[StreamEntry]) -> int:
        """Decide and write one chunk (all registrations, or all game events)."""
        if chunk[0].kind == ACCOUNTS:
            _attempts(lambda: self.apply_registrations(chunk))
        else:
            planned = [p for p in map(self.parse, chunk) if p is not None]
            self.apply_games(planned)
            self.record_live_decisions(chunk)
        return len(chunk)

    def apply_registrations(self, chunk: list[StreamEntry]) -> None:
        registrations = []
        for entry in chunk:
            try:
                registrations.append((parse_registration(entry.payload), entry.entry_id))
            except InvalidPayload as exc:
                self.count_dead(entry.stream, entry.entry_id, str(exc.reason))
        now = _when(chunk[-1].ms)
        with self.engine.connect().execution_options(**{IMMEDIATE: True}) as conn, conn.begin():
            decisions = apply_registrations(conn, registrations, now)
            # As the live relay records it: every accounts entry up to here is in.
            save_checkpoints(conn, {chunk[-1].stream: chunk[-1].entry_id}, now)
        for decision in decisions:
            if decision.outcome is Outcome.APPLIED:
                self.summary.applied += 1
            elif decision.outcome is Outcome.DUPLICATE:
                self.summary.duplicates += 1
            else:
                self.summary.invalid["conflict"] += 1

    def parse(self, entry: StreamEntry) -> PlannedEntry | None:
        """The entry's event, or None when it is not decided here."""
        letter = self.dead_letters.get((entry.stream, entry.entry_id))
        if letter is not None and letter.reason in LIVE_ONLY_REASONS:
            self.summary.dead_lettered += 1
            return None
        try:
            event = parse_event(EventKind(entry.kind), entry.payload)
        except InvalidPayload as exc:
            self.count_dead(entry.stream, entry.entry_id, str(exc.reason))
            return None
        return PlannedEntry(event, entry.kind, entry.entry_id, entry.payload)

    def apply_games(self, planned: list[PlannedEntry], horizon_ms: int | None = None) -> int:
        """Decide game events with the live planner; returns how many entries wait."""
        now = _when(planned[-1].ms) if planned else datetime.now(UTC)
        applied = _attempts(lambda: self.store.apply(planned, horizon_ms, now))
        for item, decision in applied.plan.decided:
            if decision.outcome is Outcome.APPLIED:
                self.summary.applied += 1
            elif decision.outcome is Outcome.DUPLICATE:
                self.summary.duplicates += 1
            else:
                stream = self.store.streams[item.stream_kind]
                self.count_dead(stream, item.entry_id, str(decision.reason))
        waiters = self.store.known.waiters
        return len(waiters) if waiters is not None else 0

    def record_live_decisions(self, chunk: list[StreamEntry]) -> None:
        """The `dead_events` rows of the live planner's decisions not taken here
        (`unknown_user`), as it recorded them, and the checkpoints past them (the live
        planner decided them: its checkpoint counts them)."""
        rows = []
        checkpoints: dict[str, str] = {}
        for entry in chunk:
            letter = self.dead_letters.get((entry.stream, entry.entry_id))
            if letter is not None and letter.reason == DeadLetterReason.UNKNOWN_USER:
                rows.append((entry.kind, entry.entry_id, letter.reason, letter.message))
                checkpoints[entry.stream] = entry.entry_id  # a stream's chunk is in id order
        if rows:
            now = _when(chunk[-1].ms)
            _attempts(lambda: _save_dead_rows(self.engine, rows, checkpoints, now))

    def count_dead(self, stream: str, entry_id: str, reason: str) -> None:
        """A dead letter decided here: as live (in the dlq), or only here (`invalid`)."""
        if (stream, entry_id) in self.dead_letters:
            self.summary.dead_lettered += 1
        else:
            self.summary.invalid[reason] += 1
            log.warning("replay refused an entry", stream=stream, entry_id=entry_id, reason=reason)


T = TypeVar("T")


def _attempts(work: Callable[[], T]) -> T:
    """Run a transaction, again after a lost race with a live worker or a locked database."""
    backoff = Backoff(first=0.1, cap=1.0)
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return work()
        except (IntegrityError, OperationalError) as exc:
            if attempt == ATTEMPTS:
                raise
            delay = backoff.next_delay()
            log.warning(
                "replay transaction failed; trying again",
                attempt=attempt,
                retry_in_s=delay,
                error=repr(exc),
            )
            time.sleep(delay)
    raise AssertionError("unreachable")


class Letter(NamedTuple):
    """What the dead-letter stream says of one entry."""

    reason: str
    message: str


def load_dead_letters(redis: Redis, dlq: str) -> dict[tuple[str, str], Letter]:
    """(stream, entry id) -> reason and message, of every entry in the dead-letter stream."""
    found: dict[tuple[str, str], Letter] = {}
    for page in xrange_pages(redis, dlq, FIRST, LAST, READ_PAGE):
        for _, fields in page:
            try:
                letter = orjson.loads(fields.get(b"payload", b""))
                key = (str(letter["stream"]), str(letter["entry_id"]))
                found[key] = Letter(str(letter["reason"]), str(letter.get("message", "")))
            except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
                continue
    return found


def _save_dead_rows(
    engine: Engine,
    rows: list[tuple[str, str, str, str]],
    checkpoints: dict[str, str],
    now: datetime,
) -> None:
    with engine.connect().execution_options(**{IMMEDIATE: True}) as conn, conn.begin():
        save_dead_rows(conn, rows)
        save_checkpoints(conn, checkpoints, now)


def rebuild_caches(engine: Engine, redis: Redis, keys: Keys) -> dict[str, int]:
    """Make the Redis caches agree with the database after a replay or a restore.

    User hashes are dropped (they refill from the database on the next lookup or
    event); session hashes are rewritten for live sessions and dropped for the rest;
    the leaderboard sorted set is rebuilt from the stats.
    """
    dropped_users = _delete_matching(redis, keys.user("*"))
    dropped_sessions = _delete_matching(redis, keys.session("*"))
    sessions = live_sessions(engine)
    batch = cache.CommandBatch()
    for session in sessions:
        cache.queue_session(
            batch,
            keys,
            session.session_id,
            players=session.players,
            status=session.status,
            meta=session.meta,
            created_at=session.created_at.isoformat(),
            updated_at=session.updated_at.isoformat(),
        )
    batch.send(redis).wait()
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
