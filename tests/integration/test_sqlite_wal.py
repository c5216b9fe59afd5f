"""SQLite's WAL in the worker: checkpointed by a thread of its own, never by a commit."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import fakeredis
import sqlalchemy as sa

from usermgmt.persistence.db import (
    HOT_BYTES_PER_PLAYER,
    PAGE_CACHE_MAX_KIB,
    PAGE_CACHE_MIN_KIB,
    checkpoint_wal,
    fit_page_cache,
    make_engine,
    upgrade,
)
from usermgmt.persistence.keys import Keys
from usermgmt.workers.runtime.bootstrap import Services
from usermgmt.workers.runtime.runner import Worker
from usermgmt.workers.runtime.settings import load_settings


def _wal_size(database_url: str) -> int:
    wal = Path(sa.make_url(database_url).database + "-wal")  # type: ignore[operator]
    return wal.stat().st_size if wal.exists() else 0


def _write(engine: sa.Engine, rows: int) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE IF NOT EXISTS filler (id INTEGER PRIMARY KEY, x TEXT)")
        conn.exec_driver_sql(
            "INSERT INTO filler (x) VALUES (?)", [("x" * 500,) for _ in range(rows)]
        )


def test_every_connection_syncs_its_commits(sqlite_url: str) -> None:
    """A batch is acked (an answer sent) right after its commit: the commit must be on
    disk by then, not only at the next checkpoint, or a power loss could roll back what
    Redis already counts as done. synchronous=FULL (2) on every engine the worker makes."""
    upgrade(sqlite_url)
    for engine in (make_engine(sqlite_url, background_checkpoints=True), make_engine(sqlite_url)):
        try:
            with engine.connect() as conn:
                assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
                assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2
        finally:
            engine.dispose()


def test_commits_do_not_checkpoint_with_background_checkpoints(sqlite_url: str) -> None:
    upgrade(sqlite_url)
    engine = make_engine(sqlite_url, background_checkpoints=True)
    default = make_engine(sqlite_url)
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == 0
        with default.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == 20_000
        # ~10 MB of commits: nothing copies them out of the WAL ...
        for _ in range(20):
            _write(engine, 1_000)
        grown = _wal_size(sqlite_url)
        assert grown > 8 * 2**20
        # ... until a checkpoint does; once the WAL is long it is also restarted, so
        # the next commit writes at its start instead of making it longer.
        pages, copied = checkpoint_wal(engine, restart_pages=1_000) or (0, 0)
        assert pages > 2_000 and copied == pages
        _write(engine, 10)
        with engine.connect() as conn:
            busy, frames, _ = conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)").one()
        assert busy == 0 and frames < 50
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT count(*) FROM filler").scalar() == 20_010
    finally:
        engine.dispose()
        default.dispose()


def test_checkpoint_wal_is_a_no_op_off_sqlite(postgres_url: str) -> None:
    engine = make_engine(postgres_url)
    try:
        assert checkpoint_wal(engine) is None
    finally:
        engine.dispose()


def test_the_worker_checkpoints_the_wal(sqlite_url: str, prefix: str) -> None:
    upgrade(sqlite_url)
    settings = load_settings(database_url=sqlite_url, key_prefix=prefix, trim_interval_s=0)
    services = Services(
        settings=settings,
        redis=fakeredis.FakeRedis(),
        engine=make_engine(sqlite_url, background_checkpoints=True),
        keys=Keys(prefix),
    )
    database = Path(sa.make_url(sqlite_url).database)  # type: ignore[arg-type]
    for _ in range(20):  # ~10 MB, all of it in the WAL: commits do not checkpoint
        _write(services.engine, 1_000)
    assert database.stat().st_size < 2**20
    worker = Worker(services, "wal-test", only="events")
    thread = threading.Thread(target=worker.run, kwargs={"handle_signals": False})
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while database.stat().st_size < 8 * 2**20 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert database.stat().st_size >= 8 * 2**20  # copied into the database file
    finally:
        worker.stop.set()
        thread.join(30)
        services.close()
    assert not thread.is_alive()


def test_the_page_cache_is_sized_to_the_players(sqlite_url: str) -> None:
    upgrade(sqlite_url)
    engine = make_engine(sqlite_url)
    try:
        with engine.connect() as conn:
            driver = conn.connection.driver_connection
            assert fit_page_cache(driver) == PAGE_CACHE_MIN_KIB  # nobody registered yet
            assert driver.execute("PRAGMA cache_size").fetchone()[0] == -PAGE_CACHE_MIN_KIB
            # Ids are what counts (the biggest), not rows: one row stands for 100k players.
            conn.exec_driver_sql(
                "INSERT INTO users (id, username, username_key, password_hash, wallet, created_at)"
                " VALUES (100000, 'p', 'p', 'x', 0, '2024-01-01 00:00:00')"
            )
            assert fit_page_cache(driver) == 100_000 * HOT_BYTES_PER_PLAYER // 1024
            conn.exec_driver_sql("UPDATE users SET id = 10000000")
            assert fit_page_cache(driver) == PAGE_CACHE_MAX_KIB
            conn.rollback()
    finally:
        engine.dispose()
