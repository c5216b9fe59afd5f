"""The hot statements run on the driver's cursor, but fail with SQLAlchemy's errors."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy.exc import IntegrityError, OperationalError

from usermgmt.persistence.db import IMMEDIATE, make_engine, upgrade
from usermgmt.persistence.sql import Driver


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest) -> str:
    url: str = request.getfixturevalue(f"{request.param}_url")
    upgrade(url)
    return url


def test_a_constraint_violation_is_sqlalchemys_integrity_error(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        with engine.connect() as conn, conn.begin():
            db = Driver(conn)
            insert = (
                "INSERT INTO processed_events (event_id, stream, entry_id, processed_at) "
                "VALUES (?, ?, ?, ?)"
            )
            row = ("e1", "update", "1-0", db.time(datetime.now(UTC)))
            db.many(insert, [row])
            with pytest.raises(IntegrityError) as caught:
                db.many(insert, [row])
            assert "[SQL: INSERT INTO processed_events" in str(caught.value)
            assert "1-0" not in str(caught.value)  # no parameters in the message
    finally:
        engine.dispose()


def test_a_locked_sqlite_database_is_an_operational_error(sqlite_url: str) -> None:
    """What the event consumer takes for "the database is away": it pauses the batch."""
    upgrade(sqlite_url)
    engine = make_engine(sqlite_url)
    try:
        with engine.connect() as holder, holder.execution_options(**{IMMEDIATE: True}).begin():
            holder.exec_driver_sql("DELETE FROM stream_checkpoints")  # holds the write lock
            with engine.connect() as conn:
                conn.exec_driver_sql("PRAGMA busy_timeout=0")
                with pytest.raises(OperationalError, match="locked"):
                    Driver(conn).run("DELETE FROM processed_events")
    finally:
        engine.dispose()


def test_postgresql_plans_each_lookup_for_its_own_rows(postgres_url: str) -> None:
    """psycopg prepares a statement after five runs; the server must still plan it for
    each call's array (a generic plan made while a table was empty kept a sequential
    scan as the table grew). `pg_prepared_statements` counts the plans of each kind."""
    upgrade(postgres_url)
    engine = make_engine(postgres_url)
    lookup = "SELECT event_id FROM processed_events WHERE "
    try:
        with engine.connect() as conn:
            db = Driver(conn)
            for run in range(12):
                ids = [f"00000000-0000-4000-8000-{n:012d}" for n in range(run + 1)]
                for where, params in db.member_of("event_id", ids, "text"):
                    assert db.rows(lookup + where, params) == []
            plans = conn.exec_driver_sql(
                "SELECT generic_plans, custom_plans FROM pg_prepared_statements "
                "WHERE starts_with(statement, 'SELECT event_id FROM processed_events')"
            ).all()
            conn.rollback()
    finally:
        engine.dispose()
    assert len(plans) == 1, "psycopg prepared the lookup"
    generic, custom = plans[0]
    assert generic == 0
    assert custom >= 7  # every run since it was prepared
