"""One typed settings object for every `USERMGMT_*` variable (docs/protocol.md, "Settings")."""

from __future__ import annotations

import codecs
import math
import os
import re
from collections.abc import Callable
from typing import Any, Literal, cast
from urllib.parse import unquote, urlsplit

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from redis.connection import URL_QUERY_ARGUMENT_PARSERS, Connection, parse_url
from redis.exceptions import RedisError
from sqlalchemy.exc import ArgumentError

from usermgmt.domain.games import BIGINT_MAX
from usermgmt.domain.waiting import Limits
from usermgmt.persistence.db import normalize_url
from usermgmt.workers.runtime.connections import ClusterMode, safe_url

ENV_PREFIX = "USERMGMT_"
DAY_S = 86_400
# Durations in entry-id time: compared with entry-id milliseconds in Python, and a test
# (or an operator) may use a huge value for "never": a century, about 3.2e12 ms, fits 64 bits.
CENTURY_S = 100 * 365 * DAY_S
MAX_AUTH_CONCURRENCY = 1_024
# Redis accepts at most 2**31 - 1 databases (`databases` is a C int): indexes 0 to 2**31 - 2.
MAX_REDIS_DB = 2**31 - 2
# The URL's numeric options (redis-py `URL_QUERY_ARGUMENT_PARSERS`): seconds, or counts.
MAX_URL_SECONDS = DAY_S
MAX_URL_INT = 2**31 - 1


class ConfigError(Exception):
    """A setting that cannot be used: the message is one line naming the variable."""


class Settings(BaseSettings):
    """Runtime configuration, read once at start and passed in."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_file=".env", extra="ignore", frozen=True, allow_inf_nan=False
    )

    redis_url: str = "redis://localhost:6379/0"
    redis_cluster: ClusterMode = "auto"  # auto: asked at connect time
    database_url: str = "sqlite:///usermgmt.db"
    key_prefix: str = Field("um", pattern=r"^[A-Za-z0-9_.\-]{1,32}$")
    bcrypt_rounds: int = Field(12, ge=4, le=31)
    # Every number has an upper bound that no deployment needs to reach, so it stays
    # within what its consumer can hold: Redis EX/PX and XAUTOCLAIM arguments, the
    # timeouts of `threading` waits, SQL BIGINT; floats must be finite (`allow_inf_nan`).
    user_cache_ttl: int = Field(300, ge=1, le=365 * DAY_S)
    max_deliveries: int = Field(5, ge=1, le=1_000_000)
    max_wait_s: float = Field(60.0, gt=0, le=CENTURY_S)
    session_timeout_s: float = Field(21_600.0, ge=0, le=CENTURY_S)  # 0: never expire
    claim_idle_ms: int = Field(30_000, ge=100, le=DAY_S * 1000)
    starting_wallet: int = Field(0, ge=0, le=BIGINT_MAX)  # `users.wallet` is a BIGINT
    log_format: Literal["json", "console"] | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    rank_refresh_s: float = Field(30.0, gt=0, le=DAY_S)
    batch_size: int = Field(5_000, ge=1, le=10_000)
    # One event worker reads new entries at a time, the others stand by (`events.lease`).
    events_lease: bool = True
    auth_concurrency: int = Field(
        default_factory=lambda: min(max(2, os.cpu_count() or 2), MAX_AUTH_CONCURRENCY),
        ge=1,
        le=MAX_AUTH_CONCURRENCY,
    )
    # The bcrypt threads' CPU priority: `idle` (Linux SCHED_IDLE), or a nice value.
    auth_nice: Literal["idle"] | int = "idle"
    retry_delay_ms: int = Field(1_000, ge=10, le=3_600 * 1000)
    consumer_idle_remove_s: float = Field(3_600.0, gt=0, le=365 * DAY_S)
    # Event streams keep entries this long (never an unapplied one); replay and restore
    # need them: keep more than the time between two backups.
    stream_retention_s: float = Field(7 * DAY_S, ge=0, le=CENTURY_S)
    trim_interval_s: float = Field(60.0, ge=0, le=7 * DAY_S)  # 0: the worker never trims

    def limits(self) -> Limits:
        """How long game events may wait, for the planner (in entry-id milliseconds)."""
        # At least 1 ms: a tiny positive timeout must not round to 0, which means "never".
        timeout_s = self.session_timeout_s
        return Limits(
            max_wait_ms=max(1, round(self.max_wait_s * 1000)),
            session_timeout_ms=max(1, round(timeout_s * 1000)) if timeout_s > 0 else 0,
        )

    @field_validator("auth_nice", mode="before")
    @classmethod
    def _auth_nice(cls, value: object) -> object:
        if value == "idle":
            return value
        try:
            nice = int(str(value))
        except ValueError:
            nice = -1
        if not 0 <= nice <= 19:
            raise ValueError("must be idle or a nice value from 0 to 19")
        return nice

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        try:
            options = parse_url(value)  # type: ignore[no-untyped-call]
        except ValueError as exc:
            raise ValueError(f"not a Redis URL ({exc})") from None
        _check_redis_options(value, options)
        return value

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str) -> str:
        try:
            url = normalize_url(value)
        except ArgumentError:
            raise ValueError("not a SQLAlchemy database URL") from None
        if not (url.drivername.startswith("sqlite") or url.drivername.startswith("postgresql")):
            raise ValueError(f"unsupported database {url.drivername!r}; use sqlite or postgresql")
        if url.drivername.startswith("sqlite") and (
            not url.database or ":memory:" in url.database or url.query.get("mode") == "memory"
        ):
            raise ValueError(
                "an in-memory SQLite database ends with its connection; give a file, "
                "e.g. sqlite:///usermgmt.db"
            )
        return value


def _check_redis_options(url: str, options: dict[str, object]) -> None:
    """What `parse_url` lets through but the connection cannot use: a database path that
    is not a number (redis-py silently uses 0), a database or count out of range, a
    timeout that is not a finite positive number of seconds."""
    parts = urlsplit(url)
    path = unquote(parts.path)
    if parts.scheme.lower() != "unix" and not re.fullmatch(r"/?[0-9]*", path):
        raise ValueError(f"database {path.lstrip('/')!r} is not a number from 0 to {MAX_REDIS_DB}")
    for name, parser in URL_QUERY_ARGUMENT_PARSERS.items():
        number = options.get(name)
        if parser is float and isinstance(number, float):
            if not (math.isfinite(number) and 0 < number <= MAX_URL_SECONDS):
                raise ValueError(f"{name} must be seconds, > 0 and <= {MAX_URL_SECONDS}")
        elif parser is int and isinstance(number, int):
            low = 1 if name in ("max_connections", "socket_read_size") else 0
            top = MAX_REDIS_DB if name == "db" else MAX_URL_INT
            if not low <= number <= top:
                raise ValueError(f"{name} must be from {low} to {top}")
    _check_connection_options(options)


def _check_connection_options(options: dict[str, object]) -> None:
    """Build (not open) the connection the URL describes: a query option redis-py does
    not know (`?sockettimeout=5`, a typo) is refused here, not in a traceback later.
    RESP3 (`protocol=3`) is refused too: the worker reads replies in RESP2's shapes."""
    given = dict(options)
    given.pop("max_connections", None)  # the pool's, not the connection's
    connection_class = given.pop("connection_class", Connection)
    try:
        cast(Any, connection_class)(**given)
    except TypeError as exc:
        unknown = re.search(r"keyword argument '([^']+)'", str(exc))
        raise ValueError(
            f"unknown option {unknown.group(1)!r} in the query" if unknown else str(exc)
        ) from None
    except RedisError as exc:
        raise ValueError(str(exc)) from None
    if given.get("protocol") not in (None, 2, "2"):
        raise ValueError("protocol must be 2 (RESP2), the replies the worker reads")
    _check_text_options(given)


# Query options a URL may give as text (the typed ones are `URL_QUERY_ARGUMENT_PARSERS`;
# host, port, db, path, username and password come from the URL itself). Any other
# connection argument redis-py accepts wants an object (`retry`, `credential_provider`),
# which a URL cannot give.
_TEXT_OPTIONS = {
    "client_name",
    "encoding",
    "encoding_errors",
    "lib_name",
    "lib_version",
    "ssl_keyfile",
    "ssl_certfile",
    "ssl_cert_reqs",
    "ssl_ca_certs",
    "ssl_ca_path",
    "ssl_ca_data",
    "ssl_password",
}
_FROM_THE_URL = {"host", "port", "db", "path", "username", "password"}


def _check_text_options(given: dict[str, object]) -> None:
    """Text options whose value the connection would only refuse later, in a traceback."""
    for name, value in given.items():
        if name in _FROM_THE_URL or name in URL_QUERY_ARGUMENT_PARSERS:
            continue
        if name not in _TEXT_OPTIONS:
            raise ValueError(f"option {name!r} cannot be set in the URL")
        text = str(value)
        if name == "encoding":
            _known(codecs.lookup, text, "encoding")
        elif name == "encoding_errors":
            _known(codecs.lookup_error, text, "encoding_errors handler")
        elif name == "client_name" and (not text or not text.isprintable() or " " in text):
            raise ValueError("client_name must be printable text without spaces")
        elif name == "ssl_cert_reqs" and text.lower() not in ("none", "optional", "required"):
            raise ValueError("ssl_cert_reqs must be none, optional or required")


def _known(lookup: Callable[[str], object], name: str, what: str) -> None:
    try:
        lookup(name)
    except LookupError:
        raise ValueError(f"unknown {what} {name!r}") from None


def load_settings(**overrides: object) -> Settings:
    """Read the settings, turning the first invalid one into a one-line `ConfigError`."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except UnicodeDecodeError as exc:  # only the .env file is read as bytes
        raise ConfigError(_not_utf8(exc, str(overrides.get("_env_file") or ".env"))) from None
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        field = str(error["loc"][0]) if error["loc"] else "?"
        variable = ENV_PREFIX + field.upper()
        given = overrides[field] if field in overrides else os.environ.get(variable)
        shown = _shown(field, given)
        value = f"={shown!r}" if shown is not None else ""
        message = str(error["msg"]).removeprefix("Value error, ")
        raise ConfigError(f"invalid setting {variable}{value}: {message}") from None


def _not_utf8(exc: UnicodeDecodeError, env_file: str) -> str:
    """`invalid setting X in .env: not UTF-8 …`, naming the line's variable if it has one."""
    line = bytes(exc.object[: exc.start]).count(b"\n") + 1
    text = bytes(exc.object).splitlines()[line - 1].decode("utf-8", "replace")
    name = text.split("=", 1)[0].strip().removeprefix("export ").strip()
    where = f"{name} in " if "=" in text and name else ""
    return (
        f"invalid setting {where}{os.path.abspath(env_file)} (line {line}): not UTF-8 text "
        f"(byte {exc.object[exc.start]:#x}); save the file as UTF-8"
    )


def missing_redis_database(exc: BaseException) -> ConfigError | None:
    """The one-line error when Redis has no database of the URL's number (only the server
    knows how many it has: it answers `DB index is out of range`); None for other errors."""
    if "DB index is out of range" not in str(exc):
        return None
    try:
        shown = f"={safe_url(Settings().redis_url)!r}"
    except (ValidationError, ValueError):
        shown = ""
    return ConfigError(
        f"invalid setting {ENV_PREFIX}REDIS_URL{shown}: the Redis server has no database "
        "of that number (DB index is out of range); use one below its `databases` setting"
    )


def _shown(field: str, given: object) -> str | None:
    """The offending value for the error line; a URL loses its password first."""
    if given is None or "password" in field:
        return None
    text = str(given)
    return safe_url(text) if field.endswith("_url") else text
