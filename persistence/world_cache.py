"""The event consumer's memory of the rows it has read and written, between batches.

SQLite only. `PRAGMA data_version` changes when, and only when, another connection
has committed since this connection last looked: while it stays put, every player
and live session this connection read or wrote is still exactly as it knows it,
and a batch reads only the rows it has not seen yet. Any doubt forgets everything:
another writer, a failed transaction, a rank refresh, or too many players to hold.
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

    def world_for(self, conn: Connection) -> World:
        """The world to plan a batch in: call inside the batch's write transaction.

        Under the write lock nobody else can commit until this transaction ends, so
        what is known now stays true until the commit.
        """
        if not is_sqlite(conn.engine):
            self.waiters = None
            return new_world()  # no cheap way to tell another writer's commit
        ((version,),) = Driver(conn).rows("PRAGMA data_version")
        world = self.world
        if (
            world is None
            or version != self.version
            or len(world.players) > self.max_players
            or len(world.sessions) > MAX_SESSIONS
        ):
            world = self.world = new_world()
            self.waiters = None
        self.version = version
        return world

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
