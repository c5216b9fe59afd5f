"""Ranks: exact in `leaderboard.rank` once idle, live in `um:leaderboard`, and carried
by `get_user` replies (docs/protocol.md, "SQL tables")."""

from __future__ import annotations

import random
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import orjson

from tests.conftest import Backend
from tests.integration.helpers import add_players, drain, publish, rows, standings
from usermgmt.domain.auth import parse_request
from usermgmt.domain.ranking import competition_ranks
from usermgmt.persistence import cache
from usermgmt.workers.auth.server import AuthServer
from usermgmt.workers.events.leaderboard_watch import LeaderboardWatch
from usermgmt.workers.runtime.bootstrap import Services


def play(backend: Backend, rng: random.Random, names: list[str], games: int, tag: str) -> None:
    """Publish `games` games of 2-4 players; earnings from a few values, so ties happen."""
    for number in range(games):
        roster = rng.sample(names, rng.randint(2, 4))
        session_id = f"{tag}-{number}"
        publish(backend.redis, backend.keys, "update", session_id=session_id, players=roster)
        publish(
            backend.redis,
            backend.keys,
            "terminate",
            session_id=session_id,
            results=[
                {
                    "username": name,
                    "outcome": rng.choice(["win", "loss"]),
                    "earnings": rng.choice([0, 0, 10, 25, 100]),
                }
                for name in roster
            ],
        )


def solo_wins(backend: Backend, *games: tuple[str, str, int]) -> None:
    """Publish one-player games (session id, the winner, earnings): update, terminate."""
    for session_id, winner, earnings in games:
        publish(backend.redis, backend.keys, "update", session_id=session_id, players=[winner])
        publish(
            backend.redis,
            backend.keys,
            "terminate",
            session_id=session_id,
            results=[{"username": winner, "outcome": "win", "earnings": earnings}],
        )


def python_ranks(services: Services) -> dict[str, int]:
    earnings = {name: row[2] for name, row in standings(services).items()}
    return competition_ranks(earnings)


def table_ranks(services: Services) -> dict[str, int]:
    return {name: row[4] for name, row in standings(services).items()}


@contextmanager
def auth_server(services: Services) -> Iterator[AuthServer]:
    server = AuthServer(services, "auth-test", threading.Event())
    try:
        yield server
    finally:
        server.pool.shutdown(wait=True)


def ask(server: AuthServer, op: str, **fields: Any) -> dict[str, Any]:
    request = parse_request(orjson.dumps({"request_id": str(uuid.uuid4()), "op": op, **fields}))
    pipe = server.redis.pipeline(transaction=False)  # what the server sends with the reply
    reply = server.handlers.answer(request, pipe, str(uuid.uuid4()))  # an entry id of its own
    pipe.execute()
    return reply


def test_ranks_are_exact_once_the_worker_is_idle(services: Services, backend: Backend) -> None:
    rng = random.Random(7)
    names = [f"player{i:02d}" for i in range(12)]
    add_players(services, *names)
    for round_number in range(3):
        play(backend, rng, names, games=6, tag=f"r{round_number}")
        drain(services)
        expected = python_ranks(services)
        assert table_ranks(services) == expected
        assert len(set(expected.values())) < len(expected), "the games should produce ties"
        # The sorted set holds the same earnings and gives the same ranks live.
        earnings = {name: row[2] for name, row in standings(services).items()}
        played = {
            name.decode(): int(score)
            for name, score in backend.redis.zscan_iter(backend.keys.leaderboard)
        }
        assert played == earnings
        for name, rank in expected.items():
            assert cache.live_rank(backend.redis, backend.keys, name) == rank
    # A player registered now, with nothing earned, ranks after everyone who has earnings.
    add_players(services, "newcomer")
    ranks = python_ranks(services)
    assert table_ranks(services)["newcomer"] == ranks["newcomer"]
    assert rows(services, "SELECT COUNT(*) FROM leaderboard WHERE earnings <> 0") != [(0,)]


def test_get_user_carries_the_current_rank(services: Services, backend: Backend) -> None:
    names = ["ann", "ben", "cid", "dot"]
    with auth_server(services) as server:
        for name in names:
            assert ask(server, "register", username=name, password="long-enough")["ok"]
        publish(backend.redis, backend.keys, "update", session_id="g1", players=["ann", "ben"])
        publish(
            backend.redis,
            backend.keys,
            "terminate",
            session_id="g1",
            results=[
                {"username": "ann", "outcome": "win", "earnings": 50},
                {"username": "ben", "outcome": "loss", "earnings": 50},
            ],
        )
        drain(services)
        replies = {name: ask(server, "get_user", username=name)["user"] for name in names}
        assert {name: user["rank"] for name, user in replies.items()} == {
            "ann": 1,
            "ben": 1,
            "cid": 3,
            "dot": 3,
        }
        assert replies["ann"]["earnings"] == 50 and replies["ann"]["win_count"] == 1

        # cid overtakes both; the replies follow before any rank refresh in SQL.
        publish(backend.redis, backend.keys, "update", session_id="g2", players=["cid"])
        publish(
            backend.redis,
            backend.keys,
            "terminate",
            session_id="g2",
            results=[{"username": "cid", "outcome": "win", "earnings": 70}],
        )
        drain(services)
        ranks = {name: ask(server, "get_user", username=name)["user"]["rank"] for name in names}
        assert ranks == {"cid": 1, "ann": 2, "ben": 2, "dot": 4}
        assert ranks == python_ranks(services) == table_ranks(services)


def test_the_leaderboard_cache_is_rebuilt_when_redis_lost_it(
    services: Services, backend: Backend
) -> None:
    """After a Redis restart only the players of new games would be in the set, each
    ranked against part of the population; the worker rebuilds it from SQL first."""
    add_players(services, "ann", "ben", "cid")
    solo_wins(backend, ("g1", "ann", 90), ("g2", "ben", 40))
    drain(services)
    backend.redis.delete(backend.keys.leaderboard)

    solo_wins(backend, ("g3", "cid", 60))
    drain(services)
    board = {
        name.decode(): int(score)
        for name, score in backend.redis.zrange(backend.keys.leaderboard, 0, -1, withscores=True)
    }
    assert board == {"ann": 90, "ben": 40, "cid": 60}
    with auth_server(services) as server:
        assert ask(server, "get_user", username="cid")["user"]["rank"] == 2
        assert ask(server, "get_user", username="ben")["user"]["rank"] == 3


def test_a_leaderboard_cache_lost_while_the_worker_runs_is_filled_again(
    services: Services, backend: Backend
) -> None:
    """Deleted by hand (or evicted) while the worker runs: the next games put back only
    their players, until the watch fills in the rest from SQL. It never lowers a score
    a batch raised meanwhile (the set is ahead of the table it read)."""
    add_players(services, "ann", "ben", "cid", "dee")
    solo_wins(backend, ("g1", "ann", 90), ("g2", "ben", 40), ("g3", "dee", 20))
    drain(services)
    backend.redis.delete(backend.keys.leaderboard)
    backend.redis.zadd(backend.keys.leaderboard, {"cid": 0})  # a live batch's write, after
    solo_wins(backend, ("g4", "cid", 10))
    drain(services)
    backend.redis.zadd(backend.keys.leaderboard, {"ann": 95}, gt=True)  # a batch ahead of SQL
    watch = LeaderboardWatch(services, threading.Event())
    assert watch.check_once() == 2
    board = {
        name.decode(): int(score)
        for name, score in backend.redis.zrange(backend.keys.leaderboard, 0, -1, withscores=True)
    }
    assert board == {"ann": 95, "ben": 40, "cid": 10, "dee": 20}
    assert watch.check_once() == -1  # whole: nothing to do
    with auth_server(services) as server:
        assert ask(server, "get_user", username="cid")["user"]["rank"] == 4


def test_the_login_rank_guess_is_checked_against_the_sorted_set(backend: Backend) -> None:
    """A login asks for the rank with the database's earnings as the score, one round trip."""
    redis, keys = backend.redis, backend.keys
    redis.zadd(keys.leaderboard, {"alice": 100, "bob": 50, "carol": 50, "dave": 10})

    def rank(name: str, earnings: int) -> int | None:
        pipe = redis.pipeline(transaction=False)
        cache.queue_live_rank(pipe, keys, name, earnings)
        return cache.live_rank_reply(redis, keys, name, earnings, pipe.execute())

    assert rank("alice", 100) == 1
    assert rank("carol", 50) == 2  # ties share a rank
    assert rank("dave", 10) == 4
    assert rank("dave", 5) == 4  # the set is ahead of the database: its score counts
    assert rank("erin", 0) is None  # not in the set


def test_a_leaderboard_key_of_another_type_never_fails_a_request_and_is_replaced(
    services: Services, backend: Backend
) -> None:
    """Overwritten by hand while no game runs: registrations, logins and lookups answer
    (ranks from the database), and the watch replaces the key with the set."""
    add_players(services, "ann", "ben")
    drain(services)
    backend.redis.set(backend.keys.leaderboard, "written by hand")
    with auth_server(services) as server:
        assert ask(server, "register", username="cid", password="Correct-Horse-9")["ok"]
        assert ask(server, "get_user", username="ann")["user"]["rank"] == 1
        login = ask(server, "login", username="cid", password="Correct-Horse-9")
        assert login["ok"] and login["user"]["rank"] == 1
    watch = LeaderboardWatch(services, threading.Event())
    assert watch.check_once() == 0
    board = backend.redis.zrange(backend.keys.leaderboard, 0, -1, withscores=True)
    assert {name.decode(): int(score) for name, score in board} == {"ann": 0, "ben": 0, "cid": 0}
