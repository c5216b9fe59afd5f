"""The benchmark workload: a bulk-inserted player population, games of four players
(one update and one terminate each) published to the event streams, and the check
that the final stats equal the published results exactly.

Two kinds of games: `Games` (players rest between games; published one entry per
millisecond) and `Rematches` (a pool barely larger than the live games need, players
matched again the moment their game ends; published in pipelines with `*` ids, so
hundreds of entries share a millisecond).

Everything here is deterministic for a seed, so every scenario of one run drains the
same kind of backlog.
"""

from __future__ import annotations

import random
import shutil
import sqlite3
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import bcrypt
import orjson
from redis import Redis
from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool

from usermgmt.persistence.db import normalize_url, upgrade
from usermgmt.persistence.keys import EVENTS_GROUP, Keys

PLAYERS_PER_GAME = 4
LIVE_GAMES = 256  # games in progress at once in the published stream
REMATCH_SLACK = PLAYERS_PER_GAME  # idle players of a rematch pool beyond the live games'
PIPELINE = 1_000  # XADDs per pipelined burst of a rematch backlog
PASSWORD = "bench-password"
CREATED_AT = "2024-01-01 00:00:00.000000"


class BenchFailure(Exception):
    """A run whose outcome differs from what was published: the benchmark fails loudly."""


def username(index: int) -> str:
    """The name of player `index` (1-based, as its SQL id)."""
    return f"p{index:07d}"


# -- population ----------------------------------------------------------------------


def build_population(path: Path, players: int, bcrypt_rounds: int = 4) -> None:
    """A migrated SQLite database with `players` users, their stats and leaderboard rows.

    Rows go straight into SQL with the driver's executemany (bcrypt is not what is
    measured): every player shares one password hash of `bcrypt_rounds`.
    """
    if path.exists():
        path.unlink()
    url = f"sqlite:///{path}"
    upgrade(url)
    password_hash = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(bcrypt_rounds)).decode()
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=OFF")
        conn.execute("BEGIN")
        chunk = 50_000
        for start in range(1, players + 1, chunk):
            ids = range(start, min(players, start + chunk - 1) + 1)
            conn.executemany(
                "INSERT INTO users (id, username, username_key, password_hash, wallet, "
                "created_at) VALUES (?, ?, ?, ?, 0, ?)",
                ((i, username(i), username(i), password_hash, CREATED_AT) for i in ids),
            )
            conn.executemany(
                "INSERT INTO stats (id, user_id, win_count, loss_count, earnings) "
                "VALUES (?, ?, 0, 0, 0)",
                ((i, i) for i in ids),
            )
            conn.executemany(
                "INSERT INTO leaderboard (id, stats_id, rank, earnings) VALUES (?, ?, 1, 0)",
                ((i, i) for i in ids),
            )
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.execute("ANALYZE")
    finally:
        conn.close()


def copy_database(template: Path, target: Path) -> str:
    """A fresh copy of a population database; returns its SQLAlchemy URL."""
    for suffix in ("", "-wal", "-shm"):
        Path(f"{target}{suffix}").unlink(missing_ok=True)
    shutil.copyfile(template, target)
    return f"sqlite:///{target}"


# -- events --------------------------------------------------------------------------


@dataclass
class Expected:
    """What the published events must add up to, per player id."""

    wins: dict[int, int] = field(default_factory=dict)
    losses: dict[int, int] = field(default_factory=dict)
    earnings: dict[int, int] = field(default_factory=dict)
    entries: int = 0
    games: int = 0
    results: int = 0

    def add(self, player: int, won: bool, earnings: int) -> None:
        target = self.wins if won else self.losses
        target[player] = target.get(player, 0) + 1
        self.earnings[player] = self.earnings.get(player, 0) + earnings
        self.results += 1

    @property
    def players(self) -> set[int]:
        return set(self.wins) | set(self.losses)


class Games:
    """Deterministic games: about `LIVE_GAMES` at once, no player in two live games.

    A game ends about `2 * LIVE_GAMES` entries after it started, and a freed player
    rests as long before playing again, so causally related entries are far apart:
    published at a steady rate, they are several milliseconds apart, as real games
    (minutes long) are. Entry ids order the two streams only to the millisecond.
    """

    def __init__(self, population: int, seed: int, tag: str) -> None:
        if population < self.minimum_population():
            raise ValueError(f"population {population} too small for {LIVE_GAMES} live games")
        self.population = population
        self.random = random.Random(seed)
        self.tag = tag
        self.live: list[tuple[str, list[int]]] = []  # oldest first
        self.busy: set[int] = set()
        self.resting: list[list[int]] = []  # players of recently ended games, oldest first
        self.started = 0
        self.expected = Expected()

    def minimum_population(self) -> int:
        return PLAYERS_PER_GAME * LIVE_GAMES * 3

    def entries(self, count: int) -> Iterator[tuple[str, bytes]]:
        """`count` entries (`("update"|"terminate", payload)`), every started game ended."""
        if count % 2:
            raise ValueError("a backlog of whole games has an even number of entries")
        rng = self.random
        while self.expected.entries < count:
            left = count - self.expected.entries
            can_start = left > len(self.live) + 1
            if can_start and self._wants_start():
                yield "update", self._start()
            else:
                oldest = min(len(self.live), 8)
                yield "terminate", self._end(rng.randrange(oldest))
            self.expected.entries += 1

    def _wants_start(self) -> bool:
        """Start a game (rather than end one): always below `LIVE_GAMES`, else at random."""
        return len(self.live) < LIVE_GAMES or self.random.random() < 0.5

    def _pick_players(self) -> list[int]:
        players: list[int] = []
        while len(players) < PLAYERS_PER_GAME:
            candidate = self.random.randint(1, self.population)
            if candidate not in self.busy and candidate not in players:
                players.append(candidate)
        self.busy.update(players)
        return players

    def _release(self, players: list[int]) -> None:
        """A game ended: its players rest for `LIVE_GAMES` games before playing again."""
        self.resting.append(players)
        if len(self.resting) > LIVE_GAMES:
            self.busy.difference_update(self.resting.pop(0))

    def _start(self) -> bytes:
        players = self._pick_players()
        self.started += 1
        session_id = f"{self.tag}-{self.started:08d}"
        self.live.append((session_id, players))
        return orjson.dumps(
            {
                "event_id": str(uuid.UUID(int=self.random.getrandbits(128), version=4)),
                "session_id": session_id,
                "players": [username(p) for p in players],
                "status": "in_progress",
                "meta": {"map": "dust", "mode": "ranked"},
            }
        )

    def _end(self, index: int) -> bytes:
        session_id, players = self.live.pop(index)
        self._release(players)
        winner = self.random.randrange(len(players))
        results = []
        for position, player in enumerate(players):
            won = position == winner
            earnings = self.random.randint(100, 1000) if won else self.random.randint(0, 50)
            self.expected.add(player, won, earnings)
            results.append(
                {
                    "username": username(player),
                    "outcome": "win" if won else "loss",
                    "earnings": earnings,
                }
            )
        self.expected.games += 1
        return orjson.dumps(
            {
                "event_id": str(uuid.UUID(int=self.random.getrandbits(128), version=4)),
                "session_id": session_id,
                "results": results,
                "reason": "completed",
            }
        )


class Rematches(Games):
    """Games over a pool only `REMATCH_SLACK` players larger than `LIVE_GAMES` need.

    Players are matched again the moment their game's terminate is published: once
    `LIVE_GAMES` are live, every terminate is followed by the next game's update, whose
    players are drawn from the idle ones, the four just freed and `REMATCH_SLACK`
    others. Still a valid history: a player is idle only once the terminate of its
    previous game was published. `links` records, per player put into a game again,
    (index of the terminate that freed it, index of the update that took it).
    """

    def __init__(self, population: int, seed: int, tag: str, slack: int = REMATCH_SLACK) -> None:
        self.pool = PLAYERS_PER_GAME * LIVE_GAMES + slack
        super().__init__(population, seed, tag)
        self.idle = list(range(1, self.pool + 1))  # deterministic order, for the seed
        self.freed_at: dict[int, int] = {}
        self.links: list[tuple[int, int]] = []

    def minimum_population(self) -> int:
        return self.pool

    def _wants_start(self) -> bool:
        return len(self.live) < LIVE_GAMES

    def _pick_players(self) -> list[int]:
        players = self.random.sample(self.idle, PLAYERS_PER_GAME)
        update_at = self.expected.entries
        for player in players:
            self.idle.remove(player)
            if player in self.freed_at:
                self.links.append((self.freed_at.pop(player), update_at))
        return players

    def _release(self, players: list[int]) -> None:
        self.idle.extend(players)
        for player in players:
            self.freed_at[player] = self.expected.entries


def publish(
    redis: Redis,
    keys: Keys,
    entries: Iterator[tuple[str, bytes]],
    first_ms: int,
    chunk: int = 2_000,
) -> int:
    """XADD a backlog in order, one entry per millisecond from `first_ms`; returns how many.

    The backlog is what producers publishing with `*` over the past minutes would have
    left: explicit ids one millisecond apart keep the two streams' merged order exact
    (a pipelined publisher would put hundreds of entries into one millisecond).
    """
    streams = {"update": keys.update_stream, "terminate": keys.terminate_stream}
    total = 0
    pipe = redis.pipeline(transaction=False)
    for kind, payload in entries:
        pipe.execute_command(  # type: ignore[no-untyped-call]
            "XADD", streams[kind], f"{first_ms + total}-0", "payload", payload
        )
        total += 1
        if total % chunk == 0:
            pipe.execute()
    pipe.execute()
    return total


def publish_pipelined(
    redis: Redis, keys: Keys, entries: Iterator[tuple[str, bytes]], chunk: int = PIPELINE
) -> list[int]:
    """XADD with `*` in pipelined bursts of `chunk`, never waiting for the clock.

    What a busy matchmaker and game servers sharing one connection would send: Redis
    stamps each entry with its own clock, so hundreds of entries, a terminate and the
    update that matches its players again among them, share one millisecond. Returns
    each entry's millisecond, in publish order.
    """
    streams = {"update": keys.update_stream, "terminate": keys.terminate_stream}
    stamps: list[int] = []
    pipe = redis.pipeline(transaction=False)
    for kind, payload in entries:
        pipe.xadd(streams[kind], {"payload": payload})
        if len(pipe) >= chunk:
            stamps += [entry_ms(entry_id) for entry_id in pipe.execute()]
    stamps += [entry_ms(entry_id) for entry_id in pipe.execute()]
    return stamps


def entry_ms(entry_id: bytes | str) -> int:
    """The millisecond part of a stream entry id."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(text.partition("-")[0])


def rematch_figures(games: Rematches, stamps: list[int]) -> dict[str, int | float]:
    """How tightly a published rematch backlog packs players' consecutive games.

    `rematch_next`: updates naming a player freed by the terminate published just
    before; `rematch_same_ms`: updates naming a player whose previous game's terminate
    has the same millisecond (only the worker's dependency tracking orders those).
    """
    next_entry = {update for terminate, update in games.links if update == terminate + 1}
    same_ms = {update for terminate, update in games.links if stamps[terminate] == stamps[update]}
    per_ms = Counter(stamps)
    return {
        "pool": games.pool,
        "updates": games.started,
        "rematch_next": len(next_entry),
        "rematch_same_ms": len(same_ms),
        "milliseconds": len(per_ms),
        "entries_per_ms": len(stamps) / max(len(per_ms), 1),
        "max_entries_per_ms": max(per_ms.values(), default=0),
    }


def delete_keys(redis: Redis, prefix: str) -> int:
    """Delete every key under `prefix:` (never anything else)."""
    return unlink_matching(redis, f"{prefix}:*")


def unlink_matching(redis: Redis, pattern: str) -> int:
    """Unlink every key matching the glob `pattern`, in batches; returns how many."""
    deleted = 0
    batch: list[bytes] = []
    for key in redis.scan_iter(match=pattern, count=5_000):
        batch.append(key)
        if len(batch) >= 2_000:
            deleted += redis.unlink(*batch)
            batch.clear()
    if batch:
        deleted += redis.unlink(*batch)
    return deleted


# -- the check -------------------------------------------------------------------------


def competition_ranks(earnings: dict[int, int], population: int) -> dict[int, int]:
    """1 + the number of players with strictly greater earnings, for every player."""
    values = sorted((earnings.get(i, 0) for i in range(1, population + 1)), reverse=True)
    first_at: dict[int, int] = {}
    for position, value in enumerate(values):
        first_at.setdefault(value, position + 1)
    return {i: first_at[earnings.get(i, 0)] for i in range(1, population + 1)}


def verify(
    database_url: str,
    redis: Redis,
    keys: Keys,
    expected: Expected,
    population: int,
    check_ranks: bool = True,
    check_caches: bool = True,
) -> list[str]:
    """Compare SQL and Redis with what was published; returns every mismatch found.

    `database_url` is the worker's SQLAlchemy URL, SQLite or PostgreSQL: the same
    queries read both (through the driver's own cursor). Totals (rows, dead letters,
    pending entries) come first, then players, then caches.
    """
    with reading(database_url) as conn:
        problems = _verify_counts(conn, expected)
        players = _verify_players(conn, expected, population, check_ranks)
    problems += _verify_streams(redis, keys)
    problems += players
    if check_caches:
        problems += _verify_caches(redis, keys, expected)
    return problems


@contextmanager
def reading(database_url: str) -> Iterator[Any]:
    """A DB-API connection to the database of `database_url` (SQLite or PostgreSQL)."""
    engine = create_engine(normalize_url(database_url), poolclass=NullPool)
    try:
        conn = engine.raw_connection()
        try:
            yield conn
        finally:
            conn.close()
    finally:
        engine.dispose()


def _scalar(conn: Any, query: str) -> Any:
    cursor = conn.cursor()
    try:
        cursor.execute(query)
        return cursor.fetchone()[0]
    finally:
        cursor.close()


def _verify_counts(conn: Any, expected: Expected) -> list[str]:
    wanted = {
        "processed_events": ("SELECT count(*) FROM processed_events", expected.entries),
        "game_results": ("SELECT count(*) FROM game_results", expected.results),
        "live sessions": ("SELECT count(*) FROM game_sessions WHERE status <> 'ended'", 0),
        "session_players": ("SELECT count(*) FROM session_players", 0),
    }
    problems: list[str] = []
    for name, (query, want) in wanted.items():
        value = _scalar(conn, query)
        if value != want:
            problems.append(f"{name}: {value} rows, expected {want}")
    return problems


def _verify_players(conn: Any, expected: Expected, population: int, check_ranks: bool) -> list[str]:
    """Every player's stats, wallet and leaderboard row (and rank); 20 mismatches at most."""
    cursor = conn.cursor()
    try:
        cursor.execute(
            "SELECT u.id, s.win_count, s.loss_count, s.earnings, u.wallet, l.earnings, l.rank "
            "FROM users u JOIN stats s ON s.user_id = u.id "
            "JOIN leaderboard l ON l.stats_id = s.id"
        )
        rows = cursor.fetchall()
    finally:
        cursor.close()
    problems: list[str] = []
    if len(rows) != population:
        problems.append(f"{len(rows)} players in SQL, {population} inserted")
    ranks = competition_ranks(expected.earnings, population) if check_ranks else {}
    for uid, wins, losses, earned, wallet, board, rank in rows:
        want = (
            expected.wins.get(uid, 0),
            expected.losses.get(uid, 0),
            expected.earnings.get(uid, 0),
        )
        got = (wins, losses, earned)
        if got != want or wallet != want[2] or board != want[2]:
            problems.append(
                f"player {uid}: stats {got}, wallet {wallet}, leaderboard {board}; published {want}"
            )
        elif check_ranks and rank != ranks[uid]:
            problems.append(f"player {uid}: rank {rank}, exact rank {ranks[uid]}")
        if len(problems) > 20:
            break
    return problems


def _verify_streams(redis: Redis, keys: Keys) -> list[str]:
    """No dead letters, and nothing pending or unread in the event streams."""
    problems: list[str] = []
    dead = redis.xlen(keys.dlq)
    if dead:
        reasons = describe_counts(dead_letter_reasons(redis, keys))
        problems.append(f"{dead} dead letters ({reasons})")
    for stream in (keys.update_stream, keys.terminate_stream):
        for group in redis.xinfo_groups(stream):
            if group["pending"] or group.get("lag"):
                problems.append(
                    f"{stream}: {group['pending']} pending, lag {group.get('lag')} after the run"
                )
    return problems


def _verify_caches(redis: Redis, keys: Keys, expected: Expected) -> list[str]:
    problems: list[str] = []
    sessions = list(redis.scan_iter(match=f"{keys.prefix}:session:*", count=5_000))
    if sessions:
        problems.append(f"{len(sessions)} session hashes left for ended games")
    players = sorted(expected.players)
    for start in range(0, len(players), 5_000):
        chunk = players[start : start + 5_000]
        pipe = redis.pipeline(transaction=False)
        for uid in chunk:
            pipe.hgetall(keys.user(username(uid)))
            pipe.zscore(keys.leaderboard, username(uid))
        replies = pipe.execute()
        for index, uid in enumerate(chunk):
            cached, score = replies[2 * index], replies[2 * index + 1]
            want = {
                b"win_count": str(expected.wins.get(uid, 0)).encode(),
                b"loss_count": str(expected.losses.get(uid, 0)).encode(),
                b"earnings": str(expected.earnings.get(uid, 0)).encode(),
                b"wallet": str(expected.earnings.get(uid, 0)).encode(),
            }
            got = {name: cached.get(name) for name in want}
            if got != want or b"session" in cached:
                problems.append(f"user hash of {username(uid)}: {cached}, expected {want}")
            if score is None or int(score) != expected.earnings.get(uid, 0):
                problems.append(f"leaderboard score of {username(uid)}: {score}")
            if len(problems) > 20:
                return problems
    return problems


def dead_letter_reasons(redis: Redis, keys: Keys, page: int = 10_000) -> Counter[str]:
    """The reasons of every dead letter, counted (read `page` letters at a time)."""
    reasons: Counter[str] = Counter()
    start = "-"
    while True:
        rows = cast(
            list[tuple[bytes, dict[bytes, bytes]]], redis.xrange(keys.dlq, start, count=page)
        )
        for _, fields in rows:
            reasons[_reason(fields.get(b"payload", b""))] += 1
        if len(rows) < page:
            return reasons
        start = f"({rows[-1][0].decode()}"


def _reason(payload: bytes) -> str:
    try:
        letter = orjson.loads(payload)
        return str(letter.get("reason", "unknown"))
    except (orjson.JSONDecodeError, AttributeError):
        return "unreadable"


def describe_counts(counts: Counter[str]) -> str:
    return ", ".join(f"{name}: {count}" for name, count in counts.most_common()) or "none"


def waiting_rows(database_url: str) -> int | None:
    """Rows of the worker's `waiting_events` table (None when it has none, or the
    database cannot be read): a diagnostic for a drain that did not finish."""
    try:
        with reading(database_url) as conn:
            return int(_scalar(conn, "SELECT count(*) FROM waiting_events"))
    except Exception:
        return None


def group_state(redis: Redis, keys: Keys) -> tuple[int, int, int]:
    """(entries read, pending, lag) summed over both event streams' group."""
    read = pending = lag = 0
    pipe = redis.pipeline(transaction=False)
    for stream in (keys.update_stream, keys.terminate_stream):
        pipe.xinfo_groups(stream)
    for groups in pipe.execute():
        for group in groups:
            if group["name"] in (EVENTS_GROUP, EVENTS_GROUP.encode()):
                read += group.get("entries-read") or 0
                pending += group["pending"]
                lag += group.get("lag") or 0
    return read, pending, lag
