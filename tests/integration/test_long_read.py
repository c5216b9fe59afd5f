"""`long_read` and SQLite's WAL checkpoints (`persistence/db.py`): no RESTART while a long
read (a rank snapshot) holds an old snapshot, and no long read during a RESTART."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy import Connection, text

from usermgmt.persistence import db
from usermgmt.persistence.db import checkpoint_wal, long_read, make_engine


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[sa.Engine]:
    """A SQLite file database whose commits leave the WAL to `checkpoint_wal`, with a
    table of a few rows in its WAL."""
    built = make_engine(f"sqlite:///{tmp_path / 'wal.db'}", background_checkpoints=True)
    with built.begin() as conn:
        conn.execute(text("CREATE TABLE t (x INTEGER)"))
        conn.execute(text("INSERT INTO t VALUES (1)"))
    yield built
    built.dispose()


def record_restarts(monkeypatch: pytest.MonkeyPatch) -> list[Path | None]:
    """Replace `_restart` with a recorder of the WAL file each call was given."""
    restarts: list[Path | None] = []

    def restart(conn: Connection, wal: Path | None) -> None:
        restarts.append(wal)

    monkeypatch.setattr(db, "_restart", restart)
    return restarts


def test_no_restart_while_a_long_read_runs(
    engine: sa.Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    restarts = record_restarts(monkeypatch)
    with long_read():
        pages, _ = checkpoint_wal(engine, restart_pages=0) or (0, 0)
    assert pages > 0  # the WAL had content: only the long read held the RESTART back
    assert restarts == []

    pages, _ = checkpoint_wal(engine, restart_pages=0) or (0, 0)
    assert pages > 0
    assert restarts == [tmp_path / "wal.db-wal"]
    # The lock is free again after each checkpoint: a long read starts at once.
    with long_read():
        pass


def test_a_checkpoint_does_not_wait_for_an_open_long_read(engine: sa.Engine) -> None:
    """The real RESTART waits (busy_timeout, 5 s) for a reader of an older snapshot; under
    `long_read` the checkpoint skips it and returns at once, and the reader reads on."""
    with long_read(), engine.connect() as reader:
        reader.begin()
        assert reader.execute(text("SELECT count(*) FROM t")).scalar() == 1
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO t VALUES (2)"))
        started = time.perf_counter()
        pages, copied = checkpoint_wal(engine, restart_pages=0) or (0, 0)
        assert time.perf_counter() - started < 1.0
        assert pages > copied  # the reader's snapshot kept the last commit's pages in the WAL
        assert reader.execute(text("SELECT count(*) FROM t")).scalar() == 1
        reader.rollback()
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM t")).scalar() == 2


def test_a_long_read_waits_for_a_restart_under_way() -> None:
    entered = threading.Event()
    left = threading.Event()

    def read() -> None:
        with long_read():
            entered.set()
        left.set()

    with db._RESTARTS:  # as `checkpoint_wal` holds it through a RESTART
        thread = threading.Thread(target=read, name="long-read", daemon=True)
        thread.start()
        assert not entered.wait(0.3)
        assert thread.is_alive()
    assert entered.wait(5)
    assert left.wait(5)
    thread.join(5)
    assert not thread.is_alive()
    assert db._RESTARTS.acquire(blocking=False)  # and let go afterwards
    db._RESTARTS.release()
