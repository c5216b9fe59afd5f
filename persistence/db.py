"""Engines and the Alembic upgrade, for SQLite and PostgreSQL alike."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.engine import URL
from sqlalchemy.pool import NullPool

import migrations

MIGRATIONS_DIR = Path(migrations.__file__).resolve().parent
IMMEDIATE = "usermgmt_begin_immediate"
# SQLite checkpoints the WAL into the database file once it holds this many pages
# (~80 MB), in the commit that crosses the line, unless checkpoints run in the background.
WAL_AUTOCHECKPOINT_PAGES = 20_000


def normalize_url(url: str) -> URL:
    """Parse a SQLAlchemy URL; a bare `postgresql://` uses psycopg 3, the driver we ship."""
    parsed = make_url(url)
    if parsed.drivername in {"postgresql", "postgres"}:
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def is_sqlite(engine: Engine) -> bool:
    """Whether `engine` talks to SQLite."""
    return engine.dialect.name == "sqlite"


def make_engine(url: str, *, background_checkpoints: bool = False, **kwargs: Any) -> Engine:
    """An engine with the settings the worker relies on.

    SQLite: WAL, `synchronous=NORMAL`, a busy timeout and foreign keys on; a
    connection with the `IMMEDIATE` execution option begins its transactions
    IMMEDIATE, so a read-then-write batch never deadlocks against another process.
    With `background_checkpoints`, commits never checkpoint the WAL: the caller runs
    `checkpoint_wal` on a thread of its own (the worker does).
    """
    parsed = normalize_url(url)
    if parsed.drivername.startswith("sqlite"):
        database = parsed.database
        if database and database != ":memory:":
            Path(database).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(parsed, poolclass=NullPool if not database else None, **kwargs)
        _configure_sqlite(engine, 0 if background_checkpoints else WAL_AUTOCHECKPOINT_PAGES)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    return create_engine(parsed, **kwargs)


def _configure_sqlite(engine: Engine, autocheckpoint_pages: int) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we issue BEGIN ourselves
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=5000")
        cursor.execute("PRAGMA foreign_keys=ON")
        # A batch of games touches thousands of random player rows in three tables: a
        # 64 MiB page cache (default 2 MiB) and a checkpoint every ~80 MB of WAL (default
        # ~4 MB, which checkpointed and synced after nearly every batch once the
        # population outgrew the cache) made a 200k-player batch 4x faster (issue 4).
        cursor.execute("PRAGMA cache_size=-65536")
        cursor.execute(f"PRAGMA wal_autocheckpoint={autocheckpoint_pages:d}")
        cursor.execute("PRAGMA journal_size_limit=67108864")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        immediate = connection.get_execution_options().get(IMMEDIATE, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def checkpoint_wal(engine: Engine, restart_pages: int = 4_000) -> tuple[int, int] | None:
    """Copy committed WAL pages into a SQLite database file; None for other databases.

    First PASSIVE, which waits for no reader or writer: the event worker's commits go
    on meanwhile (the copy and its fsync run outside the GIL). A commit that
    checkpointed instead stalled its batch for ~200 ms every few seconds under load.
    Commits made meanwhile stay in the WAL, so under steady load it is never wholly
    copied and would grow without end; once it holds `restart_pages`, a RESTART
    copies what is left (a few pages: writers wait that long) and makes the next
    writer start the WAL over. Returns (pages in the WAL, pages copied) as of the
    PASSIVE checkpoint.
    """
    if not is_sqlite(engine):
        return None
    with engine.connect() as conn:
        _, wal_pages, copied = conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)").one()
        if wal_pages >= restart_pages:
            conn.exec_driver_sql("PRAGMA wal_checkpoint(RESTART)").one()
    return int(wal_pages), int(copied)


def alembic_config(url: str) -> Any:
    """An Alembic config for the migrations shipped inside the package."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    rendered = normalize_url(url).render_as_string(hide_password=False)
    config.set_main_option("sqlalchemy.url", rendered.replace("%", "%%"))  # configparser syntax
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Upgrade the database at `url` to `revision` (creating a SQLite file if missing)."""
    from alembic import command

    engine = make_engine(url)
    try:
        with engine.begin() as connection:
            config = alembic_config(url)
            config.attributes["connection"] = connection
            command.upgrade(config, revision)
    finally:
        engine.dispose()


def current_revision(url: str) -> str | None:
    """The revision the database is at, or None when it was never migrated."""
    from alembic.runtime.migration import MigrationContext

    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()
