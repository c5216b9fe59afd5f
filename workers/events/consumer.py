"""The game-event consumer: update and terminate streams, each entry applied once what it
depends on has been (`usermgmt.domain.planner`).

Delivery semantics (docs/protocol.md, "Delivery"), all decided here:
- entries are decided in their merged order, and only once every earlier entry is
  known: the read's server clock, a stream cut short by COUNT, and entries pending
  on other consumers bound what may be decided (`take_ready`);
- an entry is acked only after its effect (and its event id) is committed;
- permanent failures are dead-lettered at once and acked;
- an entry that waits stays pending, recorded in `waiting_events`, and is kept fresh
  (XCLAIM JUSTID) so no other consumer reclaims it and no delivery is counted; it is
  decided again as soon as what it waits for is applied, by whichever worker applies
  that, or dead-lettered as `wait_timeout`;
- a delivery that ends without a decision (a crash, an entry that fails to apply)
  counts, and `max_deliveries` of them dead-letter the entry;
- the database being away pauses the batch in hand (nothing is dead-lettered for it).
"""

from __future__ import annotations

import gc
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime

import structlog
from redis.exceptions import ResponseError

from usermgmt.domain.errors import DeadLetterReason, InvalidPayload
from usermgmt.domain.events import EventKind, entry_id_key, entry_order, parse_event
from usermgmt.domain.games import Changes, Order, Outcome, PlannedEntry, World
from usermgmt.persistence import cache
from usermgmt.persistence.games import load_checkpoints, session_is_live
from usermgmt.persistence.keys import EVENTS_GROUP
from usermgmt.persistence.ranking import rebuild_leaderboard_cache, refresh_ranks
from usermgmt.persistence.waiting import waiting_keys
from usermgmt.workers.events.store import Applied, EventStore
from usermgmt.workers.runtime.bootstrap import Services
from usermgmt.workers.runtime.connections import (
    DATABASE_ERRORS,
    REDIS_ERRORS,
    database_unreachable,
    redis_unreachable,
)
from usermgmt.workers.runtime.metrics import NO_METRICS, Metrics
from usermgmt.workers.runtime.streams import (
    Backoff,
    Entry,
    GroupRead,
    claim_idle,
    claim_own,
    dead_letter_payload,
    ensure_group,
    entries_of,
    is_missing_group,
    keep_fresh,
    own_pending,
    pending_elsewhere,
    read_group,
)

log = structlog.get_logger("usermgmt.events")

BLOCK_MS = 1_000
FULL_COLLECTION_EVERY = 50  # batches
CLOCK_PAUSE_S = 0.001  # an entry of the server's current millisecond waits for the next
ELSEWHERE_PAUSE_MS = 20  # how often to look again while another consumer's entry goes first
LONG_WAIT_MS = 10_000  # a waiting entry older than this is logged, once
Key = tuple[str, str]  # (stream kind, entry id)


class Interrupted(Exception):
    """Shutdown was requested while the batch in hand waited for the database."""


@dataclass
class ConsumerStats:
    """Running totals, for the log, the demo summary and metrics."""

    applied: int = 0
    duplicates: int = 0
    waiting: int = 0  # entries of this consumer's that wait now
    expired_sessions: int = 0
    batches: int = 0
    dead: Counter[str] = field(default_factory=Counter)


class EventConsumer:
    """Reads both event streams in one XREADGROUP and applies them in batches."""

    def __init__(
        self,
        services: Services,
        consumer: str,
        stop: threading.Event,
        burst: bool = False,
        metrics: Metrics = NO_METRICS,
    ) -> None:
        self.services = services
        self.metrics = metrics
        self.settings = services.settings
        self.keys = services.keys
        self.redis = services.redis
        self.engine = services.engine
        self.consumer = consumer
        self.stop = stop
        self.burst = burst
        self.streams = [self.keys.update_stream, self.keys.terminate_stream]
        self.kinds = {
            self.keys.update_stream: EventKind.UPDATE,
            self.keys.terminate_stream: EventKind.TERMINATE,
        }
        self.stream_of = {str(kind): stream for stream, kind in self.kinds.items()}
        self.buffer: list[Entry] = []  # delivered, not decidable yet (`take_ready`)
        self.horizon: dict[str, str | None] = dict.fromkeys(self.streams)
        self.held: dict[Key, Entry] = {}  # this consumer's entries that wait
        self.failures: Counter[Key] = Counter()  # deliveries that ended without a decision
        self.needs_setup = True
        self.pause_ms: int | None = None  # the next read's block when nothing could be decided
        self.clock_ms = 0  # the server's clock at the last read
        self.horizon_ms = 0  # every entry of an earlier millisecond is decided or in hand
        self.logged_waits: set[Order] = set()
        # Dirty at start-up: a previous worker may have stopped before its refresh.
        # The clock starts now, so a backlog met at start-up is not held up by a
        # full re-rank before its first batch; the first idle moment (or
        # `rank_refresh_s` of continuous load) makes ranks exact.
        self.ranks_dirty = True
        self.last_rank_refresh = time.monotonic()
        self.last_claim = 0.0
        self.last_fresh = time.monotonic()
        self.backoff = Backoff()
        # A committed batch's dead letters, cache writes and acks: held until the next
        # read has gone out (`next_entries`), then sent, and their replies read after
        # the next batch's commit, so Redis works on them while Python works on that.
        self.unsent: cache.CommandBatch | None = None
        self.in_flight: cache.InFlight | None = None
        self.limits = self.settings.limits()
        self.store = EventStore(self.engine, self.stream_of, self.limits)
        self.player_hashes = cache.PlayerHashes(self.keys, self.settings.user_cache_ttl)
        self.stats = ConsumerStats()
        self.log = log.bind(consumer=consumer)

    # -- the loop ------------------------------------------------------------------

    def run(self) -> None:
        """Consume until `stop` is set (or, in burst mode, until the streams are drained)."""
        self.log.info("event consumer started", batch_size=self.settings.batch_size)
        tune_gc()
        while not self.stop.is_set():
            try:
                if self.needs_setup:
                    self.setup()
                entries = self.next_entries()
                if entries or self.expiry_due():
                    self.handle(entries)
                    del entries
                    self.collect_garbage()
                elif self.on_idle():
                    break
                self.backoff.reset()
            except Interrupted:
                break
            except REDIS_ERRORS as exc:
                # Writes not confirmed are dropped: their entries, committed but not
                # acked, come back and are acked as duplicates (caches refreshed).
                self.unsent, self.in_flight = None, None
                self.wait_backoff(redis_unreachable(self.settings.redis_url, exc))
            except DATABASE_ERRORS as exc:
                self.store.close()
                self.wait_backoff(database_unreachable(self.settings.database_url, exc))
            except ResponseError as exc:
                if not is_missing_group(exc):
                    raise
                self.log.warning("consumer group missing (Redis restarted?); recreating it")
                self.needs_setup = True
        self.settle_on_exit()
        self.store.close()
        gc.enable()
        self.log.info(
            "event consumer stopped",
            applied=self.stats.applied,
            duplicates=self.stats.duplicates,
            dead_lettered=sum(self.stats.dead.values()),
            waiting=len(self.held),
        )

    def setup(self) -> None:
        """Create the groups, then take this consumer's own pending entries in hand first."""
        self.flush()
        self.settle()
        for stream in self.streams:
            ensure_group(self.redis, stream, EVENTS_GROUP)
        self.ensure_leaderboard_cache()
        self.buffer.clear()
        self.held.clear()
        self.horizon = dict.fromkeys(self.streams)
        self.take_back({stream: [] for stream in self.streams}, "recovering own pending entries")
        self.needs_setup = False

    def ensure_leaderboard_cache(self) -> None:
        """Rebuild `um:leaderboard` from SQL when Redis lost it (a restart, a fresh server).

        Batches only raise the scores of the players they touch, so a set rebuilt that
        way alone would rank a player against part of the population.
        """
        if self.redis.exists(self.keys.leaderboard):
            return
        pipe = self.redis.pipeline(transaction=True)
        players = rebuild_leaderboard_cache(self.engine, pipe, self.keys, replace=False)
        pipe.execute()
        if players:
            self.log.info("leaderboard cache rebuilt from the database", players=players)

    def wait_backoff(self, message: str) -> None:
        delay = self.backoff.next_delay()
        self.log.error(message, retry_in_s=round(delay, 2))
        self.stop.wait(delay)

    def on_idle(self) -> bool:
        """Make ranks exact while nothing arrives; in burst mode, say whether we are done.

        `next_entries` sent the last batch's writes before its read blocked; their
        replies are read here, so an idle worker has nothing in flight.
        """
        self.settle()
        if self.buffer:
            if self.pause_ms is None:
                time.sleep(CLOCK_PAUSE_S)  # the clock has to leave the buffer's millisecond
            return False
        if self.ranks_dirty:
            self.refresh_ranks()
        gc.collect()  # also the auth threads' garbage: automatic collection is off
        return self.burst  # drained: what still waits stays recorded, and pending

    # -- reading -------------------------------------------------------------------

    def next_entries(self) -> list[Entry]:
        """Entries that can be decided now: every earlier entry is known (`take_ready`).

        With the last batch's writes still unsent, new entries are read first (without
        blocking): Redis answers at once, then works on those writes while this batch is
        parsed, planned and written. A read only blocks once nothing is left unsent.
        """
        self.buffer += self.claim_abandoned()
        if self.unsent is not None:
            block_ms = None
        elif self.buffer:
            block_ms = self.pause_ms
        else:
            block_ms = None if self.burst else BLOCK_MS
            if block_ms is not None and self.held:  # keep them fresh in time
                block_ms = max(1, min(block_ms, self.settings.claim_idle_ms // 3))
        read = self.read_new(block_ms)
        self.flush()
        self.keep_fresh()
        return self.take_ready(read)

    def read_new(self, block_ms: int | None) -> GroupRead:
        """New entries of the streams whose buffered entries are fewer than a batch."""
        size = self.settings.batch_size
        buffered = Counter(entry.stream for entry in self.buffer)
        wanted = [s for s in self.streams if buffered[s] < size]
        read = read_group(
            self.redis, EVENTS_GROUP, self.consumer, wanted, size, block_ms, self.streams
        )
        for stream in wanted:
            mine = [entry for entry in read.entries if entry.stream == stream]
            # A stream that came back full may hide later entries: nothing past its
            # last entry can be decided before it has been read further.
            self.horizon[stream] = mine[-1].entry_id if len(mine) >= size else None
        self.buffer += read.entries
        self.clock_ms = read.clock_ms
        return read

    def take_ready(self, read: GroupRead) -> list[Entry]:
        """The buffered entries before the first one that might still be unknown.

        Known are: entries of a millisecond before the read's server clock (an entry id
        takes that clock), unless a stream came back full, and unless an earlier entry
        is pending undecided on another consumer (it goes first: a later one may
        depend on it).
        """
        limits: list[Order] = [(self.clock_ms, -1, 0)]
        for stream, last in self.horizon.items():
            if last is not None:
                ms, rank, seq = self.kind_order(stream, last)
                limits.append((ms, rank, seq + 1))
        elsewhere = self.undecided_elsewhere(read)
        if elsewhere is not None:
            limits.append(elsewhere)
        cutoff = min(limits)
        self.buffer.sort(key=self.order)
        count = 0
        for entry in self.buffer:
            if self.order(entry) >= cutoff:
                break
            count += 1
        ready, self.buffer = self.buffer[:count], self.buffer[count:]
        self.horizon_ms = cutoff[0]
        if self.buffer and not ready:
            self.pause_ms = ELSEWHERE_PAUSE_MS if elsewhere == cutoff else None
        else:
            self.pause_ms = None
        return ready

    def undecided_elsewhere(self, read: GroupRead) -> Order | None:
        """The first entry pending on another consumer that nobody has decided yet.

        Entries up to a stream's checkpoint are decided, or recorded as waiting: every
        entry before a batch's last was in the batch, decided before, or waiting. One
        still pending there lost its ack to a crash, and holds nobody up.
        """
        if not any(read.others.values()):
            return None
        waiting, committed = self.decisions_so_far()
        mine: set[Key] | None = None  # an entry taken over from this consumer, still in hand
        first: Order | None = None
        for stream, count in read.others.items():
            if not count:
                continue
            kind = str(self.kinds[stream])
            after = committed.get(stream)
            for entry_id in pending_elsewhere(
                self.redis, stream, EVENTS_GROUP, self.consumer, after
            ):
                if (kind, entry_id) in waiting:
                    continue
                if mine is None:
                    mine = {self.key(entry) for entry in self.buffer}
                if (kind, entry_id) in mine:
                    continue
                order = entry_order(kind, entry_id)
                if first is None or order < first:
                    first = order
                break  # ids come oldest first: the rest of this stream are later
        return first

    def waiting_keys(self) -> set[Key]:
        """Every entry recorded as waiting, whichever consumer holds it."""
        with self.engine.connect() as conn:
            return waiting_keys(conn)

    def decisions_so_far(self) -> tuple[set[Key], dict[str, str]]:
        """The entries recorded as waiting, and each stream's checkpoint."""
        with self.engine.connect() as conn:
            return waiting_keys(conn), load_checkpoints(conn)

    def kind_order(self, stream: str, entry_id: str) -> Order:
        """Where an entry of `stream` goes in the merged order (`entry_order`)."""
        return entry_order(self.kinds[stream], entry_id)

    def order(self, entry: Entry) -> Order:
        return entry_order(self.kinds[entry.stream], entry.entry_id)

    def key(self, entry: Entry) -> Key:
        return str(self.kinds[entry.stream]), entry.entry_id

    def claim_abandoned(self) -> list[Entry]:
        """XAUTOCLAIM entries idle for `claim_idle_ms` on consumers that went away."""
        now = time.monotonic()
        if now - self.last_claim < min(self.settings.claim_idle_ms / 1000 / 2, 5.0):
            return []
        self.last_claim = now
        entries: list[Entry] = []
        waiting: set[Key] | None = None
        # Entries already in hand are idle too; taking them back must not count as a
        # delivery (that would bring them closer to max_deliveries) nor apply them twice.
        for stream in self.streams:
            in_hand = {entry_id for kind, entry_id in self.held if self.stream_of[kind] == stream}
            in_hand.update(entry.entry_id for entry in self.buffer if entry.stream == stream)
            claimed = claim_idle(
                self.redis,
                stream,
                EVENTS_GROUP,
                self.consumer,
                self.settings.claim_idle_ms,
                self.settings.batch_size,
                keep=in_hand,
            )
            if claimed and waiting is None:
                waiting = self.waiting_keys()
            for entry in claimed:
                key = self.key(entry)
                if waiting is not None and key in waiting:
                    self.held[key] = entry  # a dead consumer's waiting entry: still waits
                else:
                    entries.append(entry)
        for entry in entries:
            # A claimed entry was delivered, so every entry of its stream not delivered
            # yet comes after it: it may be decided, though this stream was not read past it.
            last = self.horizon.get(entry.stream)
            if last is not None and entry_id_key(entry.entry_id) > entry_id_key(last):
                self.horizon[entry.stream] = entry.entry_id
        if entries:
            self.log.info("claimed abandoned entries", count=len(entries))
        return entries

    def keep_fresh(self) -> None:
        """Keep the entries in hand from looking abandoned, without counting a delivery."""
        now = time.monotonic()
        if now - self.last_fresh < self.settings.claim_idle_ms / 1000 / 3:
            return
        self.last_fresh = now
        held: dict[str, list[str]] = {stream: [] for stream in self.streams}
        for entry in [*self.held.values(), *self.buffer]:
            held[entry.stream].append(entry.entry_id)
        gone = keep_fresh(self.redis, EVENTS_GROUP, self.consumer, held)
        if gone:  # decided and acked by another worker (or trimmed)
            self.held = {k: e for k, e in self.held.items() if e.entry_id not in gone}
            self.buffer = [e for e in self.buffer if e.entry_id not in gone]
        self.release_decided()
        self.stats.waiting = len(self.held)
        self.settle()  # acks sent last must have landed before the pending list is read
        self.take_back(held, "took back entries a lost read left pending")

    def release_decided(self) -> None:
        """Held entries no longer recorded as waiting go back to the buffer.

        Another worker woke and decided them, then died before its ack: decided again
        here, they come out as duplicates or as their recorded dead letter, and are
        acked.
        """
        if not self.held:
            return
        waiting = self.waiting_keys()
        decided = [key for key in self.held if key not in waiting]
        for key in decided:
            self.buffer.append(self.held.pop(key))
        if decided:
            self.log.info("held entries decided elsewhere, to be acked", count=len(decided))

    def take_back(self, in_hand: dict[str, list[str]], why: str) -> None:
        """Take in hand this consumer's pending entries it does not hold yet.

        At start-up, what a crashed predecessor of the same name left pending; later,
        what a read whose reply was lost (Redis restarted, or the connection dropped
        after XREADGROUP ran) left pending unseen, which every other worker would wait
        for until `claim_idle_ms`. Entries recorded as waiting stay waiting (taking them
        back counts nothing); the rest were delivered and never decided: taking them
        again is a delivery. They go through the buffer, not applied at once: older
        entries of the other stream may not have been read yet, and go first, so the
        stream's horizon covers them.
        """
        waiting: set[Key] | None = None
        for stream in self.streams:
            known = set(in_hand[stream])
            pending = own_pending(self.redis, stream, EVENTS_GROUP, self.consumer)
            missing = [entry_id for entry_id in pending if entry_id not in known]
            if not missing:
                continue
            if waiting is None:
                waiting = self.waiting_keys()
            kind = str(self.kinds[stream])
            undecided = [i for i in missing if (kind, i) not in waiting]
            recorded = [i for i in missing if (kind, i) in waiting]
            for entry in entries_of(self.redis, stream, recorded):
                self.held[(kind, entry.entry_id)] = entry
            taken = claim_own(self.redis, stream, EVENTS_GROUP, self.consumer, undecided)
            self.buffer += taken
            last = self.horizon.get(stream)
            if taken and (last is None or entry_id_key(taken[-1].entry_id) > entry_id_key(last)):
                self.horizon[stream] = taken[-1].entry_id
            self.log.info(why, stream=stream, undecided=len(undecided), waiting=len(recorded))

    def expiry_due(self) -> bool:
        """Whether a waiting entry has outlived `max_wait_s` (or nobody knows yet)."""
        waiters = self.store.known.waiters
        if waiters is None:
            return bool(self.held)
        oldest = waiters.oldest()
        limit = self.horizon_ms if self.horizon_ms else self.clock_ms
        return oldest is not None and oldest.entry.ms + self.limits.max_wait_ms < limit

    # -- one batch -----------------------------------------------------------------

    def handle(self, entries: list[Entry]) -> None:
        """Validate, decide in one transaction, then write caches, dead letters and acks."""
        started = time.perf_counter()
        parsed: dict[Key, Entry] = {}
        planned: list[PlannedEntry] = []
        dead: list[tuple[Entry, str, str]] = []
        for entry in entries:
            key = self.key(entry)
            if entry.deliveries + self.failures[key] > self.settings.max_deliveries:
                entry.deliveries += self.failures[key]
                message = f"delivered {entry.deliveries} times without being decided"
                dead.append((entry, DeadLetterReason.MAX_DELIVERIES, message))
                continue
            try:
                event = parse_event(self.kinds[entry.stream], entry.payload)
            except InvalidPayload as exc:
                dead.append((entry, exc.reason, exc.message))
                continue
            parsed[key] = entry
            planned.append(
                PlannedEntry(event, key[0], entry.entry_id, entry.payload, entry.deliveries > 1)
            )

        results = self.apply(planned, parsed, dead)
        self.settle()  # the previous batch's replies, read while this one's SQL ran
        batch = cache.CommandBatch()
        acks: list[Entry] = [entry for entry, _, _ in dead]
        outcomes: list[tuple[str, str]] = []
        applied = 0
        for result in results:
            self.write_caches(batch, result.world, result.plan.changes)
            self.stats.expired_sessions += len(result.plan.expired_sessions)
            for item, decision in result.plan.decided:
                key = (item.stream_kind, item.entry_id)
                if key in parsed:
                    entry = parsed.pop(key)
                elif key in self.held:
                    entry = self.held.pop(key)
                else:
                    entry = self.stranger(item)
                self.failures.pop(key, 0)
                acks.append(entry)
                outcomes.append((entry.stream, decision.outcome))
                if decision.outcome is Outcome.DEAD:
                    assert decision.reason is not None
                    dead.append((entry, decision.reason, decision.message))
                elif decision.outcome is Outcome.DUPLICATE:
                    self.stats.duplicates += 1
                else:
                    applied += 1
            if result.plan.changes.stats:
                self.ranks_dirty = True
        self.held.update(parsed)  # what was not decided waits
        self.stats.applied += applied
        self.stats.waiting = len(self.held)
        self.unsent = self.publish(batch, dead, acks)
        for result in results:
            self.store.known.release_ended(result.plan.changes)
        self.stats.batches += 1
        seconds = time.perf_counter() - started
        self.metrics.observe_event_batch(len(entries), seconds, outcomes, dead)
        self.observe_waiting()
        for _, reason, _ in dead:
            self.stats.dead[str(reason)] += 1
        if (
            self.ranks_dirty
            and time.monotonic() - self.last_rank_refresh >= self.settings.rank_refresh_s
        ):
            self.refresh_ranks()
        self.log.info(
            "batch done",
            entries=len(entries),
            applied=applied,
            dead_lettered=len(dead),
            waiting=len(self.held),
            duration_ms=round((time.perf_counter() - started) * 1000, 2),
        )

    def stranger(self, item: PlannedEntry) -> Entry:
        """A waiting entry another consumer holds, decided here (acked by id, like any)."""
        return Entry(self.stream_of[item.stream_kind], item.entry_id, item.payload)

    def observe_waiting(self) -> None:
        """Waiting entries for the metrics, and a log line for each that waited long."""
        waiters = self.store.known.waiters
        if waiters is None:
            return
        oldest = waiters.oldest()
        age_s = max(0.0, (self.clock_ms - oldest.entry.ms) / 1000) if oldest else 0.0
        self.metrics.observe_waiting(len(waiters), age_s)
        if oldest is None or self.clock_ms - oldest.entry.ms < LONG_WAIT_MS:
            return
        for waiter in waiters:
            order = waiter.entry.order
            if self.clock_ms - waiter.entry.ms < LONG_WAIT_MS:
                break
            if order not in self.logged_waits:
                self.logged_waits.add(order)
                self.log.warning(
                    "entry waiting",
                    stream=self.stream_of[waiter.entry.stream_kind],
                    entry_id=waiter.entry.entry_id,
                    waited_s=round((self.clock_ms - waiter.entry.ms) / 1000, 1),
                    waits_for=waiter.waits_for,
                )
        self.logged_waits &= set(waiters.by_order)

    def collect_garbage(self) -> None:
        """Collect between batches, once the batch's objects are gone.

        The young generation each time, everything every `FULL_COLLECTION_EVERY` batches.
        """
        if self.stats.batches % FULL_COLLECTION_EVERY == 0:
            gc.collect()
        else:
            gc.collect(0)

    def apply(
        self,
        planned: list[PlannedEntry],
        parsed: dict[Key, Entry],
        dead: list[tuple[Entry, str, str]],
    ) -> list[Applied]:
        """Commit the batch; the database being away pauses here until it is back."""
        backoff = Backoff()
        while True:
            try:
                return [self.store.apply(planned, self.horizon_ms, datetime.now(UTC))]
            except DATABASE_ERRORS as exc:
                delay = backoff.next_delay()
                self.log.error(
                    database_unreachable(self.settings.database_url, exc),
                    retry_in_s=round(delay, 2),
                )
                if self.stop.wait(delay):
                    raise Interrupted from None
            except Exception as exc:
                # One entry is poison: isolate it so the others still apply.
                self.log.warning("batch failed; applying entries one by one", error=repr(exc))
                return self.apply_one_by_one(planned, parsed, dead)

    def apply_one_by_one(
        self,
        planned: list[PlannedEntry],
        parsed: dict[Key, Entry],
        dead: list[tuple[Entry, str, str]],
    ) -> list[Applied]:
        """Each entry in its own transaction; one that fails again is not decided.

        It stays pending (and is read again after a pause); its failures count as
        deliveries, so a poison entry ends as `max_deliveries`.
        """
        results: list[Applied] = []
        failed = False
        for item in planned:
            key = (item.stream_kind, item.entry_id)
            try:
                results.append(self.store.apply([item], self.horizon_ms, datetime.now(UTC)))
            except DATABASE_ERRORS:
                raise
            except Exception as exc:
                self.log.exception("entry failed", entry_id=item.entry_id, error=repr(exc))
                entry = parsed.pop(key)
                self.failures[key] += 1
                attempts = entry.deliveries + self.failures[key] - 1
                if attempts >= self.settings.max_deliveries:
                    entry.deliveries = attempts
                    message = f"failed to apply {attempts} times: {exc!r}"
                    dead.append((entry, DeadLetterReason.MAX_DELIVERIES, message))
                else:
                    self.buffer.append(entry)
                    failed = True
        if failed:
            self.stop.wait(self.settings.retry_delay_ms / 1000)
        return results

    # -- after the commit ------------------------------------------------------------

    def publish(
        self, batch: cache.CommandBatch, dead: list[tuple[Entry, str, str]], acks: list[Entry]
    ) -> cache.CommandBatch:
        """A committed batch's caches, then its dead letters and acks (acks last)."""
        for entry, reason, message in dead:
            letter = dead_letter_payload(entry, reason, message)
            batch.add("XADD", self.keys.dlq, "*", "payload", letter)
            self.log.warning(
                "entry dead-lettered",
                stream=entry.stream,
                entry_id=entry.entry_id,
                reason=str(reason),
                error=message,
            )
        for stream in self.streams:
            ids = [entry.entry_id for entry in acks if entry.stream == stream]
            if ids:
                batch.add("XACK", stream, EVENTS_GROUP, *ids)
        return batch

    def flush(self) -> None:
        """Send the held writes in one write (after reading the replies of the last ones)."""
        unsent, self.unsent = self.unsent, None
        if unsent is not None:
            self.settle()
            self.in_flight = unsent.send(self.redis)

    def settle(self) -> None:
        """Read the replies of the batch sent last; an error reply is raised here."""
        in_flight, self.in_flight = self.in_flight, None
        if in_flight is not None:
            in_flight.wait()

    def settle_on_exit(self) -> None:
        try:
            self.flush()
            self.settle()
        except (*REDIS_ERRORS, ResponseError) as exc:
            # Committed but maybe not acked: redelivered later and acked as a duplicate.
            self.log.warning("last batch's acks not confirmed", error=repr(exc))

    def write_caches(self, batch: cache.CommandBatch, world: World, changes: Changes) -> None:
        """Session hashes, players' user hashes and leaderboard scores, each key once."""
        players = world.by_id
        for session_id in changes.touched_sessions:
            session = world.sessions.get(session_id)
            if session is None:
                continue
            if session_is_live(session):
                cache.queue_session(
                    batch,
                    self.keys,
                    session_id,
                    players=[players[uid].username for uid in session.roster if uid in players],
                    status=session.status,
                    meta=_json(session.meta),
                    created_at=session.created_at.isoformat(),
                    updated_at=session.updated_at.isoformat(),
                )
            else:
                batch.add("DEL", self.keys.session(session_id))
        scores: dict[str, int] = {}
        for user_id in changes.touched_users:
            player = players.get(user_id)
            if player is None:
                continue
            live = world.live_session_of.get(player.id)
            self.player_hashes.queue(batch, player, live)
            scores[player.username] = player.earnings
        cache.queue_leaderboard_scores(batch, self.keys, scores)

    def refresh_ranks(self) -> None:
        started = time.perf_counter()
        with self.store.transaction() as conn:
            changed = refresh_ranks(conn)
        self.store.known.forget()  # cached players hold the ranks of before
        self.ranks_dirty = False
        self.last_rank_refresh = time.monotonic()
        self.log.info(
            "ranks refreshed",
            changed=changed,
            duration_ms=round((time.perf_counter() - started) * 1000, 2),
        )


def tune_gc() -> None:
    """Keep Python's cyclic collector off the hot path (measured 25-35% faster).

    Everything alive after start-up (modules, SQLAlchemy metadata, pydantic schemas)
    is frozen out of the collector's scans, and automatic collection is off: a batch
    allocates hundreds of thousands of short-lived objects, nearly all freed by
    reference counting, and a collection triggered mid-batch would scan the batch's
    live objects again and again. `collect_garbage` runs between batches instead,
    when those objects are gone, so cyclic garbage never outlives one batch.
    """
    gc.collect()
    gc.freeze()
    gc.disable()


def _json(value: object) -> str:
    import orjson

    return orjson.dumps(value).decode()
