"""The event consumer's world cache: rows known between batches, never stale."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa

from tests.conftest import Backend
from tests.integration.helpers import add_players, apply_available, publish, rows, services_for
from tests.integration.replay_helpers import results
from usermgmt.persistence.db import make_engine, upgrade
from usermgmt.persistence.games import new_world
from usermgmt.persistence.world_cache import WorldCache
from usermgmt.workers.events.consumer import EventConsumer


def cached_user(backend: Backend, name: str) -> dict[str, str]:
    raw = backend.redis.hgetall(backend.keys.user(name))
    return {k.decode(): v.decode() for k, v in raw.items()}


def play(backend: Backend, session_id: str, *outcomes: tuple[str, str, int]) -> None:
    """One game: its update, then its terminate."""
    redis, keys = backend.redis, backend.keys
    names = [name for name, _, _ in outcomes]
    publish(redis, keys, "update", session_id=session_id, players=names)
    publish(redis, keys, "terminate", session_id=session_id, results=results(*outcomes))


def test_a_change_committed_by_another_connection_is_seen_by_the_next_batch(
    backend: Backend,
) -> None:
    with services_for(backend) as services:
        add_players(services, "alice", "bob")
        worker = EventConsumer(services, "c1", threading.Event(), burst=True)
        play(backend, "g1", ("alice", "win", 100), ("bob", "loss", 0))
        apply_available(worker)
        assert worker.store.known.world is not None or not backend.database_url.startswith("sqlite")
        # Someone else changes alice's wallet and registers carol meanwhile.
        with services.engine.begin() as conn:
            conn.execute(sa.text("UPDATE users SET wallet = wallet + 1000 WHERE id = 1"))
        add_players(services, "carol")
        play(backend, "g2", ("alice", "win", 5), ("carol", "loss", 1))
        apply_available(worker)  # the same consumer and connection
        worker.store.close()

        ((wallet,),) = rows(services, "SELECT wallet FROM users WHERE username = 'alice'")
        assert wallet == 1105
        assert cached_user(backend, "alice")["wallet"] == "1105"
        assert cached_user(backend, "alice")["earnings"] == "105"
        assert cached_user(backend, "carol")["earnings"] == "1"


def test_ranks_refreshed_between_batches_reach_the_user_hashes(backend: Backend) -> None:
    with services_for(backend) as services:
        add_players(services, "alice", "bob", "carol")
        worker = EventConsumer(services, "c1", threading.Event(), burst=True)
        play(backend, "g1", ("alice", "win", 100), ("bob", "loss", 0))
        apply_available(worker)  # bob known, at rank 1 as loaded
        worker.refresh_ranks()  # as when idle: alice 1, bob and carol 2
        publish(backend.redis, backend.keys, "update", session_id="g2", players=["bob"])
        apply_available(worker)
        worker.store.close()

        ranks = dict(
            rows(
                services,
                "SELECT u.username, l.rank FROM users u JOIN stats s ON s.user_id = u.id "
                "JOIN leaderboard l ON l.stats_id = s.id",
            )
        )
        assert ranks == {"alice": 1, "bob": 2, "carol": 2}
        assert cached_user(backend, "bob")["rank"] == "2"
        assert cached_user(backend, "bob")["session"] == "g2"


@contextmanager
def migrated(url: str) -> Iterator[sa.Engine]:
    """An engine on a freshly migrated database, disposed of afterwards."""
    upgrade(url)
    engine = make_engine(url)
    try:
        yield engine
    finally:
        engine.dispose()


def test_the_world_is_kept_only_while_nobody_else_commits(sqlite_url: str) -> None:
    cache = WorldCache()
    with (
        migrated(sqlite_url) as engine,
        migrated(sqlite_url) as other,  # the same database, another writer
        engine.connect() as conn,
    ):
        with conn.begin():
            first = cache.world_for(conn)
        with conn.begin():
            assert cache.world_for(conn) is first
            conn.execute(sa.text("DELETE FROM stream_checkpoints"))  # our own commit
        with conn.begin():
            assert cache.world_for(conn) is first
        with other.begin() as elsewhere:
            elsewhere.execute(sa.text("DELETE FROM stream_checkpoints"))
        with conn.begin():
            second = cache.world_for(conn)
            assert second is not first
        cache.forget()
        with conn.begin():
            assert cache.world_for(conn) is not second


def test_a_full_world_starts_again(sqlite_url: str) -> None:
    cache = WorldCache(max_players=1)
    with migrated(sqlite_url) as engine, engine.connect() as conn:
        with conn.begin():
            world = cache.world_for(conn)
        template = new_world()
        assert world == template
        world.players.update({"a": None, "b": None})  # type: ignore[dict-item]
        with conn.begin():
            assert cache.world_for(conn) is not world


def _batch(cache: WorldCache, conn: sa.Connection, statement: str | None = None) -> object:
    """One event batch's transaction as `EventStore.apply` runs it: the world, the
    batch's writes, its bump, the commit; returns the world it planned in."""
    with conn.begin():
        world = cache.world_for(conn)
        if statement is not None:
            conn.execute(sa.text(statement))
        cache.bump(conn)
    cache.committed()
    return world


PLAYER_WRITE = "UPDATE users SET wallet = wallet + 1 WHERE id = 1"


def test_postgresql_keeps_the_world_while_only_its_batches_write(postgres_url: str) -> None:
    cache = WorldCache()
    with migrated(postgres_url) as engine, engine.connect() as conn:
        add = "INSERT INTO users (username, username_key, password_hash, wallet, created_at) "
        with conn.begin():
            conn.execute(sa.text(add + "VALUES ('alice', 'alice', 'x', 0, now())"))
        first = _batch(cache, conn)
        # The batch's own writes are counted by its one bump, not by the triggers.
        assert _batch(cache, conn, PLAYER_WRITE) is first
        assert _batch(cache, conn, "DELETE FROM session_players") is first
        assert _batch(cache, conn) is first
        # A registration only adds a player nobody has read.
        with engine.begin() as elsewhere:
            elsewhere.execute(sa.text(add + "VALUES ('bob', 'bob', 'x', 0, now())"))
        assert _batch(cache, conn) is first
        ((version,),) = conn.execute(sa.text("SELECT version FROM world_version")).all()
        conn.rollback()
        assert version == 5  # one bump a batch


def test_postgresql_forgets_the_world_when_anyone_else_writes(postgres_url: str) -> None:
    cache = WorldCache()
    with migrated(postgres_url) as engine, engine.connect() as conn:
        first = _batch(cache, conn)
        # An operator's change to a player or a session, or a rank refresh.
        for statement in (
            PLAYER_WRITE,
            "UPDATE stats SET earnings = 0",
            "UPDATE leaderboard SET rank = 1",
            "DELETE FROM game_sessions",
            "DELETE FROM session_players",
            "DELETE FROM waiting_events",
        ):
            with engine.begin() as elsewhere:
                elsewhere.execute(sa.text(statement))
            again = _batch(cache, conn)
            assert again is not first, statement
            assert _batch(cache, conn) is again
            first = again


def test_postgresql_forgets_the_world_when_another_worker_runs_a_batch(
    postgres_url: str,
) -> None:
    mine, theirs = WorldCache(), WorldCache()
    with migrated(postgres_url) as engine, engine.connect() as conn, engine.connect() as other:
        first = _batch(mine, conn)
        _batch(theirs, other, PLAYER_WRITE)
        assert _batch(mine, conn) is not first


def test_postgresql_forgets_a_world_someone_wrote_to_during_the_batch(postgres_url: str) -> None:
    """Another writer commits between the batch's first look and its bump: the batch's
    bump returns two more, and what it planned with is not kept."""
    cache = WorldCache()
    with migrated(postgres_url) as engine, engine.connect() as conn:
        first = _batch(cache, conn)
        with conn.begin():
            assert cache.world_for(conn) is first
            with engine.begin() as elsewhere:
                elsewhere.execute(sa.text(PLAYER_WRITE))
            cache.bump(conn)
        cache.committed()
        assert _batch(cache, conn) is not first


def test_postgresql_forgets_the_world_without_its_version_row(postgres_url: str) -> None:
    cache = WorldCache()
    with migrated(postgres_url) as engine, engine.connect() as conn:
        first = _batch(cache, conn)
        with engine.begin() as elsewhere:
            elsewhere.execute(sa.text("DELETE FROM world_version"))
        second = _batch(cache, conn)
        assert second is not first
        assert _batch(cache, conn) is not second
