"""Connections to Redis and the database, and the one-line messages when they fail."""

from __future__ import annotations

from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy import Engine, text
from sqlalchemy.exc import InterfaceError, OperationalError

from usermgmt.persistence.db import make_engine, normalize_url

REDIS_ERRORS = (RedisConnectionError, RedisTimeoutError, ConnectionError, OSError)
# Transient: the database is away, locked or restarting. Other errors are not retried blindly.
DATABASE_ERRORS = (OperationalError, InterfaceError)


def make_redis(url: str) -> Redis:
    """A thread-safe client (bytes replies) that fails fast enough to notice an outage."""
    return Redis.from_url(
        url,
        socket_connect_timeout=5,
        socket_timeout=30,
        socket_keepalive=True,
        health_check_interval=30,
        retry_on_timeout=False,
    )


def safe_url(url: str) -> str:
    """A URL fit for a log line: the password replaced by ***."""
    try:
        return normalize_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.rsplit("@", maxsplit=1)[-1]


def redis_unreachable(url: str, exc: BaseException) -> str:
    """`cannot reach Redis at … (…); start it or set USERMGMT_REDIS_URL`."""
    return (
        f"cannot reach Redis at {safe_url(url)} ({_reason(exc)}); "
        "start it or set USERMGMT_REDIS_URL"
    )


def database_unreachable(url: str, exc: BaseException) -> str:
    """`cannot use the database at … (…); check it or set USERMGMT_DATABASE_URL`."""
    return (
        f"cannot use the database at {safe_url(url)} ({_reason(exc)}); "
        "check it is running and migrated, or set USERMGMT_DATABASE_URL"
    )


def _reason(exc: BaseException) -> str:
    original = getattr(exc, "orig", None) or exc
    text_ = str(original).strip().splitlines()[0] if str(original).strip() else type(exc).__name__
    return text_[:200]


def check_database(engine: Engine) -> None:
    """Open a connection and run `SELECT 1`; raises the driver's error when it cannot."""
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))


__all__ = [
    "DATABASE_ERRORS",
    "REDIS_ERRORS",
    "check_database",
    "database_unreachable",
    "make_engine",
    "make_redis",
    "redis_unreachable",
    "safe_url",
]
