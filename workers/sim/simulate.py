"""Simulated matchmaking and game-server traffic, for `usermgmt simulate` and the demo.

Generation is plain and deterministic for a seed: `traffic` yields the events a
fleet of matchmakers and game servers would publish, in publication order, and
fills an `Expected` with what the database must hold once they are applied.
`publish_traffic` XADDs them in pipelined chunks; `register_players` creates the
accounts through the real request/reply stream first.

Games overlap like real matchmaking (many lobbies and matches live at once), but
a player is only ever taken from the idle pool, so no player is in two live
sessions at once in the order the events are published.
"""

from __future__ import annotations

import heapq
import random
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
from redis import Redis

from usermgmt.domain.accounts import PASSWORD_MAX_BYTES, PASSWORD_MIN_BYTES, is_valid_username
from usermgmt.domain.errors import ErrorCode
from usermgmt.domain.events import MAX_PLAYERS, EventKind
from usermgmt.persistence.keys import Keys
from usermgmt.workers.client.auth import AuthClient, AuthError, AuthTimeout

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


def player_names(count: int, prefix: str = "player") -> list[str]:
    """`player0001`, `player0002`, …: the same names every run, so a re-run reuses them."""
    return [player_name(number, count, prefix) for number in range(1, count + 1)]


def player_name(number: int, count: int, prefix: str = "player") -> str:
    """The name of player `number` (from 1) out of `count`."""
    return f"{prefix}{number:0{max(4, len(str(count)))}d}"


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
        event = SimEvent(self.index, kind, {"event_id": str(uuid.uuid4()), **payload}, after)
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


# -- talking to Redis -------------------------------------------------------------------


@dataclass(frozen=True)
class Registered:
    created: int
    existing: int
    elapsed: float


class NoWorker(Exception):
    """Nothing answered the first registration: no worker serves the auth stream."""


def check_password(password: str) -> str | None:
    """Why `password` cannot be used for the simulated accounts, or None."""
    size = len(password.encode("utf-8"))
    if PASSWORD_MIN_BYTES <= size <= PASSWORD_MAX_BYTES:
        return None
    return f"--password must be {PASSWORD_MIN_BYTES}-{PASSWORD_MAX_BYTES} bytes of UTF-8"


def register_players(
    client: AuthClient,
    names: Sequence[str],
    password: str,
    concurrency: int = 16,
    on_done: Callable[[int], None] | None = None,
    first_timeout: float = 10.0,
) -> Registered:
    """Register every name through the request/reply stream; `username_taken` counts
    as already registered, so a simulation can run again with the same players.

    The first request goes alone, so a missing worker is reported after one timeout
    rather than once per player. The rest run `concurrency` at a time, enough to
    keep the worker's bcrypt threads busy without queueing past the reply timeout.
    """
    started = time.perf_counter()

    def one(name: str, timeout: float | None = None) -> bool:
        try:
            client.call("register", timeout=timeout, username=name, password=password)
        except AuthError as exc:
            if exc.code != ErrorCode.USERNAME_TAKEN:
                raise
            return False
        return True

    if not names:
        return Registered(0, 0, 0.0)
    try:
        first = one(names[0], first_timeout)
    except AuthTimeout:
        raise NoWorker(
            f"no reply on {client.keys.auth_requests} within {first_timeout:g} s; "
            "start `usermgmt worker` (same USERMGMT_REDIS_URL and USERMGMT_KEY_PREFIX) first"
        ) from None
    created = int(first)
    done = 1
    if on_done is not None:
        on_done(done)
    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        for made in pool.map(one, names[1:]):
            created += made
            done += 1
            if on_done is not None:
                on_done(done)
    return Registered(created, len(names) - created, time.perf_counter() - started)


@dataclass(frozen=True)
class Published:
    events: int
    games: int
    elapsed: float

    @property
    def rate(self) -> float:
        return self.events / self.elapsed if self.elapsed > 0 else 0.0


CHUNK_GAP_S = 0.0015  # > 1 ms between pipelines, so each starts in a later millisecond


def publish_traffic(
    redis: Redis,
    keys: Keys,
    events: Iterable[SimEvent],
    rate: float = 0.0,
    chunk_size: int = 500,
    on_progress: Callable[[int, int], None] | None = None,
) -> Published:
    """XADD the events in pipelined chunks, optionally paced to `rate` events per second.

    The consumer merges the two streams by entry id, and ids from two streams only
    order reliably across milliseconds (each stream counts its own sequence within
    one). So an event never shares a pipeline with the other-stream event it
    depends on (`SimEvent.after`), and each pipeline is sent more than a
    millisecond after the previous one was accepted: every id of a later pipeline
    is then greater than every id of an earlier one.
    """
    if rate > 0:
        chunk_size = max(1, min(chunk_size, int(rate / 20)))
    pipe = redis.pipeline(transaction=False)
    streams = {kind: keys.event_stream(kind) for kind in EventKind}
    started = time.perf_counter()
    last_reply = 0.0
    chunk_start = 0
    in_pipe = 0
    terminates_in_pipe = 0
    published = games = 0

    def flush() -> None:
        nonlocal last_reply, in_pipe, terminates_in_pipe, published, games
        wait = last_reply + CHUNK_GAP_S - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        pipe.execute()
        last_reply = time.perf_counter()
        published += in_pipe
        games += terminates_in_pipe
        in_pipe = terminates_in_pipe = 0
        if on_progress is not None:
            on_progress(games, published)
        if rate > 0:
            ahead = started + published / rate - time.perf_counter()
            if ahead > 0:
                time.sleep(ahead)

    for event in events:
        depends_here = event.after is not None and event.after >= chunk_start
        if in_pipe and (in_pipe >= chunk_size or depends_here):
            flush()
            chunk_start = event.index
        elif not in_pipe:
            chunk_start = event.index
        pipe.xadd(streams[event.kind], {"payload": orjson.dumps(event.payload)})
        in_pipe += 1
        terminates_in_pipe += event.kind is EventKind.TERMINATE
    if in_pipe:
        flush()
    return Published(published, games, time.perf_counter() - started)


# -- the whole run ----------------------------------------------------------------------


class ProgressSink(Protocol):
    """Where a run reports progress (see `usermgmt.workers.cli.tables.progress_report`)."""

    def add(self, name: str, label: str, total: int) -> None: ...

    def update(self, name: str, done: int, note: str = "") -> None: ...


@dataclass(frozen=True)
class SimulationReport:
    """What a run did and what the database must show once the worker has applied it."""

    config: SimConfig
    run_id: str
    registered: Registered
    published: Published
    expected: Expected


def run_simulation(
    redis: Redis,
    keys: Keys,
    config: SimConfig,
    password: str,
    rate: float = 0.0,
    progress: ProgressSink | None = None,
    reply_timeout: float = 30.0,
) -> SimulationReport:
    """Register the players, then publish the games; raises `NoWorker` if none answers."""
    run_id = new_run_id()
    names = player_names(config.players, config.name_prefix)
    client = AuthClient(redis, prefix=keys.prefix, timeout=reply_timeout)
    if progress is not None:
        progress.add("register", "register", len(names))
    registered = register_players(
        client,
        names,
        password,
        on_done=(lambda done: progress.update("register", done)) if progress else None,
        first_timeout=min(reply_timeout, 10.0),
    )
    if progress is not None:
        progress.add("games", "games", config.games)

    def on_progress(games: int, events: int) -> None:
        if progress is not None:
            progress.update("games", games, f"{events:,} events")

    expected = Expected()
    published = publish_traffic(
        redis, keys, traffic(config, run_id, expected), rate=rate, on_progress=on_progress
    )
    return SimulationReport(config, run_id, registered, published, expected)
