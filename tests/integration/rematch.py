"""A burst of games where every player plays again as soon as their game ends, with one
bad update among them, and the checks that the worker applied it exactly."""

from __future__ import annotations

import uuid
from typing import Any

import orjson
from redis import Redis

from tests.integration.helpers import pending_count, standings
from usermgmt.persistence.keys import Keys
from usermgmt.workers.runtime.bootstrap import Services

PLAYERS = [f"player{index}" for index in range(8)]


def rematch_games() -> tuple[list[tuple[str, dict[str, Any]]], dict[str, tuple[int, int, int]]]:
    """Three rounds of two 4-player games; every player plays again as soon as their
    game ends. Returns the events in publishing order and (wins, losses, earnings)."""
    events: list[tuple[str, dict[str, Any]]] = []
    totals = {name: (0, 0, 0) for name in PLAYERS}
    for round_ in range(3):
        for table in range(2):
            session_id = f"r{round_}-t{table}"
            players = PLAYERS[table * 4 : table * 4 + 4]
            events.append(("update", {"session_id": session_id, "players": players}))
            results = []
            for seat, name in enumerate(players):
                won = (seat + round_) % 2 == 0
                earnings = 100 + 10 * seat if won else seat
                wins, losses, total = totals[name]
                totals[name] = (wins + won, losses + (not won), total + earnings)
                outcome = "win" if won else "loss"
                results.append({"username": name, "outcome": outcome, "earnings": earnings})
            events.append(("terminate", {"session_id": session_id, "results": results}))
    return events, totals


Totals = dict[str, tuple[int, int, int]]
BAD_UPDATE = {"session_id": "lost", "players": ["nobody-here"]}  # an unknown player


def publish_games(clients: list[Redis], keys: Keys) -> tuple[str, Totals]:
    """The rematch games and one bad update, published without a pause in two pipelined
    bursts from two connections. Returns the bad update's payload and the totals."""
    events, totals = rematch_games()
    events.insert(1, ("update", dict(BAD_UPDATE)))
    half = len(events) // 2
    for client, burst in zip(clients, (events[:half], events[half:]), strict=True):
        pipe = client.pipeline(transaction=False)
        for kind, payload in burst:
            payload["event_id"] = str(uuid.uuid4())
            pipe.xadd(keys.event_stream(kind), {"payload": orjson.dumps(payload)})
        pipe.execute()
    return orjson.dumps(events[1][1]).decode(), totals


def assert_exact(services: Services, redis: Redis, keys: Keys, totals: Totals) -> None:
    """Stats and wallets as the games add up; caches, scores and sessions written."""
    assert {
        name: (wins, losses, earnings, wallet)
        for name, (wins, losses, earnings, wallet, _) in standings(services).items()
    } == {name: (*counts, counts[2]) for name, counts in totals.items()}
    for name, (wins, losses, earnings) in totals.items():
        cached = redis.hgetall(keys.user(name))
        assert cached[b"win_count"] == str(wins).encode()
        assert cached[b"loss_count"] == str(losses).encode()
        assert cached[b"earnings"] == str(earnings).encode()
        assert b"session" not in cached
        assert redis.zscore(keys.leaderboard, name) == earnings
    for index in range(3):
        for table in range(2):
            assert not redis.exists(keys.session(f"r{index}-t{table}"))
    assert pending_count(redis, keys) == 0
