"""One typed settings object for every `USERMGMT_*` variable (docs/protocol.md, "Settings")."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from redis.connection import parse_url
from sqlalchemy.exc import ArgumentError

from usermgmt.domain.waiting import Limits
from usermgmt.persistence.db import normalize_url
from usermgmt.workers.runtime.connections import ClusterMode, safe_url

ENV_PREFIX = "USERMGMT_"


class ConfigError(Exception):
    """A setting that cannot be used: the message is one line naming the variable."""


class Settings(BaseSettings):
    """Runtime configuration, read once at start and passed in."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_file=".env", extra="ignore", frozen=True
    )

    redis_url: str = "redis://localhost:6379/0"
    redis_cluster: ClusterMode = "auto"  # auto: asked at connect time
    database_url: str = "sqlite:///usermgmt.db"
    key_prefix: str = Field("um", pattern=r"^[A-Za-z0-9_.\-]{1,32}$")
    bcrypt_rounds: int = Field(12, ge=4, le=31)
    user_cache_ttl: int = Field(300, ge=1)
    max_deliveries: int = Field(5, ge=1)
    max_wait_s: float = Field(60.0, gt=0)
    session_timeout_s: float = Field(21_600.0, ge=0)  # 0: live sessions never expire
    claim_idle_ms: int = Field(30_000, ge=100)
    starting_wallet: int = Field(0, ge=0)
    log_format: Literal["json", "console"] | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    rank_refresh_s: float = Field(30.0, gt=0)
    batch_size: int = Field(5_000, ge=1, le=10_000)
    # One event worker reads new entries at a time, the others stand by (`events.lease`).
    events_lease: bool = True
    auth_concurrency: int = Field(default_factory=lambda: max(2, os.cpu_count() or 2), ge=1)
    # The bcrypt threads' CPU priority: `idle` (Linux SCHED_IDLE), or a nice value.
    auth_nice: Literal["idle"] | int = "idle"
    retry_delay_ms: int = Field(1_000, ge=10)
    consumer_idle_remove_s: float = Field(3_600.0, gt=0)
    # Event streams keep entries this long (never an unapplied one); replay and restore
    # need them: keep more than the time between two backups.
    stream_retention_s: float = Field(7 * 24 * 3_600.0, ge=0)
    trim_interval_s: float = Field(60.0, ge=0)  # 0: the worker never trims

    def limits(self) -> Limits:
        """How long game events may wait, for the planner (in entry-id milliseconds)."""
        return Limits(
            max_wait_ms=round(self.max_wait_s * 1000),
            session_timeout_ms=round(self.session_timeout_s * 1000),
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
            parse_url(value)  # type: ignore[no-untyped-call]
        except ValueError as exc:
            raise ValueError(f"not a Redis URL ({exc})") from None
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
        return value


def load_settings(**overrides: object) -> Settings:
    """Read the settings, turning the first invalid one into a one-line `ConfigError`."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        field = str(error["loc"][0]) if error["loc"] else "?"
        variable = ENV_PREFIX + field.upper()
        given = overrides[field] if field in overrides else os.environ.get(variable)
        shown = _shown(field, given)
        value = f"={shown!r}" if shown is not None else ""
        message = str(error["msg"]).removeprefix("Value error, ")
        raise ConfigError(f"invalid setting {variable}{value}: {message}") from None


def _shown(field: str, given: object) -> str | None:
    """The offending value for the error line; a URL loses its password first."""
    if given is None or "password" in field:
        return None
    text = str(given)
    return safe_url(text) if field.endswith("_url") else text
