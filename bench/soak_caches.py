"""The soak's cache check: what the worker keeps in Redis, against the tables.

Once a phase has drained, every user hash that exists must show its player's wallet
and totals as SQL has them, and `session` exactly while the player is in a live
session (that one); `um:leaderboard` must score every player it names at their
earnings, and name everyone who has earned; a session hash must exist for each live
session, with its players, and for no other. Kills and Redis restarts come in between
the writes: a redelivered entry refreshes what its lost write would have.
"""

from __future__ import annotations

from collections import defaultdict

import orjson
import sqlalchemy as sa
from redis import Redis

from usermgmt.persistence.db import make_engine
from usermgmt.persistence.keys import Keys

PAGE = 2_000  # commands per pipeline


def cache_mismatches(redis: Redis, keys: Keys, database_url: str) -> list[str]:
    """Every difference found (each a line), users first, then sessions."""
    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            totals = {
                str(name): (int(wallet), int(wins), int(losses), int(earned))
                for name, wallet, wins, losses, earned in conn.execute(
                    sa.text(
                        "SELECT u.username, u.wallet, s.win_count, s.loss_count, s.earnings "
                        "FROM users u JOIN stats s ON s.user_id = u.id"
                    )
                )
            }
            rosters: dict[str, set[str]] = defaultdict(set)
            playing: dict[str, str] = {}
            for name, session_id in conn.execute(
                sa.text(
                    "SELECT u.username, g.session_id FROM session_players p "
                    "JOIN users u ON u.id = p.user_id JOIN game_sessions g ON g.id = p.session_pk"
                )
            ):
                rosters[str(session_id)].add(str(name))
                playing[str(name)] = str(session_id)
            live = {
                str(session_id)
                for (session_id,) in conn.execute(
                    sa.text("SELECT session_id FROM game_sessions WHERE status <> 'ended'")
                )
            }
    finally:
        engine.dispose()
    return _users(redis, keys, totals, playing) + _sessions(redis, keys, live, rosters)


def _users(
    redis: Redis, keys: Keys, totals: dict[str, tuple[int, ...]], playing: dict[str, str]
) -> list[str]:
    problems: list[str] = []
    names = sorted(totals)
    for start in range(0, len(names), PAGE):
        page = names[start : start + PAGE]
        pipe = redis.pipeline(transaction=False)
        for name in page:
            pipe.hgetall(keys.user(name))
            pipe.zscore(keys.leaderboard, name)
        replies = pipe.execute()
        for index, name in enumerate(page):
            cached, score = replies[2 * index], replies[2 * index + 1]
            wallet, wins, losses, earned = totals[name]
            if cached:
                got = tuple(
                    int(cached.get(field, b"-1"))
                    for field in (b"wallet", b"win_count", b"loss_count", b"earnings")
                )
                if got != (wallet, wins, losses, earned):
                    problems.append(f"user hash of {name}: {got}, the tables {totals[name]}")
                session = cached.get(b"session")
                want = playing.get(name)
                if (session.decode() if session else None) != want:
                    problems.append(f"user hash of {name}: session {session!r}, playing {want}")
            if (score is None and earned) or (score is not None and int(score) != earned):
                problems.append(f"leaderboard score of {name}: {score}, earnings {earned}")
    return problems


def _sessions(redis: Redis, keys: Keys, live: set[str], rosters: dict[str, set[str]]) -> list[str]:
    problems: list[str] = []
    prefix = keys.session("")
    cached = {
        (key.decode() if isinstance(key, bytes) else key)[len(prefix) :]
        for key in redis.scan_iter(match=f"{prefix}*", count=5_000)
    }
    for session_id in sorted(cached - live):
        problems.append(f"session hash of {session_id}, which is not live")
    for session_id in sorted(live - cached):
        problems.append(f"no session hash for the live session {session_id}")
    both = sorted(cached & live)
    for start in range(0, len(both), PAGE):
        page = both[start : start + PAGE]
        pipe = redis.pipeline(transaction=False)
        for session_id in page:
            pipe.hget(keys.session(session_id), "players")
        for session_id, players in zip(page, pipe.execute(), strict=True):
            got = set(orjson.loads(players)) if players else set()
            if got != rosters.get(session_id, set()):
                problems.append(
                    f"session hash of {session_id}: players {sorted(got)}, "
                    f"the roster {sorted(rosters.get(session_id, set()))}"
                )
    return problems
