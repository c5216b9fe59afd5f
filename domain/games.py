"""Game rules: how a batch of update / terminate events changes the world (SPEC §3).

Pure and in memory. The persistence layer loads a `World` snapshot for the batch,
`plan_batch` decides every entry in entry-id order and records the changes, and
the persistence layer writes those changes in one transaction.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from domain.accounts import username_key
from domain.errors import DeadLetterReason
from domain.events import GameEvent, TerminateEvent, UpdateEvent

ENDED = "ended"


@dataclass
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


@dataclass
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
    """The slice of the database one batch can touch."""

    players: dict[str, Player]  # by username key
    sessions: dict[str, Session]  # by session id
    live_session_of: dict[int, str]  # user id -> session id, live sessions only
    processed: set[str]  # event ids already applied

    def player_by_id(self, user_id: int) -> Player | None:
        for player in self.players.values():
            if player.id == user_id:
                return player
        return None


class Outcome(StrEnum):
    APPLIED = "applied"
    DUPLICATE = "duplicate"
    DEAD = "dead"
    DEFERRED = "deferred"


@dataclass(frozen=True)
class Decision:
    """What happened to one entry, with the reason for a dead letter or a deferral."""

    outcome: Outcome
    reason: DeadLetterReason | None = None
    message: str = ""


@dataclass
class StatsDelta:
    wins: int = 0
    losses: int = 0
    earnings: int = 0


@dataclass(frozen=True)
class ResultRow:
    session_id: str
    user_id: int
    outcome: str
    earnings: int


@dataclass
class Changes:
    """Everything a batch writes, aggregated per row so each row is written once."""

    sessions: dict[str, Session] = field(default_factory=dict)  # created or changed
    membership: dict[int, str | None] = field(default_factory=dict)  # user id -> live session
    stats: dict[int, StatsDelta] = field(default_factory=dict)  # by user id
    results: list[ResultRow] = field(default_factory=list)
    processed: list[tuple[str, str, str]] = field(default_factory=list)  # event, stream, entry
    touched_sessions: set[str] = field(default_factory=set)  # caches to refresh
    touched_users: set[int] = field(default_factory=set)

    @property
    def empty(self) -> bool:
        return not (self.sessions or self.membership or self.stats or self.processed)


@dataclass(frozen=True)
class PlannedEntry:
    """An event to decide, with where it came from."""

    event: GameEvent
    stream_kind: str
    entry_id: str


def event_usernames(events: Iterable[GameEvent]) -> set[str]:
    """Username keys a batch mentions, for loading its players in one query."""
    names: set[str] = set()
    for event in events:
        if isinstance(event, UpdateEvent):
            names.update(username_key(name) for name in event.players)
        else:
            names.update(username_key(result.username) for result in event.results)
    return names


def plan_batch(
    world: World, entries: list[PlannedEntry], now: datetime
) -> tuple[list[Decision], Changes]:
    """Decide every entry in order against `world` (which it updates) and collect the changes."""
    planner = _Planner(world, now)
    decisions = [planner.decide(entry) for entry in entries]
    return decisions, planner.changes


class _Planner:
    def __init__(self, world: World, now: datetime) -> None:
        self.world = world
        self.now = now
        self.changes = Changes()
        self.deferred_sessions: set[str] = set()

    def decide(self, entry: PlannedEntry) -> Decision:
        event = entry.event
        event_id = str(event.event_id)
        if event_id in self.world.processed:
            self._touch_for_duplicate(event)
            return Decision(Outcome.DUPLICATE)
        if event.session_id in self.deferred_sessions:
            # Keep per-session order: nothing overtakes an earlier entry that waits.
            return Decision(Outcome.DEFERRED, message="an earlier event of this session is waiting")
        if isinstance(event, UpdateEvent):
            decision = self._update(event)
        else:
            decision = self._terminate(event)
        if decision.outcome is Outcome.APPLIED:
            self.world.processed.add(event_id)
            self.changes.processed.append((event_id, entry.stream_kind, entry.entry_id))
        elif decision.outcome is Outcome.DEFERRED:
            self.deferred_sessions.add(event.session_id)
        return decision

    def _players(self, names: Iterable[str]) -> tuple[list[Player], list[str]]:
        found, unknown = [], []
        for name in names:
            player = self.world.players.get(username_key(name))
            if player is None:
                unknown.append(name)
            else:
                found.append(player)
        return found, unknown

    def _update(self, event: UpdateEvent) -> Decision:
        players, unknown = self._players(event.players)
        if unknown:
            return Decision(
                Outcome.DEAD,
                DeadLetterReason.UNKNOWN_USER,
                f"unknown players: {', '.join(unknown)}",
            )
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
                )
        if session is None:
            session = Session(
                event.session_id,
                event.status,
                [],
                dict(event.meta),
                created_at=self.now,
                updated_at=self.now,
            )
            self.world.sessions[event.session_id] = session
        new_roster = [player.id for player in players]
        for user_id in set(session.roster) - set(new_roster):
            self._set_membership(user_id, None)
        for user_id in new_roster:
            self._set_membership(user_id, event.session_id)
        session.roster = new_roster
        session.status = event.status
        session.meta = dict(event.meta)
        session.updated_at = self.now
        self.changes.sessions[session.session_id] = session
        self.changes.touched_sessions.add(session.session_id)
        return Decision(Outcome.APPLIED)

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
        players, unknown = self._players(result.username for result in event.results)
        if unknown:
            return Decision(
                Outcome.DEAD,
                DeadLetterReason.UNKNOWN_USER,
                f"unknown players: {', '.join(unknown)}",
            )
        outsiders = [p.username for p in players if p.id not in session.roster]
        if outsiders:
            return Decision(
                Outcome.DEAD,
                DeadLetterReason.NOT_IN_ROSTER,
                f"not in the roster of {event.session_id}: {', '.join(outsiders)}",
            )
        for player, result in zip(players, event.results, strict=True):
            delta = self.changes.stats.setdefault(player.id, StatsDelta())
            if result.outcome == "win":
                delta.wins += 1
                player.win_count += 1
            else:
                delta.losses += 1
                player.loss_count += 1
            delta.earnings += result.earnings
            player.earnings += result.earnings
            player.wallet += result.earnings
            self.changes.results.append(
                ResultRow(session.session_id, player.id, result.outcome, result.earnings)
            )
            self.changes.touched_users.add(player.id)
        for user_id in session.roster:
            self._set_membership(user_id, None)
        session.status = ENDED
        session.end_reason = event.reason
        session.ended_at = self.now
        session.updated_at = self.now
        self.changes.sessions[session.session_id] = session
        self.changes.touched_sessions.add(session.session_id)
        return Decision(Outcome.APPLIED)

    def _set_membership(self, user_id: int, session_id: str | None) -> None:
        if session_id is None:
            self.world.live_session_of.pop(user_id, None)
        else:
            self.world.live_session_of[user_id] = session_id
        self.changes.membership[user_id] = session_id
        self.changes.touched_users.add(user_id)

    def _touch_for_duplicate(self, event: GameEvent) -> None:
        """A duplicate changes nothing but still refreshes the caches it would have."""
        self.changes.touched_sessions.add(event.session_id)
        session = self.world.sessions.get(event.session_id)
        if session is not None:
            self.changes.touched_users.update(session.roster)
        names = (
            event.players
            if isinstance(event, UpdateEvent)
            else [result.username for result in event.results]
        )
        players, _ = self._players(names)
        self.changes.touched_users.update(player.id for player in players)
