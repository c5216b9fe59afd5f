"""The soak test's producers: valid game histories, with hostile entries mixed in.

A producer owns a slice of the players of its own, so no two producers ever put one
player into live games at once, and it reuses a player the moment the terminate of
that player's game is published (the most recently freed players first). It
publishes in MULTI/EXEC bursts of 1..500 entries, as `Publisher.batch` does, and
never waits for the clock: a burst often holds a game's terminate and the next game
of the same players, in the same millisecond.

A burst cut off by a Redis restart is looked up in the streams once Redis answers
again, and sent again only if it did not get in (MULTI/EXEC: all or nothing), so
every entry of the history is in the streams exactly once, in the producer's order.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from redis import Redis
from redis.exceptions import RedisError

from usermgmt.domain.payloads import text_of
from usermgmt.persistence.keys import Keys

MAX_BURST = 500
ADVANCE_SHARE = 0.3  # of the valid entries when a game could start: end (or change) one
SECOND_UPDATE_SHARE = 0.15  # games whose roster changes once before they end
ABORTED_SHARE = 0.03  # games that end aborted, with no results
REDIS_BACK_WITHIN_S = 60.0

# What each hostile entry must be dead-lettered with.
INVALID_JSON = "invalid_json"
INVALID_EVENT = "invalid_event"
UNKNOWN_USER = "unknown_user"
NOT_IN_ROSTER = "not_in_roster"
SESSION_ENDED = "session_ended"
HOSTILE_KINDS = (INVALID_JSON, INVALID_EVENT, UNKNOWN_USER, NOT_IN_ROSTER, SESSION_ENDED)

Credit = tuple[str, bool, int]  # (username, won, earnings)


class ProducerFailed(Exception):
    """A producer could not publish its history (Redis did not come back in time)."""


@dataclass(slots=True)
class Entry:
    """One published stream entry and what the worker must make of it."""

    kind: str  # update | terminate: the stream
    payload: bytes
    event_id: str | None  # None when the payload carries no usable event id
    expect: str | None  # None: valid (applied exactly once); else the dead-letter reason
    credits: tuple[Credit, ...] = ()  # a terminate's results, were it applied
    session_id: str = ""  # of a well-formed event
    entry_id: str = ""  # filled in once Redis accepted it


@dataclass(slots=True)
class Game:
    session_id: str
    roster: list[str]
    second_update: bool
    held: list[str] = field(default_factory=list)  # dropped by the roster change; busy till the end


@dataclass
class Tally:
    """What one producer published, beyond the entries themselves."""

    games: int = 0
    second_updates: int = 0
    aborted: int = 0
    bursts: int = 0
    rematched_in_burst: int = 0  # players put into a game in the burst that ended their last
    resent_bursts: int = 0  # bursts cut off by a Redis restart and sent again
    landed_bursts: int = 0  # bursts cut off by a Redis restart that had got in anyway
    anomalies: list[str] = field(default_factory=list)


class Producer(threading.Thread):
    """Publishes `valid` entries of real games and `hostile` entries mixed in among them."""

    def __init__(
        self,
        index: int,
        players: list[str],
        bystanders: list[str],
        valid: int,
        hostile: int,
        seed: int,
        connect: Callable[[], Redis],
        keys: Keys,
        halt: threading.Event,
    ) -> None:
        super().__init__(name=f"soak-producer-{index}", daemon=True)
        if len(players) < 8:
            raise ValueError("a producer needs at least 8 players")
        self.index = index
        self.rng = random.Random(seed)
        self.free = list(players)  # a stack: the most recently freed players are reused first
        self.rng.shuffle(self.free)
        self.bystanders = bystanders  # registered, never in any roster: "not in roster"
        self.live: dict[str, Game] = {}
        self.live_ids: list[str] = []
        self.ended: deque[tuple[str, list[dict[str, Any]], str, tuple[Credit, ...]]] = deque(
            maxlen=256
        )
        self.valid_left = valid
        self.hostile_left = hostile
        self.owed = 0  # valid entries the live games still need (terminates, roster changes)
        self.sessions = 0
        self.freed_in_burst: dict[str, int] = {}
        self.redis = connect()
        self.connect = connect
        self.streams = {"update": keys.update_stream, "terminate": keys.terminate_stream}
        self.halt = halt
        self.history: list[Entry] = []
        self.published = 0
        self.tally = Tally()
        self.last_ids: dict[str, str] = {}
        # Per stream, the ids of this producer's entries, increasing: how far a consumer
        # group got is counted from these (Redis forgets a group's entries-read on restart).
        self.ids: dict[str, list[tuple[int, int]]] = {"update": [], "terminate": []}
        self.error: BaseException | None = None
        self.finished_at: float | None = None

    # -- the thread ---------------------------------------------------------------------

    def run(self) -> None:
        try:
            while not self.halt.is_set() and self.left() > 0:
                size = min(self.rng.randint(1, MAX_BURST), self.left())
                self.tally.bursts += 1
                burst = [self.next_entry() for _ in range(size)]
                self.publish(burst)
                self.history.extend(burst)
                self.published += len(burst)
        except BaseException as exc:  # reported by the orchestrator, which stops the phase
            self.error = exc
        finally:
            self.finished_at = time.monotonic()

    def left(self) -> int:
        return max(self.valid_left, self.owed) + self.hostile_left

    @property
    def done(self) -> bool:
        return self.finished_at is not None

    # -- publishing ---------------------------------------------------------------------

    def publish(self, burst: list[Entry]) -> None:
        """One MULTI/EXEC; after a connection error, find out whether it got in."""
        attempts = 0
        while True:
            try:
                pipe = self.redis.pipeline(transaction=True)
                for entry in burst:
                    pipe.xadd(self.streams[entry.kind], {"payload": entry.payload})
                ids = pipe.execute()
                self._accept(burst, [text_of(entry_id) for entry_id in ids])
                return
            except RedisError as exc:
                attempts += 1
                if attempts > 20:
                    raise ProducerFailed(f"a burst failed {attempts} times: {exc!r}") from None
            found = self._recover(burst)
            if len(found) == len(burst):
                self.tally.landed_bursts += 1
                self._accept(burst, [found[i] for i in range(len(burst))])
                return
            if found:  # MULTI/EXEC is all or nothing: this would be a Redis bug
                self.tally.anomalies.append(
                    f"producer {self.index}: {len(found)} of {len(burst)} entries of an "
                    "interrupted MULTI/EXEC burst got in"
                )
                self._accept([burst[i] for i in sorted(found)], [found[i] for i in sorted(found)])
                burst = [entry for i, entry in enumerate(burst) if i not in found]
            self.tally.resent_bursts += 1

    def _accept(self, burst: list[Entry], ids: list[str]) -> None:
        for entry, entry_id in zip(burst, ids, strict=True):
            entry.entry_id = entry_id
            self.last_ids[entry.kind] = entry_id
            self.ids[entry.kind].append(id_key(entry_id))

    def _recover(self, burst: list[Entry]) -> dict[int, str]:
        """Wait for Redis, then which entries of `burst` are in the streams (index -> id)."""
        deadline = time.monotonic() + REDIS_BACK_WITHIN_S
        while True:
            try:
                self.redis.ping()
                return self._find(burst)
            except RedisError as exc:
                if self.halt.is_set():
                    raise ProducerFailed("halted") from None
                if time.monotonic() > deadline:
                    raise ProducerFailed(
                        f"Redis did not answer within {REDIS_BACK_WITHIN_S:g} s: {exc!r}"
                    ) from None
                time.sleep(0.05)  # Redis is down: waiting for it, not pacing publishes

    def _find(self, burst: list[Entry]) -> dict[int, str]:
        wanted = {(entry.kind, entry.payload): i for i, entry in enumerate(burst)}
        found: dict[int, str] = {}
        for kind in {entry.kind for entry in burst}:
            start = f"({self.last_ids[kind]}" if kind in self.last_ids else "-"
            while True:
                page = self.redis.xrange(self.streams[kind], min=start, max="+", count=2_000)
                if not page:
                    break
                for entry_id, fields in page:
                    index = wanted.get((kind, fields.get(b"payload", b"")))
                    if index is not None:
                        found[index] = text_of(entry_id)
                start = f"({text_of(page[-1][0])}"
        return found

    # -- the history --------------------------------------------------------------------

    def next_entry(self) -> Entry:
        valid_left = max(self.valid_left, self.owed)
        if self.hostile_left and self.rng.random() * (valid_left + self.hostile_left) < (
            self.hostile_left
        ):
            self.hostile_left -= 1
            return self.hostile()
        self.valid_left -= 1
        return self.valid()

    def valid(self) -> Entry:
        spare = self.valid_left + 1 - self.owed  # entries left, this one included, not owed
        must_advance = spare < 2 or len(self.free) < 2
        if self.live_ids and (must_advance or self.rng.random() < ADVANCE_SHARE):
            game = self.live[self.live_ids[self.rng.randrange(len(self.live_ids))]]
            return self.change_roster(game) if game.second_update else self.terminate(game)
        return self.start_game(second_update=spare >= 3 and self.rng.random() < SECOND_UPDATE_SHARE)

    def start_game(self, second_update: bool) -> Entry:
        rng = self.rng
        size = rng.randint(2, min(6, len(self.free)))
        roster = [self.free.pop() for _ in range(size)]
        burst = self.tally.bursts
        self.tally.rematched_in_burst += sum(self.freed_in_burst.get(p) == burst for p in roster)
        self.sessions += 1
        session_id = f"p{self.index}-{self.sessions:07d}"
        game = Game(session_id, roster, second_update)
        self.live[session_id] = game
        self.live_ids.append(session_id)
        self.owed += 2 if second_update else 1
        self.tally.games += 1
        status = "waiting" if second_update and rng.random() < 0.5 else "in_progress"
        meta = {"map": rng.choice(("dust", "nuke", "inferno")), "round": 1, "ranked": True}
        return self._update(session_id, roster, status, meta)

    def change_roster(self, game: Game) -> Entry:
        rng = self.rng
        choice = rng.random()
        if self.free and len(game.roster) < 8 and choice < 0.5:
            game.roster.append(self.free.pop())
        elif len(game.roster) > 2:
            game.held.append(game.roster.pop(rng.randrange(len(game.roster))))
            if self.free and choice < 0.75:
                game.roster.append(self.free.pop())
        else:
            rng.shuffle(game.roster)
        game.second_update = False
        self.owed -= 1
        self.tally.second_updates += 1
        meta = {"map": "dust", "round": 2, "ranked": True}
        return self._update(game.session_id, list(game.roster), "in_progress", meta)

    def terminate(self, game: Game) -> Entry:
        rng = self.rng
        slot = self.live_ids.index(game.session_id)
        self.live_ids[slot] = self.live_ids[-1]
        self.live_ids.pop()
        del self.live[game.session_id]
        self.owed -= 1
        results: list[dict[str, Any]] = []
        credits: list[Credit] = []
        reason = "completed"
        if rng.random() < ABORTED_SHARE:
            reason = "aborted"
            self.tally.aborted += 1
        else:
            winner = rng.randrange(len(game.roster))
            for position, player in enumerate(game.roster):
                won = position == winner
                earnings = rng.randint(100, 1_000) if won else rng.randint(0, 50)
                results.append(
                    {"username": player, "outcome": "win" if won else "loss", "earnings": earnings}
                )
                credits.append((player, won, earnings))
        freed = game.held + game.roster
        rng.shuffle(freed)
        for player in freed:
            self.freed_in_burst[player] = self.tally.bursts
        self.free.extend(freed)
        self.ended.append((game.session_id, results, reason, tuple(credits)))
        return self._terminate(game.session_id, results, reason, tuple(credits), None)

    def _update(
        self, session_id: str, players: list[str], status: str, meta: dict[str, Any]
    ) -> Entry:
        event_id = self.event_id()
        payload = {
            "event_id": event_id,
            "session_id": session_id,
            "players": players,
            "status": status,
            "meta": meta,
        }
        return Entry("update", orjson.dumps(payload), event_id, None, (), session_id)

    def _terminate(
        self,
        session_id: str,
        results: list[dict[str, Any]],
        reason: str,
        credits: tuple[Credit, ...],
        expect: str | None,
    ) -> Entry:
        event_id = self.event_id()
        payload = {
            "event_id": event_id,
            "session_id": session_id,
            "results": results,
            "reason": reason,
        }
        return Entry("terminate", orjson.dumps(payload), event_id, expect, credits, session_id)

    def event_id(self) -> str:
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))

    # -- hostile entries ----------------------------------------------------------------

    def hostile(self) -> Entry:
        kind = self.rng.choice(HOSTILE_KINDS)
        if kind == NOT_IN_ROSTER and self.live_ids:
            return self.not_in_roster()
        if kind == SESSION_ENDED and self.ended:
            return self.session_ended()
        if kind == UNKNOWN_USER:
            return self.unknown_user()
        if kind == INVALID_EVENT:
            return self.invalid_event()
        return self.invalid_json()

    def invalid_json(self) -> Entry:
        rng = self.rng
        nonce = self.event_id()
        session_id = self.some_session()
        broken = rng.choice(
            (
                f'{{"event_id": "{nonce}", "session_id": "{session_id}", "players": ["',
                f"{{'event_id': '{nonce}', 'session_id': '{session_id}'}}",
                f'{{"event_id": "{nonce}", "session_id": "{session_id}",}}',
                f"not json at all {nonce}",
                f'{{"event_id": "{nonce}"}} {{"session_id": "{session_id}"}}',
            )
        ).encode()
        if rng.random() < 0.2:
            broken = b"\xff\xfe" + nonce.encode()  # not even UTF-8
        return Entry(rng.choice(("update", "terminate")), broken, None, INVALID_JSON)

    def invalid_event(self) -> Entry:
        rng = self.rng
        event_id = self.event_id()
        session_id = self.some_session()
        game = self.live.get(session_id)
        roster = list(game.roster) if game else [self.free[-1] if self.free else "ghost-000"]
        player = roster[0]
        result = {"username": player, "outcome": "win", "earnings": 10}
        cases: list[tuple[str, Any]] = [
            ("update", {"event_id": event_id, "players": roster}),
            ("update", {"event_id": event_id, "session_id": session_id, "players": []}),
            (
                "update",
                {
                    "event_id": event_id,
                    "session_id": session_id,
                    "players": [player, player.upper()],
                },
            ),
            (
                "update",
                {"event_id": event_id, "session_id": session_id, "players": roster, "status": "x"},
            ),
            ("update", {"event_id": event_id, "session_id": "bad session id!", "players": roster}),
            ("update", {"event_id": "not-a-uuid", "session_id": session_id, "players": roster}),
            (
                "update",
                {
                    "event_id": event_id,
                    "session_id": session_id,
                    "players": roster,
                    "meta": {f"k{i}": i for i in range(17)},
                },
            ),
            ("update", {"event_id": event_id, "session_id": session_id, "players": ["a b"]}),
            (
                "terminate",
                {
                    "event_id": event_id,
                    "session_id": session_id,
                    "results": [{**result, "outcome": "draw"}],
                },
            ),
            (
                "terminate",
                {
                    "event_id": event_id,
                    "session_id": session_id,
                    "results": [{**result, "earnings": -5}],
                },
            ),
            (
                "terminate",
                {
                    "event_id": event_id,
                    "session_id": session_id,
                    "results": [{**result, "earnings": 1.5}],
                },
            ),
            (
                "terminate",
                {
                    "event_id": event_id,
                    "session_id": session_id,
                    "results": [{**result, "earnings": 10**12}],
                },
            ),
            ("terminate", {"event_id": event_id, "session_id": session_id, "results": []}),
            (
                "terminate",
                {"event_id": event_id, "session_id": session_id, "results": [result, result]},
            ),
            (
                "terminate",
                {
                    "event_id": event_id,
                    "session_id": session_id,
                    "results": [result],
                    "reason": "x",
                },
            ),
            (rng.choice(("update", "terminate")), [event_id, session_id]),
            (rng.choice(("update", "terminate")), f"{event_id} {session_id}"),
        ]
        kind, body = rng.choice(cases)
        return Entry(kind, orjson.dumps(body), None, INVALID_EVENT)

    def unknown_user(self) -> Entry:
        ghosts = [f"ghost-{self.rng.getrandbits(40):010x}" for _ in range(self.rng.randint(1, 3))]
        self.sessions += 1
        session_id = f"x{self.index}-{self.sessions:07d}"
        entry = self._update(session_id, ghosts, "in_progress", {"map": "void"})
        entry.expect = UNKNOWN_USER
        return entry

    def not_in_roster(self) -> Entry:
        game = self.live[self.rng.choice(self.live_ids)]
        results = [{"username": player, "outcome": "loss", "earnings": 5} for player in game.roster]
        outsider = self.rng.choice(self.bystanders)
        results.insert(
            self.rng.randrange(len(results) + 1),
            {
                "username": outsider,
                "outcome": "win",
                "earnings": 500,
            },
        )
        credits = tuple((r["username"], r["outcome"] == "win", r["earnings"]) for r in results)
        return self._terminate(game.session_id, results, "completed", credits, NOT_IN_ROSTER)

    def session_ended(self) -> Entry:
        session_id, results, reason, credits = self.rng.choice(self.ended)
        return self._terminate(session_id, results, reason, credits, SESSION_ENDED)

    def some_session(self) -> str:
        if self.live_ids and self.rng.random() < 0.7:
            return self.rng.choice(self.live_ids)
        return f"p{self.index}-{self.rng.randint(1, max(1, self.sessions)):07d}"


def id_key(entry_id: str) -> tuple[int, int]:
    """`1700000000000-3` -> (1700000000000, 3): entry ids of one stream order by this."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)
