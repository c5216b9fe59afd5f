"""Exact competition ranks in the `leaderboard` table, set-based.

See docs/protocol.md, "SQL tables".
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field

from redis.client import Pipeline
from sqlalchemy import Connection, Engine, text

from usermgmt.persistence.keys import Keys
from usermgmt.persistence.sql import Driver

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


# The same ranking, read (not written): the rows a refresh would change, in id order,
# and whether their earnings changed too.
_CHANGED = text(
    "SELECT id, new_rank, earnings, earnings <> old_earnings FROM ("
    "SELECT l.id AS id, s.earnings AS earnings, "
    "RANK() OVER (ORDER BY s.earnings DESC) AS new_rank, l.rank AS old_rank, "
    "l.earnings AS old_earnings FROM leaderboard l JOIN stats s ON s.id = l.stats_id) AS ranked "
    "WHERE new_rank <> old_rank OR earnings <> old_earnings ORDER BY id"
)
_FETCH = 5_000


@dataclass
class RankSnapshot:
    """The leaderboard rows a refresh changes, as of one moment of `stats`: row id, rank,
    earnings and whether those changed, in id order, written a slice at a time
    (`write_ranks`).

    Kept in flat arrays (25 bytes a row): at 1M players nearly every rank moves.
    """

    ids: array[int] = field(default_factory=lambda: array("q"))
    ranks: array[int] = field(default_factory=lambda: array("q"))
    earnings: array[int] = field(default_factory=lambda: array("q"))
    earned: array[int] = field(default_factory=lambda: array("b"))

    def __len__(self) -> int:
        return len(self.ids)


def read_rank_snapshot(conn: Connection) -> RankSnapshot:
    """Rank `stats` in one read (one snapshot), keeping only the rows that differ.

    Meant for a connection of its own beside the writer: a read transaction on SQLite's
    WAL, or PostgreSQL's statement snapshot, never holds up the writer.
    """
    snapshot = RankSnapshot()
    result = conn.execute(_CHANGED)
    while rows := result.fetchmany(_FETCH):
        for row_id, rank, earnings, earned in rows:
            snapshot.ids.append(row_id)
            snapshot.ranks.append(rank)
            snapshot.earnings.append(earnings)
            snapshot.earned.append(bool(earned))
    return snapshot


def write_ranks(conn: Connection, snapshot: RankSnapshot, start: int, stop: int) -> None:
    """Write the snapshot's rows `start:stop` (a slice of its id order) to `leaderboard`.

    Rows whose earnings did not change get their rank only: the earnings index is
    then left alone (SQLite rewrites an index entry for every indexed column a SET
    names; measured 5x cheaper), and PostgreSQL can update them in place (HOT).
    """
    both: list[tuple[int, int, int]] = []
    rank_only: list[tuple[int, int]] = []
    for index in range(start, stop):
        if snapshot.earned[index]:
            both.append((snapshot.ranks[index], snapshot.earnings[index], snapshot.ids[index]))
        else:
            rank_only.append((snapshot.ranks[index], snapshot.ids[index]))
    db = Driver(conn)
    if db.dialect.name == "postgresql":
        db.unnest(
            "UPDATE leaderboard SET rank = v.rank, earnings = v.earnings "
            "FROM unnest(?::bigint[], ?::bigint[], ?::bigint[]) AS v(rank, earnings, id) "
            "WHERE leaderboard.id = v.id",
            both,
        )
        db.unnest(
            "UPDATE leaderboard SET rank = v.rank FROM unnest(?::bigint[], ?::bigint[]) "
            "AS v(rank, id) WHERE leaderboard.id = v.id",
            rank_only,
        )
        return
    db.many("UPDATE leaderboard SET rank = ?, earnings = ? WHERE id = ?", both)
    db.many("UPDATE leaderboard SET rank = ? WHERE id = ?", rank_only)


def refresh_ranks_now(engine: Engine) -> int:
    """Recompute every rank in a transaction of its own."""
    with engine.begin() as conn:
        return refresh_ranks(conn)


def count_players(engine: Engine) -> int:
    """How many players the database holds (every one has a `stats` row)."""
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM stats")).scalar_one())


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
