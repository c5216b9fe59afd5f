"""Game rules: how a batch of update / terminate events changes the world (SPEC §3).

Pure and in memory. The persistence layer loads a `World` snapshot for the batch,
`plan_batch` decides every entry in entry-id order and records the changes, and
the persistence layer writes those changes in one transaction.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, NamedTuple

from domain.errors import DeadLetterReason
from domain.events import GameEvent, TerminateEvent, UpdateEvent, entry_order

ENDED = "ended"


@dataclass(slots=True)
class Player:
    """A registered player as the batch sees it (totals include this batch's results)."""

    id: int
    username: str
    stats_id: int
    wallet: int
    win_count: int
    loss_count: int
    earnings: int
    rank: int = 1
    board_id: int = 0  # the leaderboard row's id, as loaded (0: not loaded from SQL)


@dataclass(slots=True)
class Session:
    """A game session; `pk` is None until the batch's transaction inserts it."""

    session_id: str
    status: str
    roster: list[int]
    meta: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    pk: int | None = None
    end_reason: str | None = None
    ended_at: datetime | None = None

    @property
    def ended(self) -> bool:
        return self.status == ENDED


@dataclass
class World:
    """The slice of the database one batch can touch (or, kept between batches, has)."""

    players: dict[str, Player]  # by username key
    sessions: dict[str, Session]  # by session id
    live_session_of: dict[int, str]  # user id -> session id, live sessions only
    processed: set[str]  # event ids already applied
    by_id: dict[int, Player] = field(default_factory=dict)  # the same players, by user id

    def __post_init__(self) -> None:
        if not self.by_id:
            self.by_id = {player.id: player for player in self.players.values()}

    def add_player(self, key: str, player: Player) -> None:
        """Know `player` under its username key (and its id)."""
        self.players[key] = player
        self.by_id[player.id] = player

    def player_by_id(self, user_id: int) -> Player | None:
        return self.by_id.get(user_id)


class Outcome(StrEnum):
    APPLIED = "applied"
    DUPLICATE = "duplicate"
    DEAD = "dead"
    DEFERRED = "deferred"


@dataclass(frozen=True)
class Decision:
    """What happened to one entry, with the reason for a dead letter or a deferral.

    `holds_session`: a deferred entry that later entries of its session (and, for an
    update, later updates naming its players) must not overtake: an update waiting
    for a busy player, or an entry queued behind one. A terminate waiting for its
    session's first update holds nothing: the update must be able to pass it.
    """

    outcome: Outcome
    reason: DeadLetterReason | None = None
    message: str = ""
    holds_session: bool = False


APPLIED = Decision(Outcome.APPLIED)
DUPLICATE = Decision(Outcome.DUPLICATE)
_UNDECIDED = Decision(Outcome.DEFERRED)  # an entry's place while it is being decided


@dataclass(slots=True)
class StatsDelta:
    wins: int = 0
    losses: int = 0
    earnings: int = 0


class ResultRow(NamedTuple):  # a tuple: one is made per result, on the hot path
    session_id: str
    user_id: int
    outcome: str
    earnings: int


@dataclass
class Changes:
    """Everything a batch writes, aggregated per row so each row is written once."""

    sessions: dict[str, Session] = field(default_factory=dict)  # created or changed
    membership: dict[int, str | None] = field(default_factory=dict)  # user id -> live session
    # The live session each of those users was in when the batch began (None: none).
    membership_before: dict[int, str | None] = field(default_factory=dict)
    stats: dict[int, StatsDelta] = field(default_factory=dict)  # by user id
    results: list[ResultRow] = field(default_factory=list)
    processed: list[tuple[str, str, str]] = field(default_factory=list)  # event, stream, entry
    touched_sessions: set[str] = field(default_factory=set)  # caches to refresh
    touched_users: set[int] = field(default_factory=set)

    @property
    def empty(self) -> bool:
        return not (self.sessions or self.membership or self.stats or self.processed)


Order = tuple[int, int, int]  # `entry_order`: the merged order of the event streams


@dataclass(slots=True)
class PlannedEntry:
    """An event to decide, with where it came from (one is made per entry: no frills)."""

    event: GameEvent
    stream_kind: str
    entry_id: str
    event_id: str = field(init=False)  # the event's UUID as text, the processed-events key
    order: Order = field(init=False)  # where the entry goes in the merged order

    def __post_init__(self) -> None:
        self.event_id = str(self.event.event_id)
        self.order = entry_order(self.stream_kind, self.entry_id)


def event_usernames(events: Iterable[GameEvent]) -> set[str]:
    """Username keys a batch mentions, for loading its players in one query."""
    keys: set[str] = set()
    for event in events:
        keys.update(event.player_keys if isinstance(event, UpdateEvent) else event.result_keys)
    return keys


@dataclass
class Waiting:
    """Deferred entries that later ones must not overtake, by their `entry_order`.

    Later entries of a held session wait behind it, and so do later updates naming a
    player of a held update: a player freed by one session goes to the update that
    asked for them first, not to one published after it.
    """

    sessions: dict[str, list[Order]] = field(default_factory=dict)
    players: dict[str, list[Order]] = field(default_factory=dict)  # by username key

    def hold(self, event: GameEvent, order: Order) -> None:
        """Record a held entry: its session, and an update's players."""
        for held, key in self._keys(event):
            held.setdefault(key, []).append(order)

    def release(self, event: GameEvent, order: Order) -> None:
        """Forget a held entry that has been decided after all."""
        for held, key in self._keys(event):
            orders = held.get(key, [])
            if order in orders:
                orders.remove(order)
            if not orders:
                held.pop(key, None)

    def holds_back(self, event: GameEvent, order: Order) -> str | None:
        """Why an earlier held entry holds this one back, or None."""
        if not self.sessions and not self.players:  # the common case: nothing waits
            return None
        if any(held < order for held in self.sessions.get(event.session_id, ())):
            return f"an earlier event of session {event.session_id} is waiting"
        if isinstance(event, UpdateEvent):
            for name, key in zip(event.players, event.player_keys, strict=True):
                if any(held < order for held in self.players.get(key, ())):
                    return f"an earlier update naming {name} is waiting"
        return None

    def _keys(self, event: GameEvent) -> list[tuple[dict[str, list[Order]], str]]:
        keys = [(self.sessions, event.session_id)]
        if isinstance(event, UpdateEvent):
            keys += [(self.players, key) for key in event.player_keys]
        return keys


class _Deferred(NamedTuple):
    """An update waiting in this batch for a busy player."""

    position: int  # in the batch, where its decision goes
    entry: PlannedEntry
    order: Order


def plan_batch(
    world: World,
    entries: list[PlannedEntry],
    now: datetime,
    waiting: Waiting | None = None,
) -> tuple[list[Decision], Changes]:
    """Decide every entry in order against `world` (which it updates) and collect the changes.

    An entry deferred in the batch holds later ones as `waiting` describes for entries
    held outside it. An update waiting for a busy player is decided again as soon as
    an entry of the batch frees that player, and a terminate that arrives before its
    session's first update right after that update applies (it would otherwise hold
    the update back forever): within one millisecond the order across the streams is
    a convention, and neither should cost a retry.
    """
    planner = _Planner(world, now, waiting or Waiting())
    for entry in entries:
        planner.decide(entry)
    return planner.decisions, planner.changes


class _Planner:
    def __init__(self, world: World, now: datetime, waiting: Waiting) -> None:
        self.world = world
        self.now = now
        self.waiting = waiting
        self.held = Waiting()  # entries of this batch deferred so far
        self.changes = Changes()
        self.decisions: list[Decision] = []
        # A terminate that came before its session's first update, by session id:
        # decided again right after that update applies.
        self.early_terminates: dict[str, tuple[int, PlannedEntry]] = {}
        # Updates waiting for a busy player (by user id), and players freed since.
        self.waiting_for: dict[int, list[_Deferred]] = {}
        self.freed: list[int] = []

    def decide(self, entry: PlannedEntry) -> None:
        index = len(self.decisions)
        self.decisions.append(_UNDECIDED)
        self.decisions[index] = self._decide(entry, index)
        if self.freed:
            self._wake_waiting_updates()

    def _decide(self, entry: PlannedEntry, index: int) -> Decision:
        event = entry.event
        if entry.event_id in self.world.processed:
            self._touch_for_duplicate(event)
            return DUPLICATE
        order = entry.order
        reason = self.held.holds_back(event, order) or self.waiting.holds_back(event, order)
        if reason is not None:
            # Keep the order: nothing overtakes an earlier entry that waits.
            self.held.hold(event, order)
            return Decision(Outcome.DEFERRED, message=reason, holds_session=True)
        if isinstance(event, UpdateEvent):
            return self._decide_update(_Deferred(index, entry, order))
        decision = self._terminate(event)
        if decision.outcome is Outcome.DEFERRED:
            self.early_terminates.setdefault(event.session_id, (index, entry))
        elif decision.outcome is Outcome.APPLIED:
            self._record(entry)
        return decision

    def _decide_update(self, item: _Deferred) -> Decision:
        event = item.entry.event
        assert isinstance(event, UpdateEvent)
        decision = self._update(event)
        if decision.outcome is Outcome.DEFERRED:
            self.held.hold(event, item.order)
            busy = self._busy_player(event)
            if busy is not None:
                self.waiting_for.setdefault(busy, []).append(item)
        elif decision.outcome is Outcome.APPLIED:
            self._record(item.entry)
            self._decide_early_terminate(event.session_id)
        return decision

    def _wake_waiting_updates(self) -> None:
        """Decide again the updates that waited for a player the batch has just freed."""
        if not self.waiting_for:  # the common case: nobody waits
            self.freed.clear()
        while self.freed:
            for item in self.waiting_for.pop(self.freed.pop(0), []):
                event = item.entry.event
                self.held.release(event, item.order)
                reason = self.held.holds_back(event, item.order) or self.waiting.holds_back(
                    event, item.order
                )
                if reason is not None:  # an older entry still waits: this one stays behind
                    self.held.hold(event, item.order)
                    self.decisions[item.position] = Decision(
                        Outcome.DEFERRED, message=reason, holds_session=True
                    )
                    continue
                self.decisions[item.position] = self._decide_update(item)

    def _busy_player(self, event: UpdateEvent) -> int | None:
        for player in self._players(event.player_keys) or ():
            current = self.world.live_session_of.get(player.id)
            if current is not None and current != event.session_id:
                return player.id
        return None

    def _record(self, entry: PlannedEntry) -> None:
        self.world.processed.add(entry.event_id)
        self.changes.processed.append((entry.event_id, entry.stream_kind, entry.entry_id))

    def _decide_early_terminate(self, session_id: str) -> None:
        """A terminate published before its session's update applies once the update has."""
        early = self.early_terminates.pop(session_id, None)
        if early is None:
            return
        index, entry = early
        assert isinstance(entry.event, TerminateEvent)
        decision = self._terminate(entry.event)
        if decision.outcome is Outcome.APPLIED:
            self._record(entry)
        self.decisions[index] = decision

    def _players(self, keys: Sequence[str]) -> list[Player] | None:
        """The players `keys` name (their `username_key`s); None when one is unknown."""
        known = self.world.players.get
        found = [known(key) for key in keys]
        return found if all(found) else None  # type: ignore[return-value]

    def _unknown(self, names: Sequence[str], keys: Sequence[str]) -> Decision:
        """The dead letter for an entry naming players nobody registered."""
        known = self.world.players
        unknown = [name for name, key in zip(names, keys, strict=True) if key not in known]
        return Decision(
            Outcome.DEAD,
            DeadLetterReason.UNKNOWN_USER,
            f"unknown players: {', '.join(unknown)}",
        )

    def _update(self, event: UpdateEvent) -> Decision:
        players = self._players(event.player_keys)
        if players is None:
            return self._unknown(event.players, event.player_keys)
        session = self.world.sessions.get(event.session_id)
        if session is not None and session.ended:
            return Decision(
                Outcome.DEAD,
                DeadLetterReason.SESSION_ENDED,
                f"session {event.session_id} has already ended",
            )
        for player in players:
            current = self.world.live_session_of.get(player.id)
            if current is not None and current != event.session_id:
                return Decision(
                    Outcome.DEFERRED,
                    message=f"player {player.username} is in live session {current}",
                    holds_session=True,
                )
        new_roster = [player.id for player in players]
        if session is None:
            session = Session(
                event.session_id,
                event.status,
                new_roster,
                dict(event.meta),
                created_at=self.now,
                updated_at=self.now,
            )
            self.world.sessions[event.session_id] = session
        else:
            for user_id in set(session.roster).difference(new_roster):
                self._set_membership(user_id, None)
            session.roster = new_roster
            session.status = event.status
            session.meta = dict(event.meta)
            session.updated_at = self.now
        for user_id in new_roster:
            self._set_membership(user_id, event.session_id)
        self.changes.sessions[session.session_id] = session
        self.changes.touched_sessions.add(session.session_id)
        return APPLIED

    def _terminate(self, event: TerminateEvent) -> Decision:
        session = self.world.sessions.get(event.session_id)
        if session is None:
            return Decision(
                Outcome.DEFERRED, message=f"session {event.session_id} is not known yet"
            )
        if session.ended:
            return Decision(
                Outcome.DEAD,
                DeadLetterReason.SESSION_ENDED,
                f"session {event.session_id} has already ended",
            )
        players = self._players(event.result_keys)
        if players is None:
            return self._unknown(event.result_usernames, event.result_keys)
        roster = session.roster
        outsiders = [p.username for p in players if p.id not in roster]
        if outsiders:
            return Decision(
                Outcome.DEAD,
                DeadLetterReason.NOT_IN_ROSTER,
                f"not in the roster of {event.session_id}: {', '.join(outsiders)}",
            )
        stats, results, touched = (
            self.changes.stats,
            self.changes.results,
            self.changes.touched_users,
        )
        for player, result in zip(players, event.results, strict=True):
            uid, earned = player.id, result.earnings
            delta = stats.get(uid)
            if delta is None:
                delta = stats[uid] = StatsDelta()
            if result.outcome == "win":
                delta.wins += 1
                player.win_count += 1
            else:
                delta.losses += 1
                player.loss_count += 1
            delta.earnings += earned
            player.earnings += earned
            player.wallet += earned
            results.append(ResultRow(session.session_id, uid, result.outcome, earned))
            touched.add(uid)
        for user_id in session.roster:
            self._set_membership(user_id, None)
        session.status = ENDED
        session.end_reason = event.reason
        session.ended_at = self.now
        session.updated_at = self.now
        self.changes.sessions[session.session_id] = session
        self.changes.touched_sessions.add(session.session_id)
        return APPLIED

    def _set_membership(self, user_id: int, session_id: str | None) -> None:
        live = self.world.live_session_of
        before = self.changes.membership_before
        if user_id not in before:
            before[user_id] = live.get(user_id)
        if session_id is None:
            if live.pop(user_id, None) is not None:
                self.freed.append(user_id)
        else:
            live[user_id] = session_id
        self.changes.membership[user_id] = session_id
        self.changes.touched_users.add(user_id)

    def _touch_for_duplicate(self, event: GameEvent) -> None:
        """A duplicate changes nothing but still refreshes the caches it would have."""
        self.changes.touched_sessions.add(event.session_id)
        session = self.world.sessions.get(event.session_id)
        if session is not None:
            self.changes.touched_users.update(session.roster)
        keys = event.player_keys if isinstance(event, UpdateEvent) else event.result_keys
        known = self.world.players
        self.changes.touched_users.update(known[key].id for key in keys if key in known)
