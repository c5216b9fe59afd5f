"""The game world a batch of update / terminate events changes, and what it writes.

Pure and in memory. The persistence layer loads a `World` for the batch, the
planner (`usermgmt.domain.planner`) decides every entry and records the `Changes`, and the
persistence layer writes those changes in one transaction.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, NamedTuple

from usermgmt.domain.errors import DeadLetterReason
from usermgmt.domain.events import GameEvent, UpdateEvent, entry_order

ENDED = "ended"
BIGINT_MAX = 2**63 - 1  # a wallet or earnings column (SQL BIGINT), and a Redis integer


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
    # Of those, the users each touched beyond the players it names (`Changes.processed`).
    also_touched: dict[str, list[int]] = field(default_factory=dict)
    by_id: dict[int, Player] = field(default_factory=dict)  # the same players, by user id

    def __post_init__(self) -> None:
        if not self.by_id:
            self.by_id = {player.id: player for player in self.players.values()}

    def add_player(self, key: str, player: Player) -> None:
        """Know `player` under its username key (and its id)."""
        self.players[key] = player
        self.by_id[player.id] = player


class Outcome(StrEnum):
    APPLIED = "applied"
    DUPLICATE = "duplicate"
    DEAD = "dead"
    DEFERRED = "deferred"


@dataclass(frozen=True)
class Decision:
    """What happened to one entry, with the reason for a dead letter or what it waits for."""

    outcome: Outcome
    reason: DeadLetterReason | None = None
    message: str = ""


APPLIED = Decision(Outcome.APPLIED)
DUPLICATE = Decision(Outcome.DUPLICATE)


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
    # event id, stream kind, entry id, users touched beyond those the event names
    processed: list[tuple[str, str, str, str | None]] = field(default_factory=list)
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
    payload: bytes | None = None  # the entry's text, kept while it waits
    redelivered: bool = False  # delivered before: its decision may be recorded already
    event_id: str = field(init=False)  # the event's UUID as text, the processed-events key
    order: Order = field(init=False)  # where the entry goes in the merged order

    def __post_init__(self) -> None:
        self.event_id = str(self.event.event_id)
        self.order = entry_order(self.stream_kind, self.entry_id)

    @property
    def ms(self) -> int:
        """The entry id's millisecond: entry-id time, the clock of every rule on waiting."""
        return self.order[0]


def event_usernames(events: Iterable[GameEvent]) -> set[str]:
    """Username keys a batch mentions, for loading its players in one query."""
    keys: set[str] = set()
    for event in events:
        keys.update(event.player_keys if isinstance(event, UpdateEvent) else event.result_keys)
    return keys
