"""Exact competition ranks in the `leaderboard` table, set-based.

See docs/protocol.md, "SQL tables".
"""

from __future__ import annotations

from redis.client import Pipeline
from sqlalchemy import Connection, Engine, text

from usermgmt.persistence.keys import Keys

# One statement on SQLite (>= 3.33) and PostgreSQL: the snapshot of `stats` (earnings and
# competition rank); only rows whose earnings or rank moved are written.
_REFRESH = text(
    "UPDATE leaderboard SET earnings = ranked.earnings, rank = ranked.new_rank "
    "FROM (SELECT l.id AS id, s.earnings AS earnings, "
    "RANK() OVER (ORDER BY s.earnings DESC) AS new_rank "
    "FROM leaderboard l JOIN stats s ON s.id = l.stats_id) AS ranked "
    "WHERE leaderboard.id = ranked.id "
    "AND (leaderboard.rank <> ranked.new_rank OR leaderboard.earnings <> ranked.earnings)"
)


def refresh_ranks(conn: Connection) -> int:
    """Bring every leaderboard row up to `stats`; returns how many rows changed."""
    return conn.execute(_REFRESH).rowcount or 0


def refresh_ranks_now(engine: Engine) -> int:
    """Recompute every rank in a transaction of its own."""
    with engine.begin() as conn:
        return refresh_ranks(conn)


def rebuild_leaderboard_cache(
    engine: Engine, pipe: Pipeline, keys: Keys, chunk: int = 5_000, replace: bool = True
) -> int:
    """Fill `um:leaderboard` with every player's earnings from the database.

    The scores are added with `GT`, like every other writer's: a worker that raises a
    score between this read and the pipeline's execution is never lowered by it.
    `replace` deletes the set first (after a restore, scores may go down); a worker
    filling a set Redis lost must not, as another worker may be writing to it already.
    """
    total = 0
    if replace:
        pipe.delete(keys.leaderboard)
    with engine.connect() as conn:
        result = conn.execution_options(yield_per=chunk).execute(
            text("SELECT u.username, s.earnings FROM users u JOIN stats s ON s.user_id = u.id")
        )
        for rows in result.partitions(chunk):
            pipe.zadd(keys.leaderboard, {name: earnings for name, earnings in rows}, gt=True)
            total += len(rows)
    return total
