"""Shared fixtures: backends (SQLite / PostgreSQL x real Redis / fakeredis), services.

- The real Redis is `USERMGMT_TEST_REDIS_URL` (default redis://127.0.0.1:6379/0); each
  test gets its own key prefix and its keys are deleted afterwards.
- PostgreSQL is `USERMGMT_TEST_POSTGRES_URL` (default the machine's `test` database);
  each test gets its own schema. Set `USERMGMT_TEST_POSTGRES=off` to leave the
  PostgreSQL variants out of the run (they are deselected and reported, not skipped).
- The Redis Cluster variant (`sqlite-cluster`) runs on a local cluster of three masters
  and three replicas started from `redis-server` for the session (`tests/cluster.py`).
  `USERMGMT_TEST_CLUSTER=off` deselects it the same way.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote

import fakeredis
import pytest
import sqlalchemy as sa
import structlog
from redis import Redis
from redis.cluster import RedisCluster
from structlog.testing import capture_logs

from usermgmt.persistence.db import make_engine, upgrade
from usermgmt.persistence.keys import Keys
from usermgmt.workers.runtime.bootstrap import Services
from usermgmt.workers.runtime.settings import Settings

pytest_plugins = ["tests.cluster"]  # the `redis_cluster` fixture

REDIS_URL = os.environ.get("USERMGMT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_URL = os.environ.get(
    "USERMGMT_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
POSTGRES_ON = os.environ.get("USERMGMT_TEST_POSTGRES", "on") != "off"
CLUSTER_ON = os.environ.get("USERMGMT_TEST_CLUSTER", "on") != "off"

BACKENDS = [
    "sqlite-redis",
    "sqlite-fakeredis",
    *(["postgres-redis"] if POSTGRES_ON else []),
    *(["sqlite-cluster"] if CLUSTER_ON else []),
]


def pytest_report_header() -> list[str]:
    postgres = POSTGRES_URL if POSTGRES_ON else "off (USERMGMT_TEST_POSTGRES=off)"
    return [f"usermgmt: redis {REDIS_URL}; postgres {postgres}"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """With USERMGMT_TEST_POSTGRES=off, deselect (not skip) every test that needs PostgreSQL."""
    if POSTGRES_ON:
        return
    needs = [item for item in items if "postgres_url" in getattr(item, "fixturenames", ())]
    if needs:
        config.hook.pytest_deselected(items=needs)
        items[:] = [item for item in items if item not in needs]


@dataclass
class Backend:
    """One combination of database and Redis for a test."""

    name: str
    database_url: str
    redis: Redis
    redis_url: str
    prefix: str

    @property
    def real_redis(self) -> bool:
        return not isinstance(self.redis, fakeredis.FakeRedis)

    @property
    def cluster(self) -> bool:
        return isinstance(self.redis, RedisCluster)

    @property
    def keys(self) -> Keys:
        return Keys(self.prefix)


def _real_redis() -> Redis:
    client = Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except Exception as exc:  # the suite needs the real Redis: fail, never skip
        pytest.fail(f"real Redis at {REDIS_URL} is not answering ({exc}); start redis-server")
    return client


def _delete_prefix(client: Redis, prefix: str) -> None:
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    for start in range(0, len(keys), 500):
        client.delete(*keys[start : start + 500])


@pytest.fixture
def prefix() -> str:
    """A key prefix no other test uses."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'usermgmt.db'}"


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh schema in the PostgreSQL test database, dropped afterwards."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(POSTGRES_URL)
    try:
        with admin.begin() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    except Exception as exc:
        pytest.fail(
            f"PostgreSQL at {POSTGRES_URL} is not usable ({exc}); "
            "start it or set USERMGMT_TEST_POSTGRES=off"
        )
    separator = "&" if "?" in POSTGRES_URL else "?"
    yield f"{POSTGRES_URL}{separator}options={quote(f'-csearch_path={schema}')}"
    with admin.begin() as conn:
        conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, prefix: str, tmp_path: Path) -> Iterator[Backend]:
    """Every integration test runs once per backend: the same test, never two copies."""
    name: str = request.param
    if name.startswith("postgres"):
        database_url = request.getfixturevalue("postgres_url")
    else:
        database_url = f"sqlite:///{tmp_path / 'usermgmt.db'}"
    if name.endswith("fakeredis"):
        client: Redis = fakeredis.FakeRedis(server=fakeredis.FakeServer(version=(7,)))
        redis_url = "redis://fakeredis"
    elif name.endswith("cluster"):
        redis_url = request.getfixturevalue("redis_cluster").url
        client = cast(Redis, RedisCluster.from_url(redis_url))  # the same commands
    else:
        client = _real_redis()
        redis_url = REDIS_URL
    upgrade(database_url)
    yield Backend(name, database_url, client, redis_url, prefix)
    if not name.endswith("fakeredis"):
        _delete_prefix(client, prefix)
    client.close()


def make_settings(backend: Backend, **overrides: object) -> Settings:
    """Test settings: cheap bcrypt, short retry delays, the backend's URLs and prefix."""
    values: dict[str, object] = {
        "database_url": backend.database_url,
        "redis_url": backend.redis_url if backend.real_redis else "redis://localhost:6379/0",
        "key_prefix": backend.prefix,
        "bcrypt_rounds": 4,
        "retry_delay_ms": 50,
        "claim_idle_ms": 1_000,
        # Tests drive several consumers by hand; the reader lease has tests of its own.
        "events_lease": False,
        "auth_concurrency": 2,
        "log_format": "json",
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture
def services(backend: Backend) -> Iterator[Services]:
    """Services wired to the backend (the fake or real Redis client itself)."""
    built = Services(
        settings=make_settings(backend),
        redis=backend.redis,
        engine=make_engine(backend.database_url),
        keys=backend.keys,
    )
    yield built
    built.engine.dispose()


@contextmanager
def all_logs() -> Iterator[list[MutableMapping[str, Any]]]:
    """Every log entry from debug up, whatever level an earlier test configured the
    loggers with. Loggers cache their level on first use: bind the one under test
    anew inside (`structlog.get_logger(...).bind(...)`)."""
    config = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))
    try:
        with capture_logs() as logs:
            yield logs
    finally:
        structlog.configure(**config)
