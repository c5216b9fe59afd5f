"""The event consumer's memory of the rows it has read and written, between batches.

While nobody else has written since this connection's last batch, every player and
live session it read or wrote is still exactly as it knows it, and a batch reads
only the rows it has not seen yet. Any doubt forgets everything: another writer, a
failed transaction, a rank refresh, or too many players to hold.

- SQLite: `PRAGMA data_version` changes when, and only when, another connection has
  committed since this connection last looked.
- PostgreSQL: the `world_version` row (migration 0006). Triggers bump it for any
  change to the player and session tables outside an event batch; an event batch
  marks its transaction and bumps it once, last. The value a batch's own bump
  returns is the previous value plus one only if nobody else bumped meanwhile
  (another writer's bump holds the row until its commit, and the batch's bump waits
  for it).
"""

from __future__ import annotations

from sqlalchemy import Connection

from usermgmt.domain.games import Changes, World
from usermgmt.domain.waiting import Waiters
from usermgmt.persistence.db import is_sqlite
from usermgmt.persistence.games import new_world
from usermgmt.persistence.sql import Driver

MAX_PLAYERS = 100_000  # about 20 MB of player records; beyond that, start again
MAX_SESSIONS = 100_000


class WorldCache:
    """The players and live sessions one connection knows, valid while nobody else writes."""

    def __init__(self, max_players: int = MAX_PLAYERS) -> None:
        self.max_players = max_players
        self.world: World | None = None
        self.waiters: Waiters | None = None  # the waiting entries, known with the world
        self.version: int | None = None
        self.counted = False  # PostgreSQL: batches count their commits in `world_version`
        self.written: int | None = None  # the count this batch's bump left, until its commit

    def world_for(self, conn: Connection) -> World:
        """The world to plan a batch in: call inside the batch's write transaction.

        SQLite: under the write lock nobody else can commit until this transaction
        ends, so what is known now stays true until the commit. PostgreSQL: others
        can, and the batch's `bump` tells whether anyone did.
        """
        self.written = None
        self.counted = not is_sqlite(conn.engine)
        if self.counted:
            version = _marked_version(conn)
        else:
            ((version,),) = Driver(conn).rows("PRAGMA data_version")
        world = self.world
        if (
            world is None
            or version is None
            or version != self.version
            or len(world.players) > self.max_players
            or len(world.sessions) > MAX_SESSIONS
        ):
            world = self.world = new_world()
            self.waiters = None
        self.version = version
        return world

    def bump(self, conn: Connection) -> None:
        """PostgreSQL: this batch's one bump of `world_version`, last in its transaction."""
        if not self.counted:
            return
        rows = Driver(conn).rows("UPDATE world_version SET version = version + 1 RETURNING version")
        self.written = rows[0][0] if rows else None

    def committed(self) -> None:
        """After the batch's commit. PostgreSQL: what it knows stays valid only if its own
        bump was the one since `world_for`. SQLite: nothing to do (a connection's own
        commits leave its `data_version` alone)."""
        if not self.counted:
            return
        written, self.written = self.written, None
        if written is None or self.version is None or written != self.version + 1:
            self.forget()
            return
        self.version = written

    def release_ended(self, changes: Changes) -> None:
        """Drop the sessions a committed batch ended, once their caches are written."""
        world = self.world
        if world is None:
            return
        for session_id in changes.touched_sessions:
            session = world.sessions.get(session_id)
            if session is not None and session.ended:
                del world.sessions[session_id]

    def forget(self) -> None:
        """Read everything again next time (a rollback, a rank refresh, a reconnect)."""
        self.world = None
        self.waiters = None


def _marked_version(conn: Connection) -> int | None:
    """The `world_version` as this transaction starts, marking it as an event batch's
    (its writes leave the count to its own `bump`); None without the row."""
    rows = Driver(conn).rows(
        "SELECT version, set_config('usermgmt.world_writer', 'events', true) FROM world_version"
    )
    return int(rows[0][0]) if rows else None
