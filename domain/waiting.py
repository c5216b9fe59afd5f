"""What waits, and for what: the dependency index of game events not applicable yet.

An entry waits only for what it depends on (docs: "Order"):
- a terminate for its session's first update (`Wake.session`);
- an update for a player still in another live session (`Wake.player`);
- any entry for an earlier waiting entry it must not overtake (`Wake.entry`): an
  earlier waiting entry of its session, or (an update) an earlier waiting update that
  wants one of the same players. Such an entry "holds" what comes after it.

Each waiter is registered under the one thing that decides it again: when that
thing happens, the planner takes the waiter out and decides it afresh, and it may
come back waiting for something else.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, TypeVar

from usermgmt.domain.events import UpdateEvent
from usermgmt.domain.games import Order, PlannedEntry

_K = TypeVar("_K")


class Wake(NamedTuple):
    """What decides a waiter again: a session's first update, a freed player, an entry."""

    kind: str  # "session" | "player" | "entry"
    key: object  # session id | user id | the awaited entry's order


@dataclass(slots=True)
class Waiter:
    """An entry waiting, with what it waits for in words (for logs and `status`)."""

    entry: PlannedEntry
    waits_for: str
    wake: Wake
    holds: bool  # later entries of its session / wanting its players queue behind it


@dataclass(frozen=True)
class Limits:
    """How long waiting may last, in entry-id time (so a replay decides the same)."""

    max_wait_ms: int = 60_000
    session_timeout_ms: int = 21_600_000  # 0: live sessions never expire


@dataclass
class Waiters:
    """The waiting entries, by order, indexed by what wakes them and what they hold.

    Each index maps a key to the orders filed under it, as a dict used as an ordered
    set: an entry waiting behind a burst of others is filed and taken again many
    times, and a dict takes an order out without a scan.
    """

    by_order: dict[Order, Waiter] = field(default_factory=dict)
    _wake: dict[tuple[str, object], dict[Order, None]] = field(default_factory=dict)  # by Wake
    _sessions: dict[str, dict[Order, None]] = field(default_factory=dict)  # holders, by session
    _players: dict[str, dict[Order, None]] = field(default_factory=dict)  # holders, by username key
    _events: dict[str, dict[Order, None]] = field(default_factory=dict)  # by event id
    _oldest: list[Order] = field(default_factory=list)  # a heap; removed orders linger
    _in_heap: set[Order] = field(default_factory=set)  # what `_oldest` holds, lingering or not

    def __len__(self) -> int:
        return len(self.by_order)

    def __iter__(self) -> Iterator[Waiter]:
        """The waiters in entry order."""
        return iter([self.by_order[order] for order in sorted(self.by_order)])

    def add(self, waiter: Waiter) -> None:
        entry = waiter.entry
        order = entry.order
        if order in self.by_order:
            self.take(order)  # one waiter per entry, whatever it waited for before
        self.by_order[order] = waiter
        _file(self._wake, waiter.wake, order)
        _file(self._events, entry.event_id, order)
        if order not in self._in_heap:  # taken to be decided again, it lingers there
            self._in_heap.add(order)
            heapq.heappush(self._oldest, order)
        if waiter.holds:
            event = entry.event
            _file(self._sessions, event.session_id, order)
            if isinstance(event, UpdateEvent):  # a terminate holds its session only
                for key in event.player_keys:
                    _file(self._players, key, order)

    def take(self, order: Order) -> Waiter | None:
        """Remove a waiter to decide it again (entries queued behind it stay queued)."""
        waiter = self.by_order.pop(order, None)
        if waiter is None:
            return None
        entry = waiter.entry
        _unfile(self._wake, waiter.wake, order)
        _unfile(self._events, entry.event_id, order)
        if waiter.holds:
            event = entry.event
            _unfile(self._sessions, event.session_id, order)
            if isinstance(event, UpdateEvent):
                for key in event.player_keys:
                    _unfile(self._players, key, order)
        return waiter

    def woken_by(self, wake: tuple[str, object]) -> list[Order]:
        """The orders of the waiters `wake` (a `Wake`, or a plain tuple of its two parts:
        the same key) decides again; they are not removed here."""
        orders = self._wake.get(wake)
        return list(orders) if orders else []

    def oldest(self) -> Waiter | None:
        """The waiter with the smallest order: its deadline comes first."""
        heap = self._oldest
        while heap and heap[0] not in self.by_order:
            self._in_heap.discard(heapq.heappop(heap))
        return self.by_order[heap[0]] if heap else None

    def queued_after(self, entry: PlannedEntry, session_only: bool = False) -> list[Order]:
        """Later waiters queued behind some earlier entry that share `entry`'s session or
        (unless `session_only`) one of its players: what they queue behind may have
        changed with `entry`."""
        found: list[Order] = []
        after, by_order = entry.order, self.by_order
        event = entry.event
        indexed = [self._sessions.get(event.session_id)]
        if not session_only and isinstance(event, UpdateEvent) and self._players:
            indexed += map(self._players.get, event.player_keys)
        for orders in indexed:
            if orders:
                for order in orders:
                    if order > after and by_order[order].wake.kind == "entry":
                        found.append(order)
        return found

    def of_session(self, session_id: str) -> list[Order]:
        """The waiters that hold `session_id` (its waiting entries, but for a terminate
        waiting for the first update and a second copy of an event)."""
        return list(self._sessions.get(session_id, ()))

    def copy_before(self, entry: PlannedEntry) -> Waiter | None:
        """An earlier waiting entry with the same event id (a producer published it twice)."""
        orders = self._events.get(entry.event_id)
        if not orders:
            return None
        first = min(orders)
        return self.by_order[first] if first < entry.order else None

    def holder_before(self, entry: PlannedEntry, wanted: Sequence[str] = ()) -> Waiter | None:
        """The nearest earlier waiter `entry` must not overtake, or None.

        `wanted`: the username keys of players an update asks for (those not already in
        its own session); an earlier waiting update wanting one of them goes first.
        """
        if not self._sessions and not self._players:  # the common case: nothing holds
            return None
        order = entry.order
        best: Order | None = None
        for held in self._sessions.get(entry.event.session_id, ()):
            if held < order and (best is None or held > best):
                best = held
        for key in wanted:
            for held in self._players.get(key, ()):
                if held < order and (best is None or held > best):
                    best = held
        return None if best is None else self.by_order[best]


def _file(index: dict[_K, dict[Order, None]], key: _K, order: Order) -> None:
    orders = index.get(key)
    if orders is None:
        index[key] = {order: None}
    else:
        orders[order] = None


def _unfile(index: dict[_K, dict[Order, None]], key: _K, order: Order) -> None:
    orders = index.get(key)
    if orders is not None:
        orders.pop(order, None)
        if not orders:
            del index[key]
