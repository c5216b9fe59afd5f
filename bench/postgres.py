"""PostgreSQL for the bench: a fresh schema per run in the server's `test` database,
migrated with the worker's own Alembic history and filled with the same population as
the SQLite template (`workload.build_population`), dropped afterwards.

A run's URL is the server URL with `options=-csearch_path=<schema>` (as the tests'
`postgres_url` fixture does) and an `application_name` naming the schema, so the
backends serving a run can be told apart (and ended, should one outlive its worker).
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import quote

import bcrypt
import psycopg
from psycopg import sql
from sqlalchemy import make_url

from bench.workload import CREATED_AT, PASSWORD, BenchFailure, username
from usermgmt.persistence.db import upgrade

DEFAULT_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
APP_PREFIX = "usermgmt-bench-"
DROP_LOCK_TIMEOUT = "20s"  # a DROP waiting longer ends the run's leftover backends first


def libpq(url: str) -> str:
    """A SQLAlchemy URL (`postgresql+psycopg://…`) as a libpq URI for psycopg."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def display_url(url: str) -> str:
    """`url` with its password hidden."""
    return make_url(url).render_as_string()


def connect(url: str, autocommit: bool = True) -> psycopg.Connection[Any]:
    try:
        return psycopg.connect(libpq(url), autocommit=autocommit, connect_timeout=10)
    except psycopg.Error as exc:
        raise BenchFailure(
            f"PostgreSQL at {display_url(url)} is not usable ({exc}); "
            "start it or pass --postgres-url / USERMGMT_BENCH_POSTGRES_URL"
        ) from None


def server_version(url: str) -> str:
    with connect(url) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    return str(row[0]) if row else "?"


def schema_url(admin_url: str, schema: str) -> str:
    """The URL of `schema` on the server of `admin_url` (its search path, our app name)."""
    separator = "&" if "?" in admin_url else "?"
    return (
        f"{admin_url}{separator}options={quote(f'-csearch_path={schema}')}"
        f"&application_name={APP_PREFIX}{schema}"
    )


@functools.cache
def password_hash(bcrypt_rounds: int) -> str:
    return bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(bcrypt_rounds)).decode()


def populate(url: str, players: int, bcrypt_rounds: int) -> None:
    """`players` users with their stats and leaderboard rows, as `build_population`
    inserts into SQLite (ids 1..n, one shared password hash), with COPY; the id
    sequences then continue after them, and the tables are vacuumed and analysed."""
    hashed = password_hash(bcrypt_rounds)
    with connect(url, autocommit=False) as conn:
        with conn.cursor() as cur:
            columns = "id, username, username_key, password_hash, wallet, created_at"
            with cur.copy(f"COPY users ({columns}) FROM STDIN") as copy:
                for i in range(1, players + 1):
                    name = username(i)
                    copy.write_row((i, name, name, hashed, 0, CREATED_AT))
            with cur.copy(
                "COPY stats (id, user_id, win_count, loss_count, earnings) FROM STDIN"
            ) as copy:
                for i in range(1, players + 1):
                    copy.write_row((i, i, 0, 0, 0))
            with cur.copy("COPY leaderboard (id, stats_id, rank, earnings) FROM STDIN") as copy:
                for i in range(1, players + 1):
                    copy.write_row((i, i, 1, 0))
            for table in ("users", "stats", "leaderboard"):
                cur.execute(
                    "SELECT setval(pg_get_serial_sequence(%s, 'id'), %s)", (table, max(players, 1))
                )
        conn.commit()
    with connect(url) as conn:
        conn.execute("VACUUM (ANALYZE) users, stats, leaderboard")


@contextmanager
def fresh_schema(
    admin_url: str, players: int, bcrypt_rounds: int, tag: str, run: str = "bench"
) -> Iterator[str]:
    """A new schema, migrated and populated; yields its URL, drops it afterwards.

    Its name starts with `run_` (a bench run's key prefix), so a later run can tell
    whose it was if this one is killed before the drop (`bench.leftovers`).
    """
    schema = f"{run}_{tag}_{uuid.uuid4().hex[:8]}".lower()[:48]
    with connect(admin_url) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    url = schema_url(admin_url, schema)
    try:
        upgrade(url)
        populate(url, players, bcrypt_rounds)
        yield url
    finally:
        drop_schema(admin_url, schema)


def drop_schema(admin_url: str, schema: str) -> None:
    """DROP SCHEMA … CASCADE; a backend of the run still holding a lock (its worker was
    killed mid-transaction) is ended first if the DROP has to wait for it."""
    drop = sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema))
    with connect(admin_url) as conn:
        conn.execute(sql.SQL("SET lock_timeout = {}").format(sql.Literal(DROP_LOCK_TIMEOUT)))
        try:
            conn.execute(drop)
        except psycopg.errors.LockNotAvailable:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = %s AND pid <> pg_backend_pid()",
                (f"{APP_PREFIX}{schema}",),
            )
            conn.execute(drop)


def schemas(admin_url: str) -> list[str]:
    """The names of the schemas in the database of `admin_url`."""
    with connect(admin_url) as conn:
        return [str(name) for (name,) in conn.execute("SELECT nspname FROM pg_namespace")]
