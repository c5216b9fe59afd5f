"""Engines and the Alembic upgrade, for SQLite and PostgreSQL alike."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, make_url
from sqlalchemy.engine import URL
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import NullPool

from usermgmt import migrations

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


def sqlite_path(database_url: str) -> Path | None:
    """The file of a SQLite URL (None for PostgreSQL or an in-memory database)."""
    url = normalize_url(database_url)
    if not url.drivername.startswith("sqlite") or not url.database:
        return None
    if url.database == ":memory:":
        return None
    return Path(url.database).expanduser().resolve()


def is_sqlite(engine: Engine) -> bool:
    """Whether `engine` talks to SQLite."""
    return engine.dialect.name == "sqlite"


def make_engine(
    url: str, *, background_checkpoints: bool = False, existing_only: bool = False, **kwargs: Any
) -> Engine:
    """An engine with the settings the worker relies on.

    SQLite: WAL, `synchronous=FULL`, a busy timeout and foreign keys on; a
    connection with the `IMMEDIATE` execution option begins its transactions
    IMMEDIATE, so a read-then-write batch never deadlocks against another process.
    With `background_checkpoints`, commits never checkpoint the WAL: the caller runs
    `checkpoint_wal` on a thread of its own (the worker does). With `existing_only`, a
    SQLite file is opened, never created (nor its folder): a command pointed at a
    wrong path says so instead of leaving an empty database there.
    """
    parsed = normalize_url(url)
    if parsed.drivername.startswith("sqlite"):
        path = sqlite_path(url)
        if path is not None and not existing_only:
            path.parent.mkdir(parents=True, exist_ok=True)
        pool = NullPool if not parsed.database else None
        engine = create_engine(parsed, poolclass=pool, **kwargs)
        pages = 0 if background_checkpoints else WAL_AUTOCHECKPOINT_PAGES
        _configure_sqlite(engine, pages, path)
        if path is not None and existing_only:
            _open_existing_only(engine, path)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    if "connect_timeout" not in parsed.query:  # a host that does not answer is an outage
        kwargs.setdefault("connect_args", {}).setdefault("connect_timeout", CONNECT_TIMEOUT_S)
    engine = create_engine(parsed, **kwargs)
    _configure_postgresql(engine)
    return engine


# PostgreSQL: how long a connection attempt may take, and how long a statement waits
# for a lock (another session's `LOCK TABLE`, a long `ALTER`) before it fails: the
# worker then reports the database as unusable and retries with backoff, and a SIGTERM
# meanwhile stops it, rather than waiting in silence for ever. Settings given in the URL
# or on the server win (`lock_timeout` only where it is off).
CONNECT_TIMEOUT_S = 10
LOCK_TIMEOUT = "10s"

# plan_cache_mode exists from PostgreSQL 12 on.
_PLAN_CACHE_MODE_SINCE = 120_000
# What the planner charges for a page read out of order, against 1 for one read in
# order: the default 4 prices a disk seek. The worker's tables are small and read
# constantly, so their pages are in memory, where a lookup by index costs about what
# reading in order does. 1.1 is the usual setting for data that fits in memory.
RANDOM_PAGE_COST = 1.1


def _configure_postgresql(engine: Engine) -> None:
    """Plan every statement for its parameters, pricing index lookups as cached; commits
    durable before they return (`synchronous_commit` never `off`).

    `plan_cache_mode=force_custom_plan`: psycopg prepares a statement run five times,
    and the server then settles on one generic plan unless it looks dearer than the
    plans made so far. The worker's statements look rows up by `= ANY(array)`;
    planned while the tables were nearly empty, a sequential scan looked cheapest and
    was kept while the tables grew. At 2,400 events/s on a fresh schema the worker
    fell further behind every second (p99 663-1,092 ms); planned each time, p99
    63-97 ms, alternating runs. A statement stays prepared (parsed once); only its
    planning, a fraction of a millisecond, comes back.

    `random_page_cost` at most `RANDOM_PAGE_COST` (a lower server setting is kept): at
    the default 4, a live batch's 70 players were joined to `stats` by reading the
    whole table (10,000 rows, 2.6 ms) rather than by 70 index lookups (0.8 ms), and
    their `stats` rows updated the same way (2.2 ms against 0.7).
    """

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        with dbapi_connection.cursor() as cursor:
            cursor.execute(
                "SELECT set_config('random_page_cost', least("
                "current_setting('random_page_cost')::float8, %s)::text, false)",
                (RANDOM_PAGE_COST,),
            )
            if dbapi_connection.info.server_version >= _PLAN_CACHE_MODE_SINCE:
                cursor.execute("SET plan_cache_mode = force_custom_plan")
            cursor.execute(
                "SELECT set_config('lock_timeout', %s, false) "
                "WHERE current_setting('lock_timeout') IN ('0', '0ms')",
                (LOCK_TIMEOUT,),
            )
            # A commit is acked (answered) at once: it must be on disk by then. `off`
            # returns before the WAL is flushed, so a server crash could roll back what
            # Redis already counts as done; `local` and the replica levels are kept.
            cursor.execute(
                "SELECT set_config('synchronous_commit', 'on', false) "
                "WHERE current_setting('synchronous_commit') = 'off'"
            )
        dbapi_connection.commit()


def _open_existing_only(engine: Engine, path: Path) -> None:
    """Open `path` read-write as a URI (`mode=rw`): SQLite then refuses a missing file."""

    @event.listens_for(engine, "do_connect")
    def _connect(_dialect: Any, _record: Any, cargs: list[Any], cparams: dict[str, Any]) -> None:
        cargs[:] = [f"{path.as_uri()}?mode=rw"]
        cparams["uri"] = True


def _file_id(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_dev, stat.st_ino


def _configure_sqlite(engine: Engine, autocheckpoint_pages: int, path: Path | None) -> None:
    """Pragmas for every connection; transactions begun by us, IMMEDIATE on request.

    A connection keeps the file it opened even once that file is deleted or replaced
    (an operator's mistake, a restore done by hand): what it commits then goes nowhere.
    Each transaction checks that `path` is still the file the connection opened; if not,
    the connection is dropped and the transaction fails as an outage would, so nothing
    is acked or answered as committed until the file is back.
    """

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, record: Any) -> None:
        if path is not None:
            record.info["file_id"] = _file_id(path)
        dbapi_connection.isolation_level = None  # we issue BEGIN ourselves
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on disk before it returns, so what is acked or answered
        # after it survives a power loss or a kernel crash too (NORMAL syncs only at
        # checkpoints: the last commits could roll back while Redis keeps their acks).
        # The event consumer's own connection syncs beside its work instead
        # (`usermgmt.workers.events.store`).
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS:d}")
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
        opened = connection.info.get("file_id")
        if path is not None and opened is not None and _file_id(path) != opened:
            connection.invalidate()
            reason = f"the database file {path} was deleted or replaced under this connection"
            raise OperationalError("BEGIN", None, sqlite3.OperationalError(reason))
        immediate = connection.get_execution_options().get(IMMEDIATE, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


BUSY_TIMEOUT_MS = 5_000
# A RESTART holds new writers while it waits for readers of older snapshots: it gives
# up after this long (a long read in another process, which `long_read` cannot see),
# and a later one copies what is left.
RESTART_WAIT_MS = 50
RESTART_PAGES = 16_000  # ~64 MB of WAL (`journal_size_limit`): then start it over
CATCH_UP_ROUNDS = 6
CAUGHT_UP_S = 0.003  # a round this short left the WAL nearly all copied


PAGE_CACHE_MIN_KIB = 16 * 1024
PAGE_CACHE_MAX_KIB = 64 * 1024
# users, stats and leaderboard rows and their indexes come to ~200 bytes a player: room
# for twice that keeps the event worker's hot set cached as the population grows.
HOT_BYTES_PER_PLAYER = 400


def fit_page_cache(dbapi_connection: Any) -> int:
    """Size a SQLite connection's page cache to the players (16-64 MiB); returns KiB.

    The event worker's hot set is the player tables: a cache much bigger than them
    only fills with pages of append-only tables (results, processed ids) that are
    written once, and its memory grows with every event until it is full.
    """
    cursor = dbapi_connection.cursor()
    try:
        players = cursor.execute("SELECT coalesce(max(id), 0) FROM users").fetchone()[0]
        kib = min(
            PAGE_CACHE_MAX_KIB, max(PAGE_CACHE_MIN_KIB, players * HOT_BYTES_PER_PLAYER // 1024)
        )
        cursor.execute(f"PRAGMA cache_size=-{kib:d}")
    finally:
        cursor.close()
    return int(kib)


def checkpoint_wal(engine: Engine, restart_pages: int = RESTART_PAGES) -> tuple[int, int] | None:
    """Copy committed WAL pages into a SQLite database file; None for other databases.

    Built so that writers never wait long (the event worker's commits go on while it
    runs), on a thread of the caller's (the worker's):

    - The WAL is fsynced first, outside any lock. SQLite fsyncs it at every
      checkpoint, and under load it grows by up to a hundred MB a second; flushed
      here, what a checkpoint has left to sync is what came since.
    - A PASSIVE checkpoint waits for no reader or writer; the copy and its fsync run
      outside the GIL.
    - Commits made meanwhile stay in the WAL, so under steady load it is never wholly
      copied and would grow without end. Once it holds `restart_pages`, more rounds
      of flush and PASSIVE catch up until one is quick, then a RESTART copies the
      little left and makes the next writer start the WAL over. Only the RESTART
      keeps writers waiting: it used to take 30-60 ms with tens of MB unsynced, and
      now takes a few. It waits for every reader of an older snapshot, so it is
      skipped while a `long_read` runs (the WAL grows meanwhile).

    Returns (pages in the WAL, pages copied) as of the first PASSIVE checkpoint.
    """
    if not is_sqlite(engine):
        return None
    wal = _wal_file(engine)
    with engine.connect() as conn:
        _flush(wal)
        _, wal_pages, copied = conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)").one()
        # A long read holds an old snapshot that a RESTART would wait for, with the
        # writers held up behind it: skipped until the read is done.
        if wal_pages >= restart_pages and _RESTARTS.acquire(blocking=False):
            try:
                _restart(conn, wal)
            finally:
                _RESTARTS.release()
    return int(wal_pages), int(copied)


# Held by a WAL checkpoint's RESTART, and by a long read for as long as it runs.
_RESTARTS = threading.Lock()


@contextmanager
def long_read() -> Iterator[None]:
    """Around a read that holds a SQLite WAL snapshot for seconds (a rank snapshot at a
    million players): no checkpoint RESTARTs meanwhile, so the writers never wait for
    it. A RESTART under way finishes first (a few milliseconds)."""
    with _RESTARTS:
        yield


def _restart(conn: Connection, wal: Path | None) -> None:
    """Catch up with PASSIVE rounds until one is quick, then RESTART the WAL."""
    for _ in range(CATCH_UP_ROUNDS):
        started = time.perf_counter()
        _flush(wal)
        conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)").one()
        if time.perf_counter() - started < CAUGHT_UP_S:
            break
    conn.exec_driver_sql(f"PRAGMA busy_timeout={RESTART_WAIT_MS:d}")
    try:
        conn.exec_driver_sql("PRAGMA wal_checkpoint(RESTART)").one()
    finally:
        conn.exec_driver_sql(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS:d}")


def _wal_file(engine: Engine) -> Path | None:
    database = engine.url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database).expanduser().resolve().with_name(Path(database).name + "-wal")


def sync_wal(engine: Engine) -> None:
    """fsync a SQLite database's WAL: every commit made before the call is then on disk
    (what `synchronous=FULL` does inside each COMMIT). Nothing for other databases."""
    if is_sqlite(engine):
        _flush(_wal_file(engine))


def _flush(wal: Path | None) -> None:
    """fsync the WAL through a descriptor of our own (SQLite locks the -shm file and the
    database, never the WAL, so closing this one cannot drop a lock of SQLite's)."""
    if wal is None:
        return
    try:
        descriptor = os.open(wal, os.O_RDONLY)
    except FileNotFoundError:  # no WAL yet, or the last connection removed it
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


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


def head_revision() -> str:
    """The schema revision this release's migrations end at (what `upgrade` reaches)."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory(str(MIGRATIONS_DIR)).get_current_head()
    assert head is not None  # the package ships its migrations
    return str(head)


def schema_mismatch(revision: str | None) -> str | None:
    """What is wrong with a database at `revision` for this release, or None when it is
    at this release's head."""
    head = head_revision()
    if revision == head:
        return None
    if revision is None:
        return "the database has no schema yet; run `usermgmt migrate` first"
    from alembic.script import ScriptDirectory

    known = {script.revision for script in ScriptDirectory(str(MIGRATIONS_DIR)).walk_revisions()}
    if revision in known:
        return (
            f"the database is at schema revision {revision} and this release needs {head}; "
            "run `usermgmt migrate` first"
        )
    return (
        f"the database is at schema revision {revision}, which this release does not know "
        f"(its newest is {head}): a newer release migrated it; run that release"
    )


def current_revision(url: str) -> str | None:
    """The revision the database is at, or None when it was never migrated (also a
    SQLite file that does not exist, which is left so)."""
    from alembic.runtime.migration import MigrationContext

    path = sqlite_path(url)
    if path is not None and not path.exists():
        return None
    engine = make_engine(url, existing_only=True)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()
