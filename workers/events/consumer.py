"""The game-event consumer: the loop over update and terminate streams, each entry applied
once what it depends on has been (`usermgmt.domain.planner`).

Delivery semantics (docs/protocol.md, "Delivery"), each kept by one part:
- entries are decided in their merged order, and only once every earlier entry is
  known: the read's server clock, a stream cut short by COUNT, and entries pending
  on other consumers bound what may be decided (`intake`);
- an entry is acked only after its effect (and its event id) is committed
  (`after_commit`: caches, dead letters, then acks, sent once the next read is out);
- permanent failures are dead-lettered at once and acked (`batch`);
- an entry that waits stays pending, recorded in `waiting_events`, and is kept fresh
  (XCLAIM JUSTID) so no other consumer reclaims it and no delivery is counted; it is
  decided again as soon as what it waits for is applied, by whichever worker applies
  that, or dead-lettered as `wait_timeout`;
- a delivery that ends without a decision (a crash, an entry that fails to apply)
  counts, and `max_deliveries` of them dead-letter the entry (`batch`);
- the database being away pauses the batch in hand (nothing is dead-lettered for it);
- a key of the worker's holding another type of value is mended or waited out
  (`wrong_type`).

This module wires those parts and runs the loop: set-up and recovery, the next
entries, one batch, when its writes go out and their replies are read, and ranks.
"""

from __future__ import annotations

import gc
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import structlog
from redis.exceptions import ResponseError
from structlog.typing import FilteringBoundLogger

from usermgmt.domain.events import EventKind
from usermgmt.domain.games import Order
from usermgmt.persistence import cache
from usermgmt.persistence.command_batch import WrongType
from usermgmt.persistence.keys import EVENTS_GROUP
from usermgmt.persistence.ranking import rebuild_leaderboard_cache, refresh_ranks
from usermgmt.workers.events.after_commit import AfterCommit
from usermgmt.workers.events.batch import Applier, Interrupted
from usermgmt.workers.events.gc_policy import BetweenBatches, tune_gc
from usermgmt.workers.events.intake import Intake, Key
from usermgmt.workers.events.lease import STANDBY_POLL_S, Lease
from usermgmt.workers.events.ranks import READING_POLL_MS, RankRefresher
from usermgmt.workers.events.store import EventStore
from usermgmt.workers.events.wrong_type import KeyRepair
from usermgmt.workers.runtime.bootstrap import Services
from usermgmt.workers.runtime.connections import (
    DATABASE_ERRORS,
    REDIS_ERRORS,
    conflict_of,
    database_unreachable,
    redis_unreachable,
)
from usermgmt.workers.runtime.lag import LagWindow
from usermgmt.workers.runtime.metrics import NO_METRICS, Metrics
from usermgmt.workers.runtime.streams import Backoff, Entry, ensure_group, is_missing_group

__all__ = ["ConsumerStats", "EventConsumer", "Interrupted", "tune_gc"]

log = structlog.get_logger("usermgmt.events")

BLOCK_MS = 1_000
RANKS_DIRTY_TTL_S = 3600  # a hand-over's note to the next reader (`stand_by`)
STOPPED_TTL_S = 7 * 24 * 3600  # a clean stop is remembered this long for a restart
CLOCK_PAUSE_S = 0.001  # an entry of the server's current millisecond waits for the next
LONG_WAIT_MS = 10_000  # a waiting entry older than this is logged, once
TAKEOVER_REPEAT_S = 60.0  # after taking the reader lease over: see `AfterCommit.repeat_for`


@dataclass
class ConsumerStats:
    """Running totals, for the log, the demo summary and metrics."""

    applied: int = 0
    duplicates: int = 0
    waiting: int = 0  # entries of this consumer's that wait now
    expired_sessions: int = 0
    batches: int = 0
    dead: Counter[str] = field(default_factory=Counter)
    conflicts: Counter[str] = field(default_factory=Counter)  # by `conflict_of` kind


class EventConsumer:
    """Reads both event streams in one XREADGROUP and applies them in batches.

    `intake` holds the entries in hand and says which are ready, `applier` decides a
    batch of them, `after_commit` queues what the batch writes to Redis.
    """

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
        self.kinds = {
            self.keys.update_stream: EventKind.UPDATE,
            self.keys.terminate_stream: EventKind.TERMINATE,
        }
        self.streams = list(self.kinds)
        self.stream_of = {str(kind): stream for stream, kind in self.kinds.items()}
        self.needs_setup = True
        self.logged_waits: set[Order] = set()
        self.backoff = Backoff()
        # A committed batch's dead letters, cache writes and acks: held until the next
        # read has gone out (`next_entries`), then sent, and their replies read after
        # the next batch's commit, so Redis works on them while Python works on that.
        self.unsent: cache.CommandBatch | None = None
        self.in_flight: cache.InFlight | cache.ClusterInFlight | None = None
        # The applied entries of those writes, (stream, entry-id ms): their lag is
        # measured once the acks are confirmed (`settle`).
        self.unsent_applied: list[tuple[str, int]] = []
        self.in_flight_applied: list[tuple[str, int]] = []
        self.lag = LagWindow()
        self.waited_for_entries = False  # the last read blocked (`on_idle`)
        self.limits = self.settings.limits()
        self.store = EventStore(self.engine, self.stream_of, self.limits)
        self.stats = ConsumerStats()
        self.garbage = BetweenBatches()
        self.log: FilteringBoundLogger = log.bind(consumer=consumer)
        self.ranks = RankRefresher(self.store, self.settings.rank_refresh_s, self.log, metrics)
        self.intake = Intake(self.redis, self.engine, self.settings, consumer, self.kinds, self.log)
        # One worker reads new entries at a time (`lease`); a burst run is a one-off.
        self.lease = Lease(
            self.redis,
            self.keys.events_reader,
            consumer,
            enabled=self.settings.events_lease and not burst,
        )
        self.standing_by = False
        self.key_repair = KeyRepair(self.redis, self.engine, self.keys, stop)
        player_hashes = cache.PlayerHashes(self.keys, self.settings.user_cache_ttl)
        self.after_commit = AfterCommit(
            self.redis,
            self.keys,
            self.streams,
            player_hashes,
            self.log,
            delete_again=not self.lease.enabled and not burst,  # several writers at once
        )
        self.applier = Applier(
            self.store, self.intake, self.settings, stop, self.log, self.after_commit.pack
        )

    @property
    def buffer(self) -> list[Entry]:
        """Entries delivered, not decidable yet (`Intake.take_ready`)."""
        return self.intake.buffer

    @property
    def held(self) -> dict[Key, Entry]:
        """This consumer's entries that wait."""
        return self.intake.held

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
                    self.garbage.collect()
                elif self.on_idle():
                    break
                self.step_ranks()
                self.backoff.recovered(self.log, "the event consumer")
            except Interrupted:
                break
            except REDIS_ERRORS as exc:
                self.drop_writes()
                self.wait_backoff(redis_unreachable(self.settings.redis_url, exc))
            except WrongType as exc:
                self.drop_writes()
                self.key_repair.handle(exc, self.log, self.wait_backoff)
            except DATABASE_ERRORS as exc:
                self.store.close()
                conflict = conflict_of(exc)
                if conflict is None:
                    self.wait_backoff(database_unreachable(self.settings.database_url, exc))
                else:
                    self.retry_conflict(conflict, exc)
            except ResponseError as exc:
                if not is_missing_group(exc):
                    raise
                self.log.warning("consumer group missing (Redis restarted?); recreating it")
                self.needs_setup = True
        self.settle_on_exit()
        self.release_lease()
        self.ranks.abandon()
        self.refresh_ranks_on_exit()
        self.store.close()
        self.mark_stopped()
        gc.enable()
        self.log.info(
            "event consumer stopped",
            applied=self.stats.applied,
            duplicates=self.stats.duplicates,
            dead_lettered=sum(self.stats.dead.values()),
            waiting=len(self.held),
        )

    def drop_writes(self) -> None:
        """Forget the writes not confirmed: their entries, committed but maybe not acked,
        come back and are acked as duplicates (caches written again)."""
        self.unsent, self.in_flight = None, None
        self.unsent_applied, self.in_flight_applied = [], []
        self.intake.look_at_pending_soon()

    def setup(self) -> None:
        """Create the groups, then take this consumer's own pending entries in hand first."""
        self.flush()
        self.settle()
        for stream in self.streams:
            ensure_group(self.redis, stream, EVENTS_GROUP)
        self.ensure_leaderboard_cache()
        self.key_repair.write_unwritten(self.log, self.wait_backoff)  # left by a stop
        self.intake.reset()
        stopped = self.redis.getdel(self.keys.events_stopped(self.consumer))
        self.intake.take_back(
            {stream: [] for stream in self.streams},
            "recovering own pending entries",
            delivery=stopped is None,  # a crash counts one; a clean stop none
        )
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

    def retry_conflict(self, kind: str, exc: BaseException) -> None:
        """Another worker's transaction won (a deadlock, a lock wait): count it, wait a
        few random milliseconds so the two do not meet again, and take the batch again
        (its entries are still pending on this consumer: `keep_fresh` takes them back)."""
        self.stats.conflicts[kind] += 1
        self.metrics.observe_conflict(kind)
        self.log.warning("transaction conflicted with another one; retrying", kind=kind)
        self.log.debug("conflict", error=repr(exc))
        self.stop.wait(random.uniform(0.005, 0.05))

    def wait_backoff(self, message: str) -> None:
        self.stop.wait(self.backoff.retry(self.log, message))

    def on_idle(self) -> bool:
        """Make ranks exact while nothing arrives (a refresh in slices, `step_ranks`,
        then none while nothing changes); in burst mode, say whether we are done.

        `next_entries` sent the last batch's writes before its read blocked; their
        replies are read here, so an idle worker has nothing in flight. Idle means a
        read that waited (`BLOCK_MS`) and got nothing: the quick read that follows
        every batch often finds nothing yet under a steady trickle of traffic, and a
        full re-rank and collection there would hold up the entries arriving next.
        """
        self.settle()
        self.observe_waiting()  # their ages grow with the clock, batches or none
        self.send_due_deletes()
        if self.buffer:
            if self.intake.pause_ms is None:
                time.sleep(CLOCK_PAUSE_S)  # the clock has to leave the buffer's millisecond
            return False
        if not self.burst and not self.waited_for_entries:
            return False
        if not self.burst and self.lease.enabled and self.redis.getdel(self.keys.ranks_dirty):
            self.ranks.dirty = True  # a worker that stood by left them so
        if not self.burst and self.ranks.due(idle=True):
            self.begin_rank_refresh()
        gc.collect()  # also the auth threads' garbage: automatic collection is off
        return self.burst  # drained: what still waits stays recorded, and pending

    # -- the next entries ----------------------------------------------------------

    def next_entries(self) -> list[Entry]:
        """Entries that can be decided now: every earlier entry is known (`take_ready`).

        With the last batch's writes still unsent, new entries are read first (without
        blocking): Redis answers at once, then works on those writes while this batch is
        parsed, planned and written. A read only blocks once nothing is left unsent.
        """
        intake = self.intake
        reading = self.lease.held()  # renewed here, busy or not: a reader keeps it
        if not reading:
            if intake.buffer or intake.held or intake.pending_outside_hands():
                self.hand_over()
            self.stand_by()
            return []
        if self.standing_by:
            self.standing_by = False
            self.ranks.dirty = True  # the worker that read meanwhile may have left them so
            # Its last writes may still be on their way (a stalled link, up to the socket
            # timeout): an ended session's hash is deleted again meanwhile.
            self.after_commit.repeat_for(TAKEOVER_REPEAT_S)
            self.log.info("reading new entries (holding the reader lease)")
        intake.buffer += intake.claim_abandoned()
        if self.unsent is not None or self.ranks.writing:
            block_ms = None
        elif intake.buffer:
            block_ms = intake.pause_ms
        else:
            block_ms = None if self.burst else BLOCK_MS
            if block_ms is not None and intake.held:  # keep them fresh in time
                block_ms = max(1, min(block_ms, self.settings.claim_idle_ms // 3))
            if block_ms is not None and self.ranks.reading:  # its slices start soon
                block_ms = min(block_ms, READING_POLL_MS)
        self.waited_for_entries = bool(block_ms)
        if block_ms:
            self.settle()  # about to wait: the replies (on a cluster, the acks) go first
        intake.batch_size = self.ranks.read_size(self.settings.batch_size)
        read = intake.read_new(block_ms)
        if any(read.others.values()):
            # Another worker holds entries: it may be writing caches beside this one.
            self.after_commit.repeat_for(TAKEOVER_REPEAT_S)
        self.flush()
        self.keep_fresh()
        return intake.take_ready(read)

    def hand_over(self) -> None:
        """Without the reader lease, with entries in hand (a restart that found another
        worker reading, or a lease lost under load): give them all to the reader.

        A worker that kept deciding them beside the reader would also read on, and two
        readers take turns entry by entry (each may decide only up to the other's first
        undecided entry): the soak's two workers then crawled at a few entries a batch
        for minutes, while restarts counted deliveries against the entries they held.
        This worker's writes land first (`flush`, `settle`), then everything pending on
        it goes to the reader (`Intake.hand_over`): its entries in hand, and those it
        does not hold (left by a lost reply, or handed to it as it lost the lease),
        which would otherwise wait out `claim_idle_ms`. The world it knew goes too.
        """
        reader = self.lease.holder()
        if reader is None or reader == self.consumer:
            return  # free (or ours again): taken at the next look
        self.flush()
        self.settle()
        in_hand = self.intake.ids_in_hand()
        self.intake.take_back(in_hand, "took in entries to hand over", delivery=False)
        handed = self.intake.hand_over(reader)
        self.store.known.forget()
        self.stats.waiting = 0
        if handed:
            self.log.info("handed the entries in hand to the reader", reader=reader, count=handed)

    def stand_by(self) -> None:
        """Another worker reads new entries: stay ready, with nothing in hand."""
        if not self.standing_by:
            self.standing_by = True
            # The new reader refreshes ranks: an older snapshot written after its newer
            # one would leave the table stale once idle. It is told when this worker's
            # batches left them dirty (it may not have stood by itself: a lease that
            # changed hands under load).
            self.ranks.abandon(wait=False)
            if self.ranks.dirty:
                self.redis.set(self.keys.ranks_dirty, self.consumer, ex=RANKS_DIRTY_TTL_S)
            self.log.info(
                "standing by: another worker reads new entries", reader=self.lease.holder()
            )
        self.flush()
        self.settle()
        self.send_due_deletes()  # queued while another worker wrote beside this one
        self.waited_for_entries = False
        self.stop.wait(STANDBY_POLL_S)

    def send_due_deletes(self) -> None:
        """Delete again the ended sessions' hashes that are due (`AfterCommit.deletes_due`)."""
        again = cache.CommandBatch()
        if self.after_commit.deletes_due(again):
            again.send(self.redis).wait()

    def keep_fresh(self) -> None:
        """Keep the entries in hand from looking abandoned, and take back what a lost reply
        left pending on this consumer (`Intake.keep_fresh`, `Intake.take_back`)."""
        in_hand = self.intake.keep_fresh()
        if in_hand is None:
            return
        self.stats.waiting = len(self.held)
        self.settle()  # acks sent last must have landed before the pending list is read
        self.intake.take_back(
            in_hand,
            "took in entries pending here but not in hand (handed over, or a lost reply)",
            delivery=False,
        )

    def expiry_due(self) -> bool:
        """Whether a waiting entry has outlived `max_wait_s` (or nobody knows yet)."""
        waiters = self.store.known.waiters
        if waiters is None:
            return bool(self.held)
        oldest = waiters.oldest()
        limit = self.intake.horizon_ms if self.intake.horizon_ms else self.intake.clock_ms
        return oldest is not None and oldest.entry.ms + self.limits.max_wait_ms < limit

    # -- one batch -----------------------------------------------------------------

    def handle(self, entries: list[Entry]) -> None:
        """Validate, decide in one transaction, then write caches, dead letters and acks."""
        started = time.perf_counter()
        try:
            batch = self.applier.check(entries)
            if self.in_flight is not None and self.in_flight.answered():
                # The last batch's writes are done: their acks count from now, not from
                # after this batch's SQL (an entry's lag is measured when they are read).
                self.settle()
            results = self.applier.apply(batch)
        except (*DATABASE_ERRORS, *REDIS_ERRORS):
            self.intake.give_back(entries)  # not committed: decided again on the next pass
            raise
        self.settle()  # the previous batch's replies, read while this one's SQL ran
        # Packed beside the commit, unless the batch was applied entry by entry.
        writes = results[0].caches if len(results) == 1 else None
        if writes is None:
            writes = cache.CommandBatch()
            for result in results:
                self.after_commit.write_caches(writes, result.world, result.plan.changes)
        for result in results:
            self.stats.expired_sessions += len(result.plan.expired_sessions)
            if result.plan.changes.stats:
                self.ranks.dirty = True
        self.applier.sort_out(batch, results)
        self.stats.applied += batch.applied
        self.stats.duplicates += batch.duplicates
        self.stats.waiting = len(self.held)
        self.unsent = self.after_commit.publish(writes, batch.dead, batch.acks)
        self.unsent_applied = batch.applied_ms
        for result in results:
            self.store.known.release_ended(result.plan.changes)
        self.stats.batches += 1
        seconds = time.perf_counter() - started
        self.metrics.observe_event_batch(len(entries), seconds, batch.outcomes, batch.dead)
        self.observe_waiting()
        for _, reason, _ in batch.dead:
            self.stats.dead[str(reason)] += 1
        if self.ranks.due(idle=False):
            self.begin_rank_refresh()
        self.log.info(
            "batch done",
            entries=len(entries),
            applied=batch.applied,
            dead_lettered=len(batch.dead),
            waiting=len(self.held),
            duration_ms=round((time.perf_counter() - started) * 1000, 2),
        )

    def observe_waiting(self) -> None:
        """Waiting entries for the metrics, and a log line for each that waited long."""
        waiters = self.store.known.waiters
        if waiters is None:
            return
        clock_ms = self.intake.clock_ms
        oldest = waiters.oldest()
        age_s = max(0.0, (clock_ms - oldest.entry.ms) / 1000) if oldest else 0.0
        self.metrics.observe_waiting(len(waiters), age_s)
        if oldest is None or clock_ms - oldest.entry.ms < LONG_WAIT_MS:
            return
        for waiter in waiters:
            order = waiter.entry.order
            if clock_ms - waiter.entry.ms < LONG_WAIT_MS:
                break
            if order not in self.logged_waits:
                self.logged_waits.add(order)
                self.log.warning(
                    "entry waiting",
                    stream=self.stream_of[waiter.entry.stream_kind],
                    entry_id=waiter.entry.entry_id,
                    waited_s=round((clock_ms - waiter.entry.ms) / 1000, 1),
                    waits_for=waiter.waits_for,
                )
        self.logged_waits &= set(waiters.by_order)

    # -- after the commit ------------------------------------------------------------

    def flush(self) -> None:
        """Send the held writes in one write (after reading the replies of the last ones)."""
        unsent, self.unsent = self.unsent, None
        if unsent is not None:
            self.settle()
            self.store.wait_durable()  # what it acks is on disk first
            self.in_flight = unsent.send(self.redis)
            self.in_flight_applied, self.unsent_applied = self.unsent_applied, []

    def settle(self) -> None:
        """Read the replies of the batch sent last; an error reply is raised here.

        Its applied entries are then committed and acked: their lag is observed.
        """
        in_flight, self.in_flight = self.in_flight, None
        if in_flight is not None:
            try:
                in_flight.wait()
            finally:
                if in_flight.replaced:
                    keys = in_flight.replaced
                    self.log.error(
                        "cache keys held another type of value; replaced them", keys=keys
                    )
            applied, self.in_flight_applied = self.in_flight_applied, []
            self.observe_lag(applied)

    def observe_lag(self, applied: list[tuple[str, int]]) -> None:
        """Each entry's lag on the server's clock: now, estimated from the last read's
        `TIME`, minus the entry id's millisecond."""
        if not applied:
            return
        now_ms = time.time() * 1000 + self.intake.clock_offset_ms
        lags: dict[str, list[float]] = {}
        for stream, ms in applied:
            lags.setdefault(stream, []).append(max(0.0, now_ms - ms))
        for stream, lags_ms in lags.items():
            self.lag.record(lags_ms)
            self.metrics.observe_event_lag(stream, [lag / 1000 for lag in lags_ms])

    def mark_stopped(self) -> None:
        """A clean stop: what is still pending on this consumer (entries read but not yet
        decidable, acks not confirmed) was not handed to a consumer that crashed, and
        counts no delivery when this consumer starts again (`setup`)."""
        try:
            self.redis.set(self.keys.events_stopped(self.consumer), 1, ex=STOPPED_TTL_S)
        except (*REDIS_ERRORS, ResponseError) as exc:
            self.log.warning("clean stop not recorded", error=repr(exc))

    def release_lease(self) -> None:
        try:
            self.lease.release()  # a standby takes over at its next look, not after the ttl
        except (*REDIS_ERRORS, ResponseError) as exc:
            self.log.warning("reader lease not released; it expires by itself", error=repr(exc))

    def settle_on_exit(self) -> None:
        try:
            self.flush()
            self.settle()
        except (*REDIS_ERRORS, ResponseError) as exc:
            # Committed but maybe not acked: redelivered later and acked as a duplicate.
            self.log.warning("last batch's acks not confirmed", error=repr(exc))

    def begin_rank_refresh(self) -> None:
        """In slices beside the hot path when this worker is the one reader (the lease);
        in one statement now when several may read (no lease, or a burst run): two
        workers' snapshots written in slices could interleave, an older one last."""
        if self.lease.enabled:
            self.ranks.start()
        else:
            self.refresh_ranks()

    def step_ranks(self) -> None:
        """One slice of a rank refresh under way, between batches (`RankRefresher`)."""
        self.ranks.step()

    def refresh_ranks_on_exit(self) -> None:
        """Leave the `leaderboard` table exact: a worker stopped under load (or right after
        a backlog) may never have been idle since its last batch."""
        if not self.ranks.dirty:
            return
        try:
            self.refresh_ranks()
        except DATABASE_ERRORS as exc:
            self.log.warning("ranks not refreshed on exit", error=repr(exc))

    def refresh_ranks(self) -> None:
        """Every rank exact now, in one statement (on the way out: no batch waits for it)."""
        self.ranks.abandon()
        started = time.perf_counter()
        with self.store.transaction() as conn:
            changed = refresh_ranks(conn)
        self.store.known.forget()  # cached players hold the ranks of before
        self.ranks.dirty = False
        self.log.info(
            "ranks refreshed",
            changed=changed,
            duration_ms=round((time.perf_counter() - started) * 1000, 2),
        )
