"""The documented client API, `from usermgmt import Publisher, AuthClient`, stays light.

A game service imports it without the worker's database stack: no SQLAlchemy, Alembic,
bcrypt or psycopg. The import time is reported (`python -m bench.import_time` for a
median over several runs); nothing is asserted about it.
"""

from __future__ import annotations

import pytest

import usermgmt
from bench.import_time import probe


def test_the_client_api_loads_no_database_stack(record_property: pytest.RecordProperty) -> None:
    result = probe()
    record_property("client_import_ms", round(result.ms, 1))
    print(f"from usermgmt import Publisher, AuthClient: {result.ms:.1f} ms")
    assert result.heavy == [], f"importing the client API loaded {result.heavy}"


def test_the_package_exports_the_client_names() -> None:
    from usermgmt import AuthClient, AuthError, AuthTimeout, InvalidEvent, Publisher
    from usermgmt.workers.client import auth, publisher

    assert AuthClient is auth.AuthClient
    assert Publisher is publisher.Publisher
    assert issubclass(AuthTimeout, AuthError)
    assert issubclass(InvalidEvent, ValueError)
    assert set(usermgmt.__all__) <= set(dir(usermgmt))
    with pytest.raises(AttributeError):
        _ = usermgmt.NoSuchName  # type: ignore[attr-defined]
