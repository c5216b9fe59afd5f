"""The hot statements run on the driver's cursor, but fail with SQLAlchemy's errors."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy.exc import IntegrityError, OperationalError

from usermgmt.persistence.db import IMMEDIATE, make_engine, upgrade
from usermgmt.persistence.sql import INSERT_GROUP, Driver, pipelined


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


@pytest.mark.parametrize("count", [0, 1, INSERT_GROUP - 1, INSERT_GROUP, 2 * INSERT_GROUP + 5])
def test_insert_writes_every_row_in_order(database_url: str, count: int) -> None:
    """Whole groups go as multi-row statements, the rest row by row: every row lands
    once, in the order given (ids ascend with it)."""
    engine = make_engine(database_url)
    rows = [(n // 4 + 1, n + 1, "win" if n % 3 else "loss", n * 7) for n in range(count)]
    try:
        with engine.connect() as conn, conn.begin():
            db = Driver(conn)
            db.insert("INSERT INTO game_results (session_pk, user_id, outcome, earnings)", rows)
            stored = db.rows(
                "SELECT session_pk, user_id, outcome, earnings FROM game_results ORDER BY id"
            )
            conn.rollback()
    finally:
        engine.dispose()
    assert [tuple(row) for row in stored] == rows


def test_a_duplicate_in_a_grouped_insert_is_an_integrity_error(database_url: str) -> None:
    engine = make_engine(database_url)
    at = datetime.now(UTC)
    rows = [(f"e{n}", "update", f"{n}-0", at, None) for n in range(INSERT_GROUP)]
    rows[-1] = ("e0", *rows[-1][1:])
    try:
        with engine.connect() as conn, conn.begin():
            db = Driver(conn)
            rows = [(*row[:3], db.time(row[3]), row[4]) for row in rows]
            with pytest.raises(IntegrityError):
                db.insert(
                    "INSERT INTO processed_events "
                    "(event_id, stream, entry_id, processed_at, touched)",
                    rows,
                )
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


PLAYERS_BY_ID = (
    "EXPLAIN SELECT u.id, s.win_count, l.rank FROM users u "
    "JOIN stats s ON s.user_id = u.id JOIN leaderboard l ON l.stats_id = s.id "
    "WHERE u.id = ANY(%s::bigint[]) ORDER BY u.id FOR UPDATE"
)


def test_postgresql_looks_a_live_batchs_players_up_by_index(postgres_url: str) -> None:
    """A live batch names tens of players: joined to `stats` and `leaderboard` by 50
    index lookups, not by reading both tables whole (what the server's default
    `random_page_cost` of 4 chooses at 10,000 players, 3x slower in memory)."""
    upgrade(postgres_url)
    engine = make_engine(postgres_url)
    ids = list(range(1, 10_001, 200))
    try:
        with engine.connect() as conn:
            raw = conn.connection.driver_connection
            assert raw is not None
            with raw.cursor() as cur:
                cur.execute(
                    "INSERT INTO users (id, username, username_key, password_hash, wallet, "
                    "created_at) SELECT n, 'p' || n, 'p' || n, 'x', 0, now() "
                    "FROM generate_series(1, 10000) n"
                )
                cur.execute(
                    "INSERT INTO stats SELECT n, n, 0, 0, 0 FROM generate_series(1, 10000) n"
                )
                cur.execute(
                    "INSERT INTO leaderboard SELECT n, n, 1, 0 FROM generate_series(1, 10000) n"
                )
                cur.execute("ANALYZE users, stats, leaderboard")
                cur.execute(PLAYERS_BY_ID, (ids,))
                worker_plan = "\n".join(row[0] for row in cur.fetchall())
                cur.execute("SET LOCAL random_page_cost = 4")  # the server's default
                cur.execute(PLAYERS_BY_ID, (ids,))
                default_plan = "\n".join(row[0] for row in cur.fetchall())
            conn.rollback()
    finally:
        engine.dispose()
    assert "Seq Scan" in default_plan, "the tables are big enough to tell the costs apart"
    assert "Seq Scan" not in worker_plan, worker_plan


def test_postgresql_keeps_a_lower_random_page_cost(postgres_url: str) -> None:
    engine = make_engine(postgres_url, connect_args={"options": "-c random_page_cost=1"})
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SHOW random_page_cost").scalar() == "1"
    finally:
        engine.dispose()
    engine = make_engine(postgres_url)
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SHOW random_page_cost").scalar() == "1.1"
    finally:
        engine.dispose()


def test_postgresql_commits_are_durable_before_they_return(postgres_url: str) -> None:
    """The worker acks right after a commit: `synchronous_commit=off` (a role's or the
    server's setting) is raised to `on` on its connections; a stronger level is kept."""
    for configured, expected in (("off", "on"), ("remote_apply", "remote_apply")):
        engine = make_engine(
            postgres_url, connect_args={"options": f"-c synchronous_commit={configured}"}
        )
        try:
            with engine.connect() as conn:
                assert conn.exec_driver_sql("SHOW synchronous_commit").scalar() == expected
        finally:
            engine.dispose()


def test_a_pipelined_write_applies_and_its_failure_is_sqlalchemys(database_url: str) -> None:
    """`pipelined`: the statements inside take effect (on PostgreSQL sent without
    waiting for each result); one that fails is raised as SQLAlchemy's error, on
    leaving at the latest, and the transaction rolls back as after any error."""
    engine = make_engine(database_url)
    insert = (
        "INSERT INTO processed_events (event_id, stream, entry_id, processed_at) "
        "VALUES (?, ?, ?, ?)"
    )
    count = "SELECT count(*) FROM processed_events"
    try:
        with engine.connect() as conn:
            with conn.begin():
                db = Driver(conn)
                at = db.time(datetime.now(UTC))
                with pipelined(conn):
                    db.many(insert, [("e1", "update", "1-0", at), ("e2", "update", "2-0", at)])
                    db.run(insert, ("e3", "terminate", "3-0", at))
            assert conn.exec_driver_sql(count).scalar() == 3
            conn.rollback()
            with pytest.raises(IntegrityError), conn.begin():
                db = Driver(conn)
                with pipelined(conn):
                    db.run(insert, ("e4", "update", "4-0", at))
                    db.run(insert, ("e1", "update", "5-0", at))  # a duplicate id
                    db.run(insert, ("e5", "update", "6-0", at))
            assert conn.exec_driver_sql(count).scalar() == 3
    finally:
        engine.dispose()
