"""Connections to Redis and the database, and the one-line messages when they fail."""

from __future__ import annotations

from typing import Any, Literal, cast

from redis import Redis
from redis.cluster import RedisCluster
from redis.exceptions import (
    AuthenticationError,
    BusyLoadingError,
    NoPermissionError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisClusterException,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy import Engine, text
from sqlalchemy.exc import InterfaceError, InternalError, OperationalError

from usermgmt.persistence.command_batch import RedisUnavailable
from usermgmt.persistence.db import make_engine, normalize_url, sqlite_path

# Redis away, or answering that it cannot serve writes for now (loading after a restart,
# at its memory limit, a cluster between masters): wait it out with backoff.
REDIS_ERRORS = (
    RedisConnectionError,
    RedisTimeoutError,
    OutOfMemoryError,
    ReadOnlyError,  # a replica: during a failover, until one is promoted
    ConnectionError,
    OSError,
)
# Transient: the database is away, locked, restarting, or refusing writes for now (a
# read-only PostgreSQL: a standby after a failover, a provider's disk-full read-only
# mode, `default_transaction_read_only`; psycopg raises that, SQLSTATE 25006, as an
# InternalError, as it does the server's other "invalid transaction state" errors).
# Other errors are not retried blindly: a batch failing with one is applied entry by
# entry, and an entry that keeps failing is dead-lettered.
DATABASE_ERRORS = (OperationalError, InterfaceError, InternalError)

ClusterMode = Literal["auto", "on", "off"]

# SQLSTATEs of a transaction that lost a race with another one (PostgreSQL).
_CONFLICTS = {"40P01": "deadlock", "40001": "serialization", "55P03": "lock_timeout"}


_CLIENT_OPTIONS: dict[str, Any] = {
    "socket_connect_timeout": 5,
    "socket_timeout": 30,
    "socket_keepalive": True,
    "health_check_interval": 30,
    "retry_on_timeout": False,
}


def make_redis(url: str, cluster: ClusterMode = "auto") -> Redis:
    """A thread-safe client (bytes replies) that fails fast enough to notice an outage.

    `cluster`: "on" makes a Redis Cluster client (the URL names any node), "off" a
    single-server one; "auto" asks the server (`INFO cluster`) and makes the right one.
    When nothing answers, "auto" makes a single-server client, which reports the outage
    on first use. The cluster client offers the same commands: it is typed as `Redis`.
    """
    options = dict(_CLIENT_OPTIONS)
    if url.lower().startswith("unix:"):
        del options["socket_keepalive"]  # a TCP option; a Unix socket's connection refuses it
    single = Redis.from_url(url, **options)
    if cluster == "off" or (cluster == "auto" and not _is_cluster(single)):
        return single
    single.close()
    try:
        client = RedisCluster.from_url(url, **_CLIENT_OPTIONS)
    except RedisClusterException as exc:  # no node answered: an outage, said as one
        raise RedisConnectionError(str(exc)) from None
    return cast(Redis, client)


def _is_cluster(client: Redis) -> bool:
    """`INFO cluster`; a user whose ACL denies INFO (`usermgmt acl`'s roles do: it is
    flagged dangerous) asks `CLUSTER SLOTS`, which every role may run."""
    try:
        try:
            info = client.info("cluster")
        except NoPermissionError:
            client.execute_command("CLUSTER SLOTS")  # type: ignore[no-untyped-call]
            return True
    except REDIS_ERRORS:
        return False
    except ResponseError as exc:  # "This instance has cluster support disabled"
        if isinstance(exc, NoPermissionError) or "cluster support disabled" not in str(exc):
            raise
        return False
    return bool(info.get("cluster_enabled"))


def safe_url(url: str) -> str:
    """A URL fit for a log line: the password replaced by ***."""
    try:
        return normalize_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.rsplit("@", maxsplit=1)[-1]


def redis_unreachable(url: str, exc: BaseException) -> str:
    """`cannot reach Redis at … (…); start it or set USERMGMT_REDIS_URL`; or, when it
    answers but cannot serve for now (loading after a restart, at its memory limit),
    `Redis at … cannot serve writes now (…); waiting for it`."""
    if isinstance(exc, BusyLoadingError | OutOfMemoryError | ReadOnlyError | RedisUnavailable):
        return f"Redis at {safe_url(url)} cannot serve writes now ({_reason(exc)}); waiting for it"
    if isinstance(exc, AuthenticationError):  # it answers: starting it is not the fix
        return (
            f"Redis at {safe_url(url)} refused the credentials ({_reason(exc)}); "
            "check the user and password in USERMGMT_REDIS_URL"
        )
    return (
        f"cannot reach Redis at {safe_url(url)} ({_reason(exc)}); "
        "start it or set USERMGMT_REDIS_URL"
    )


def redis_refused(url: str, exc: BaseException) -> str:
    """One line for an error reply from Redis; a missing ACL permission says which one
    (Redis names the command, key or channel) and what user the commands need."""
    if isinstance(exc, NoPermissionError) or str(exc).startswith("NOPERM"):
        return (
            f"Redis at {safe_url(url)} refused a command for lack of permission "
            f"({_reason(exc)}); operator commands need a user with the worker role's rules "
            "(`usermgmt acl`): set USERMGMT_REDIS_URL to one"
        )
    return f"Redis at {safe_url(url)} answered with an error: {_reason(exc)}"


def database_unreachable(url: str, exc: BaseException) -> str:
    """`cannot use the database at … (…); check it or set USERMGMT_DATABASE_URL`."""
    path = sqlite_path(url)
    if path is not None and not path.exists():
        return (
            f"there is no database at {path}; run `usermgmt migrate` to create it, "
            "or set USERMGMT_DATABASE_URL"
        )
    return (
        f"cannot use the database at {safe_url(url)} ({_reason(exc)}); "
        "check it is running and migrated, or set USERMGMT_DATABASE_URL"
    )


def _reason(exc: BaseException) -> str:
    original = getattr(exc, "orig", None) or exc
    text_ = str(original).strip().splitlines()[0] if str(original).strip() else type(exc).__name__
    return text_[:200]


def conflict_of(exc: BaseException) -> str | None:
    """`deadlock`, `serialization`, `lock_timeout` or `locked` (SQLite) when the error
    is another transaction's doing, not an outage: the batch is simply tried again."""
    original = getattr(exc, "orig", None)
    state = getattr(original, "sqlstate", None)
    if state in _CONFLICTS:
        return _CONFLICTS[state]
    if state is None and "database is locked" in str(original or exc):
        return "locked"
    return None


def check_database(engine: Engine) -> None:
    """Open a connection and run `SELECT 1`; raises the driver's error when it cannot."""
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))


__all__ = [
    "DATABASE_ERRORS",
    "REDIS_ERRORS",
    "ClusterMode",
    "check_database",
    "conflict_of",
    "database_unreachable",
    "make_engine",
    "make_redis",
    "redis_refused",
    "redis_unreachable",
    "safe_url",
]
