"""The hot statements' way to SQL: the driver's own cursor, `?` markers, plain tuples.

Used where statements run per event batch or per request (`games`, `waiting`,
`world_cache`, `accounts`); migrations, status and recovery bookkeeping stay on
SQLAlchemy Core, where a statement's cost does not matter.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import cache
from typing import Any

from sqlalchemy import Connection, DateTime, Dialect
from sqlalchemy.exc import DBAPIError, StatementError

# SQLite allows 32766 bound parameters per statement; stay well below.
CHUNK = 900
INSERT_GROUP = 64  # rows per multi-row INSERT statement (`Driver.insert`)


def chunks(values: Sequence[Any], size: int = CHUNK) -> Iterable[Sequence[Any]]:
    """`values` in slices of at most `size`: one statement's worth of bound parameters."""
    for start in range(0, len(values), size):
        yield values[start : start + size]


def marks(count: int) -> str:
    """`?, ?, ...`: only markers are ever formatted into these statements, never values."""
    return ", ".join("?" * count)


def as_utc(moment: datetime) -> datetime:
    """SQLite hands timestamps back without their zone; they were written in UTC."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


class Driver:
    """The hot statements on the driver's own cursor (execute|executemany), plain tuples.

    SQLAlchemy Core's per-row parameter processing cost more than the statements
    themselves on this path (about 20 µs per entry), and each `exec_driver_sql` about
    40 µs more than the cursor's own call (a small batch runs some 20 statements).
    The engine, the dialect and the transaction stay SQLAlchemy's: the cursor is the
    transaction's own connection's, and a driver error is raised as SQLAlchemy's
    (`OperationalError`, `IntegrityError`, ...) so callers tell them apart as before.
    Statements are written with `?` markers and get the dialect's own (`%s` on
    PostgreSQL); timestamps go through the dialect's DateTime processors, so rows read
    the same as rows the ORM writes.
    """

    def __init__(self, conn: Connection) -> None:
        self.dialect = conn.dialect
        self.qmark = conn.dialect.paramstyle == "qmark"
        self.cursor = conn.connection.cursor()
        self.to_db, self.from_db = _datetime_processors(conn.dialect)
        self.last_time: tuple[datetime | None, Any] = (None, None)

    def sql(self, statement: str) -> str:
        return statement if self.qmark else statement.replace("?", "%s")

    def rows(self, statement: str, params: Sequence[Any] = ()) -> Sequence[Any]:
        self._call(False, statement, tuple(params))
        return self.cursor.fetchall()

    def run(self, statement: str, params: Sequence[Any] = ()) -> None:
        self._call(False, statement, tuple(params))

    def many(self, statement: str, rows: list[tuple[Any, ...]]) -> None:
        if rows:
            self._call(True, statement, rows)

    def insert(self, head: str, rows: list[tuple[Any, ...]]) -> None:
        """`head` (`INSERT INTO t (a, b)`) with `rows`: whole groups of `INSERT_GROUP` rows
        as one multi-row `VALUES` statement each, the rest by `executemany`.

        SQLite runs a statement once per row under `executemany`; one multi-row statement
        binds the same values for about half of that per row. The group size is fixed so
        the statement's text is too, and its prepared form stays in the driver's cache.
        """
        if not rows:
            return
        row_marks = f"({marks(len(rows[0]))})"
        whole = len(rows) - len(rows) % INSERT_GROUP
        if whole:
            grouped = f"{head} VALUES {', '.join([row_marks] * INSERT_GROUP)}"
            self._call(
                True,
                grouped,
                [
                    tuple(value for row in rows[start : start + INSERT_GROUP] for value in row)
                    for start in range(0, whole, INSERT_GROUP)
                ],
            )
        if whole < len(rows):
            self._call(True, f"{head} VALUES {row_marks}", rows[whole:])

    def member_of(
        self, column: str, values: Sequence[Any], pg_type: str
    ) -> Iterator[tuple[str, Sequence[Any]]]:
        """`column IN (values)` as conditions with their parameters, for one query each.

        PostgreSQL: one `column = ANY(?::pg_type[])`, whatever the count, so the
        statement's text never changes: psycopg prepares it once, and neither the
        server plans it nor the driver parses it again (an `IN` list of another length
        is another statement, planned and parsed anew). SQLite: chunks of `?` marks.
        """
        if not values:
            return
        if self.dialect.name == "postgresql":
            yield f"{column} = ANY(?::{pg_type}[])", (list(values),)
            return
        for chunk in chunks(values):
            yield f"{column} IN ({marks(len(chunk))})", chunk

    def unnest(self, statement: str, rows: Sequence[Sequence[Any]], *first: Any) -> None:
        """One PostgreSQL statement for all `rows`: its parameters are `first`, then one
        array per column (`unnest(?::type[], ...)` in the statement, in column order)."""
        if rows:
            self.run(statement, (*first, *(list(column) for column in zip(*rows, strict=True))))

    def _call(self, many: bool, statement: str, params: Any) -> None:
        sql = self.sql(statement)
        try:
            if many:
                self.cursor.executemany(sql, params)
            else:
                self.cursor.execute(sql, params)
        except self.dialect.loaded_dbapi.Error as exc:
            raise _sqlalchemy_error(self.dialect, sql, exc, many) from exc

    def time(self, value: datetime | None) -> Any:
        """A timestamp as the dialect stores it; nearly all of a batch's are its `now`."""
        if value is None:
            return None
        last, converted = self.last_time
        if value is not last:
            converted = self.to_db(value)
            self.last_time = (value, converted)
        return converted

    def read_time(self, value: Any) -> datetime:
        """A stored timestamp as an aware UTC datetime (the reverse of `time`)."""
        return as_utc(self.from_db(value))


@contextmanager
def pipelined(conn: Connection) -> Iterator[None]:
    """On PostgreSQL, the statements run inside go to the server without waiting for
    each one's result (psycopg's pipeline mode); elsewhere, nothing changes.

    A read inside still waits for its rows (and for everything sent before it). A
    statement that fails is reported when the pipeline next waits, at a read or on
    leaving: raised as SQLAlchemy's error, like `Driver`'s, and the transaction is
    then rolled back as after any failed statement.
    """
    if conn.dialect.name != "postgresql":
        yield
        return
    driver = conn.connection.driver_connection
    assert driver is not None  # a live connection
    try:
        with driver.pipeline():
            yield
    except conn.dialect.loaded_dbapi.Error as exc:
        raise _sqlalchemy_error(conn.dialect, "(a statement of a pipeline)", exc) from exc


def _sqlalchemy_error(
    dialect: Dialect, statement: str, exc: Exception, many: bool = False
) -> StatementError:
    """A driver's error as SQLAlchemy raises it (`IntegrityError`, ...), without values."""
    return DBAPIError.instance(
        statement,
        None,
        exc,
        dialect.loaded_dbapi.Error,
        hide_parameters=True,
        dialect=dialect,
        ismulti=many,
    )


def _same(value: Any) -> Any:
    return value


# SQLAlchemy's SQLite DATETIME text, as its bind processor formats it from a mapping.
_SQLITE_STORAGE = (
    "%(year)04d-%(month)02d-%(day)02d %(hour)02d:%(minute)02d:%(second)02d.%(microsecond)06d"
)


def sqlite_time(value: datetime | None) -> str | None:
    """A timestamp as SQLAlchemy's SQLite DATETIME stores it, formatted from a tuple:
    half the time of its processor, which builds a dict per value (a batch formats
    about one per entry)."""
    if value is None:
        return None
    return "%04d-%02d-%02d %02d:%02d:%02d.%06d" % (  # noqa: UP031 - the fastest way here
        value.year,
        value.month,
        value.day,
        value.hour,
        value.minute,
        value.second,
        value.microsecond,
    )


@cache
def _datetime_processors(dialect: Dialect) -> tuple[Callable[[Any], Any], Callable[[Any], Any]]:
    """(to the database, from the database) for a timezone-aware DateTime column."""
    column = DateTime(timezone=True).dialect_impl(dialect)  # SQLite's own processors
    to_db = column.bind_processor(dialect) or _same
    if getattr(column, "_storage_format", None) == _SQLITE_STORAGE:
        to_db = sqlite_time
    return to_db, column.result_processor(dialect, None) or _same
