"""The hot path's SQLite timestamps are the text SQLAlchemy's own DATETIME writes."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import DateTime
from sqlalchemy.dialects import postgresql, sqlite

from usermgmt.persistence.sql import _datetime_processors, sqlite_time

SQLITE = sqlite.dialect()
SQLALCHEMYS = DateTime(timezone=True).dialect_impl(SQLITE).bind_processor(SQLITE)


@given(st.datetimes(), st.booleans())
def test_sqlite_time_is_sqlalchemys_text(moment: datetime, aware: bool) -> None:
    value = moment.replace(tzinfo=UTC) if aware else moment
    assert SQLALCHEMYS is not None
    assert sqlite_time(value) == SQLALCHEMYS(value)


def test_the_driver_formats_sqlite_times_itself_and_leaves_postgresql_to_its_driver() -> None:
    assert _datetime_processors(SQLITE)[0] is sqlite_time
    assert sqlite_time(None) is None
    assert _datetime_processors(postgresql.psycopg.dialect())[0] is not sqlite_time
