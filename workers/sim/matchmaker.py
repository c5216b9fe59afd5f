"""The simulated matchmaker: a deterministic stream of game events and their effect.

`traffic` yields, for a `SimConfig` and its seed, the events a fleet of matchmakers
and game servers would publish, in publication order, and fills an `Expected` with
what the database must hold once they are applied. `plan` gives them all at once.

Games overlap like real matchmaking (many lobbies and matches live at once), but
a player is only ever taken from the idle pool, so no player is in two live
sessions at once in the order the events are published.
"""

from __future__ import annotations

import heapq
import random
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from usermgmt.domain.accounts import is_valid_username
from usermgmt.domain.events import MAX_PLAYERS, EventKind
from usermgmt.domain.ids import new_event_id
from usermgmt.workers.sim.players import player_name, player_names

REGIONS = ("eu", "na", "sa", "asia", "oce")
MAPS = ("dust", "harbor", "citadel", "glacier", "canyon", "foundry", "orbit", "marsh")
MODES = ("ranked", "casual", "tournament")
WIN_EARNINGS = {"ranked": (100, 500), "casual": (20, 200), "tournament": (300, 1500)}
LOSS_EARNINGS = (0, 0, 0, 5, 10, 25)  # mostly nothing, sometimes a consolation prize

LIVE_FRACTION = 0.75  # share of the player base matchmaking keeps busy at once
CHANGE_RATIO = 0.3  # lobbies whose roster changes before the game starts
DROPOUT_RATIO = 0.05  # completed games where one player left early (no result for them)


@dataclass(frozen=True)
class SimConfig:
    """The shape of a simulation. Outcomes depend only on these (and the seed)."""

    players: int = 200
    games: int = 2000
    per_game: int = 4
    seed: int = 0
    abort_ratio: float = 0.05
    name_prefix: str = "player"

    def problems(self) -> list[str]:
        """What is wrong with this configuration, one message per problem."""
        found: list[str] = []
        if not 1 <= self.per_game <= MAX_PLAYERS:
            found.append(f"--players-per-game must be 1-{MAX_PLAYERS}")
        if self.players < max(self.per_game, 1):
            found.append("--players must be at least --players-per-game")
        if self.games < 0:
            found.append("--games must not be negative")
        if not 0.0 <= self.abort_ratio <= 1.0:
            found.append("--abort-ratio must be between 0 and 1")
        longest = player_name(max(self.players, 1), self.players, self.name_prefix)
        if not is_valid_username(longest):
            found.append("--name-prefix must make usernames of 3-32 of A-Z a-z 0-9 _ . -")
        return found


@dataclass(frozen=True)
class SimEvent:
    """One event to publish. `after` is the index of the latest event on the *other*
    stream that must be applied before this one (entry ids order both streams only
    when they were accepted in different milliseconds; see `publish_traffic`)."""

    index: int
    kind: EventKind
    payload: dict[str, Any]
    after: int | None = None


@dataclass
class PlayerTotals:
    """What one player's stats and wallet gain from the simulated games."""

    wins: int = 0
    losses: int = 0
    earnings: int = 0


@dataclass
class Expected:
    """The simulation's effect, to check the database against once it is applied."""

    players: dict[str, PlayerTotals] = field(default_factory=dict)
    games: int = 0
    aborted: int = 0
    updates: int = 0
    terminates: int = 0
    roster_changes: int = 0

    @property
    def events(self) -> int:
        return self.updates + self.terminates


def new_run_id() -> str:
    """A short random tag that keeps session ids unique across runs."""
    return uuid.uuid4().hex[:8]


@dataclass
class _Game:
    session_id: str
    meta: dict[str, Any]
    roster: list[str]
    aborted: bool
    last_update: int = -1


class _Matchmaker:
    """Plays out a timeline of overlapping games in virtual seconds."""

    def __init__(self, config: SimConfig, run_id: str, expected: Expected) -> None:
        self.config = config
        self.run_id = run_id
        self.expected = expected
        self.rng = random.Random(config.seed)
        self.names = player_names(config.players, config.name_prefix)
        self.idle = list(self.names)
        self.rng.shuffle(self.idle)
        self.freed_by: dict[str, int] = {}  # player -> index of the terminate that freed them
        self.queue: list[tuple[float, int, str, _Game | None]] = []
        self.tick = 0
        self.index = 0
        self.opened = 0
        for name in self.names:
            expected.players.setdefault(name, PlayerTotals())

    def events(self) -> Iterator[SimEvent]:
        capacity = self.config.players // self.config.per_game
        slots = min(self.config.games, max(1, int(capacity * LIVE_FRACTION)))
        for _ in range(slots):
            self.schedule(self.rng.uniform(0, 30), "open", None)
        while self.queue:
            at, _, action, game = heapq.heappop(self.queue)
            if action == "open":
                if self.opened < self.config.games:
                    yield self.open(at)
            elif action == "change":
                assert game is not None
                change = self.change(game)
                if change is not None:
                    yield change
            elif action == "start":
                assert game is not None
                yield self.update(game, "in_progress")
            else:
                assert game is not None
                yield self.terminate(game)
                self.schedule(at + self.rng.uniform(1, 20), "open", None)

    def schedule(self, at: float, action: str, game: _Game | None) -> None:
        self.tick += 1
        heapq.heappush(self.queue, (at, self.tick, action, game))

    def take(self, count: int) -> list[str]:
        """Idle players, drawn at random among those queueing longest (freed players
        join the back of the queue). Like a real matchmaking queue, this lets a player
        rest between games, which also keeps dependent events far apart."""
        taken = []
        for _ in range(count):
            window = max(1, len(self.idle) // 4)
            taken.append(self.idle.pop(self.rng.randrange(window)))
        return taken

    def emit(self, kind: EventKind, payload: dict[str, Any], after: int | None) -> SimEvent:
        event = SimEvent(self.index, kind, {"event_id": str(new_event_id()), **payload}, after)
        self.index += 1
        if kind is EventKind.UPDATE:
            self.expected.updates += 1
        else:
            self.expected.terminates += 1
        return event

    def after_freed(self, players: Iterable[str]) -> int | None:
        freed = [self.freed_by[name] for name in players if name in self.freed_by]
        return max(freed) if freed else None

    def open(self, at: float) -> SimEvent:
        self.opened += 1
        region = self.rng.choice(REGIONS)
        mode = self.rng.choice(MODES)
        game = _Game(
            session_id=f"{region}-{self.run_id}-{self.opened:06d}",
            meta={
                "map": self.rng.choice(MAPS),
                "mode": mode,
                "region": region,
                "max_players": self.config.per_game,
            },
            roster=self.take(self.config.per_game),
            aborted=self.rng.random() < self.config.abort_ratio,
        )
        lobby_ends = at + self.rng.uniform(5, 30)
        if self.rng.random() < CHANGE_RATIO:
            self.schedule(self.rng.uniform(at, lobby_ends), "change", game)
        if game.aborted and self.rng.random() < 0.5:
            self.schedule(lobby_ends, "end", game)  # the lobby never filled: aborted while waiting
            return self.update(game, "waiting")
        self.schedule(lobby_ends, "start", game)
        self.schedule(lobby_ends + self.rng.uniform(120, 900), "end", game)
        return self.update(game, "waiting")

    def change(self, game: _Game) -> SimEvent | None:
        """One player leaves the lobby; an idle one takes the place when there is one."""
        joiner = self.take(1) if self.idle else []
        if not joiner and len(game.roster) == 1:
            return None
        leaver = game.roster.pop(self.rng.randrange(len(game.roster)))
        game.roster += joiner
        self.idle.append(leaver)  # free once this update is applied (same stream: in order)
        self.expected.roster_changes += 1
        return self.update(game, "waiting", extra_after=self.after_freed(joiner))

    def update(self, game: _Game, status: str, extra_after: int | None = None) -> SimEvent:
        after = extra_after if game.last_update >= 0 else self.after_freed(game.roster)
        event = self.emit(
            EventKind.UPDATE,
            {
                "session_id": game.session_id,
                "players": list(game.roster),
                "status": status,
                "meta": game.meta,
            },
            after,
        )
        game.last_update = event.index
        return event

    def terminate(self, game: _Game) -> SimEvent:
        results = [] if game.aborted else self.results(game)
        event = self.emit(
            EventKind.TERMINATE,
            {
                "session_id": game.session_id,
                "results": results,
                "reason": "aborted" if game.aborted else "completed",
            },
            game.last_update,
        )
        self.expected.games += 1
        self.expected.aborted += game.aborted
        for item in results:
            totals = self.expected.players[item["username"]]
            totals.earnings += item["earnings"]
            if item["outcome"] == "win":
                totals.wins += 1
            else:
                totals.losses += 1
        for name in game.roster:
            self.freed_by[name] = event.index
        self.idle += game.roster
        return event

    def results(self, game: _Game) -> list[dict[str, Any]]:
        finishers = list(game.roster)
        if len(finishers) > 1 and self.rng.random() < DROPOUT_RATIO:
            finishers.pop(self.rng.randrange(len(finishers)))
        if len(finishers) == 1:
            winners = set(finishers) if self.rng.random() < 0.5 else set()
        else:
            winners = set(self.rng.sample(finishers, max(1, len(finishers) // 2)))
        low, high = WIN_EARNINGS[game.meta["mode"]]
        return [
            {
                "username": name,
                "outcome": "win" if name in winners else "loss",
                "earnings": self.rng.randrange(low, high + 1, 5)
                if name in winners
                else self.rng.choice(LOSS_EARNINGS),
            }
            for name in finishers
        ]


def traffic(config: SimConfig, run_id: str, expected: Expected) -> Iterator[SimEvent]:
    """The simulation's events in publication order; `expected` fills in as they come."""
    return _Matchmaker(config, run_id, expected).events()


def plan(config: SimConfig, run_id: str | None = None) -> tuple[list[SimEvent], Expected]:
    """Every event of a simulation at once, with its expected effect."""
    expected = Expected()
    events = list(traffic(config, run_id or new_run_id(), expected))
    return events, expected
