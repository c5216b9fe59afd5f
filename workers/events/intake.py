"""The event consumer's entries in hand, and which of them are ready to be decided.

Entries are decided in their merged order (`entry_order`), and only once every
earlier entry is known (docs/protocol.md, "Delivery"). What bounds that
(`Intake.take_ready`):
- the read's server clock: an entry id takes the clock of its XADD, so every entry
  of an earlier millisecond was delivered, is pending somewhere, or is acked;
- a stream that came back full (`horizon`): nothing past its last entry is known;
- an entry pending undecided on another consumer: it goes first.

What is in hand: the `buffer` (delivered, not decidable yet) and `held` (this
consumer's entries that wait, recorded in `waiting_events`). Held entries are kept
fresh (XCLAIM JUSTID) so no other consumer reclaims them and no delivery is counted;
entries idle on consumers that went away are claimed; entries a lost read left
pending on this consumer are taken back.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from redis import Redis
from sqlalchemy import Engine
from structlog.typing import FilteringBoundLogger

from usermgmt.domain.events import EventKind, entry_id_key, entry_order
from usermgmt.domain.games import Order
from usermgmt.persistence.games import load_checkpoints
from usermgmt.persistence.keys import EVENTS_GROUP, Keys
from usermgmt.persistence.waiting import waiting_keys
from usermgmt.workers.runtime.settings import Settings
from usermgmt.workers.runtime.streams import (
    Entry,
    GroupRead,
    claim_idle,
    claim_own,
    entries_of,
    keep_fresh,
    own_pending,
    pending_elsewhere,
    read_group,
)

HANDED_TTL_S = 3600  # the `handed` mark outlives any reader's pause
ELSEWHERE_PAUSE_MS = 20  # how often to look again while another consumer's entry goes first
Key = tuple[str, str]  # (stream kind, entry id)
FIRST: Order = (0, 0, 0)  # before every entry: nothing can be decided yet


class Intake:
    """Reads and claims entries of the event streams, and holds them until they are ready.

    `kinds`: each event stream's kind, by stream key, in the order they are read.
    """

    def __init__(
        self,
        redis: Redis,
        engine: Engine,
        settings: Settings,
        consumer: str,
        kinds: dict[str, EventKind],
        log: FilteringBoundLogger,
    ) -> None:
        self.redis = redis
        self.engine = engine
        self.settings = settings
        self.consumer = consumer
        self.kinds = kinds
        self.streams = list(kinds)
        self.stream_of = {str(kind): stream for stream, kind in kinds.items()}
        self.log = log
        self.buffer: list[Entry] = []  # delivered, not decidable yet (`take_ready`)
        # Entries a stream per read: the setting, less while a rank refresh is behind.
        self.batch_size = settings.batch_size
        self.horizon: dict[str, str | None] = dict.fromkeys(self.streams)
        self.held: dict[Key, Entry] = {}  # this consumer's entries that wait
        self.pause_ms: int | None = None  # the next read's block when nothing could be decided
        self.clock_ms = 0  # the server's clock at the last read
        self.clock_offset_ms = 0.0  # the server's clock minus this process's (ms)
        self.horizon_ms = 0  # every entry of an earlier millisecond is decided or in hand
        self.last_claim = 0.0
        self.last_fresh = time.monotonic()
        keys = Keys(settings.key_prefix)
        # A consumer that stopped cleanly marks it: its entries are taken over uncounted.
        self.stopped_mark = keys.events_stopped
        self.handed_mark = keys.events_handed  # set by a worker that handed us its entries

    def reset(self) -> None:
        """Let go of everything in hand (set-up takes this consumer's pending entries back)."""
        self.buffer.clear()
        self.held.clear()
        self.horizon = dict.fromkeys(self.streams)

    # -- reading and deciding what is ready -----------------------------------------

    def read_new(self, block_ms: int | None) -> GroupRead:
        """New entries of the streams whose buffered entries are fewer than a batch."""
        size = self.batch_size
        buffered = Counter(entry.stream for entry in self.buffer)
        wanted = [s for s in self.streams if buffered[s] < size]
        sent = time.time()
        read = read_group(
            self.redis,
            EVENTS_GROUP,
            self.consumer,
            wanted,
            size,
            block_ms,
            self.streams,
            signal=self.handed_mark(self.consumer),
        )
        if read.signalled:  # entries were handed to us: in hand before anything is decided
            self.look_at_pending_soon()
        for stream in wanted:
            mine = [entry for entry in read.entries if entry.stream == stream]
            # A stream that came back full may hide later entries: nothing past its
            # last entry can be decided before it has been read further.
            self.horizon[stream] = mine[-1].entry_id if len(mine) >= size else None
        self.buffer += read.entries
        self.clock_ms = read.clock_ms
        # TIME ran as the read arrived, before any block: within a one-way trip of `sent`.
        self.clock_offset_ms = read.clock_ms - sent * 1000
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
        most = self.settings.batch_size * len(self.streams)
        if count > most:
            # Entries taken in at once (a restart's own, or another worker's handed
            # over) are decided a read's worth at a time: one batch of 45k entries
            # took 3.2 s, past the reader lease, which a standby then took over.
            count = most
            cutoff = self.order(self.buffer[count])  # waiters time out no further
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
        if self.redis.getdel(self.handed_mark(self.consumer)) is not None:
            # Entries were handed to this consumer since the read (`hand_over`): the
            # pending lists above may have shown them here, neither elsewhere nor in
            # hand. They are taken in (`take_back`) before anything is decided.
            self.look_at_pending_soon()
            return FIRST
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

    # -- entries pending elsewhere, and this consumer's own --------------------------

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
                stopped_mark=self.stopped_mark,
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

    def keep_fresh(self) -> dict[str, list[str]] | None:
        """Keep the entries in hand from looking abandoned, without counting a delivery.

        Every `claim_idle_ms / 3`; None in between. Returns the ids kept fresh, by
        stream: what else is pending on this consumer was left by a lost read
        (`take_back`, once the last acks have landed).
        """
        now = time.monotonic()
        if now - self.last_fresh < self.settings.claim_idle_ms / 1000 / 3:
            return None
        self.last_fresh = now
        held = self.ids_in_hand()
        gone = keep_fresh(self.redis, EVENTS_GROUP, self.consumer, held)
        if gone:  # decided and acked by another worker (or trimmed)
            self.held = {k: e for k, e in self.held.items() if e.entry_id not in gone}
            self.buffer = [e for e in self.buffer if e.entry_id not in gone]
        self.release_decided()
        return held

    def look_at_pending_soon(self) -> None:
        """Writes were lost (Redis restarted, or the connection dropped): acks of committed
        entries may be among them. The next `keep_fresh` runs at the next read, so that
        `take_back` takes them in hand again at once, to be acked as duplicates with their
        caches written, rather than `claim_idle_ms / 3` later (or never, in a burst run
        that finds nothing new to read)."""
        self.last_fresh = 0.0

    def hand_over(self, reader: str) -> int:
        """Give every entry in hand to `reader`, the worker holding the reader lease, and
        let go of them; returns how many were handed.

        One transaction: XCLAIM JUSTID to `reader` (no delivery is counted: this worker
        did not fail them) and the `handed` mark, which `reader` takes in its next read
        and then takes the entries in hand before it decides anything. So there is no
        moment at which `reader` sees them neither elsewhere nor in hand, and decides a
        later entry before them. A waiting entry stays recorded as waiting, and stays so
        in `reader`'s hands.
        """
        ids = self.ids_in_hand()
        if any(ids.values()):
            pipe = self.redis.pipeline(transaction=True)
            for stream, entry_ids in ids.items():
                if entry_ids:
                    pipe.xclaim(stream, EVENTS_GROUP, reader, 0, list[Any](entry_ids), justid=True)
            pipe.set(self.handed_mark(reader), self.consumer, ex=HANDED_TTL_S)
            pipe.execute()
        self.reset()
        self.last_fresh = time.monotonic()  # nothing is left pending here
        return sum(len(entry_ids) for entry_ids in ids.values())

    def ids_in_hand(self) -> dict[str, list[str]]:
        """The ids of the entries in hand (held, then buffered), by stream."""
        ids: dict[str, list[str]] = {stream: [] for stream in self.streams}
        for entry in [*self.held.values(), *self.buffer]:
            ids[entry.stream].append(entry.entry_id)
        return ids

    def pending_outside_hands(self) -> bool:
        """Whether entries may be pending on this consumer that it does not hold: left by
        a lost reply (`look_at_pending_soon`), or handed to it (its `handed` mark, taken
        here) while it was losing the lease."""
        if self.last_fresh == 0.0:
            return True
        return self.redis.getdel(self.handed_mark(self.consumer)) is not None

    def give_back(self, entries: list[Entry]) -> None:
        """Entries taken as ready whose transaction failed: back in the buffer, first."""
        self.buffer[:0] = entries

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

    def take_back(self, in_hand: dict[str, list[str]], why: str, delivery: bool = True) -> None:
        """Take in hand this consumer's pending entries it does not hold yet.

        At start-up, what a crashed predecessor of the same name left pending; later,
        what a lost reply left pending: of a read (Redis restarted, or the connection
        dropped after XREADGROUP ran), unseen, which every other worker would wait for
        until `claim_idle_ms`; or of the acks of entries already decided. Entries
        recorded as waiting stay waiting (taking them back counts nothing). Taking the
        rest again counts a delivery after a crash, not after a lost reply (`delivery`
        False). They go through the buffer, not applied at once: older entries of the
        other stream may not have been read yet, and go first, so the stream's horizon
        covers them.
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
            taken = claim_own(self.redis, stream, EVENTS_GROUP, self.consumer, undecided, delivery)
            self.buffer += taken
            last = self.horizon.get(stream)
            if taken and (last is None or entry_id_key(taken[-1].entry_id) > entry_id_key(last)):
                self.horizon[stream] = taken[-1].entry_id
            self.log.info(why, stream=stream, undecided=len(undecided), waiting=len(recorded))
