"""What every command shares: errors with exit codes, settings and services from flags."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeAlias

from usermgmt.workers.runtime.bootstrap import Services, bootstrap
from usermgmt.workers.runtime.connections import (
    DATABASE_ERRORS,
    REDIS_ERRORS,
    check_database,
    database_unreachable,
    redis_unreachable,
)
from usermgmt.workers.runtime.logs import configure_logging
from usermgmt.workers.runtime.settings import Settings, load_settings

# A string: `_SubParsersAction` is generic to type checkers only, not at run time.
Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


class UsageError(Exception):
    """A command was called with arguments it cannot use (exit code 2)."""


class CommandFailed(Exception):
    """A command could not do its job; the message is one line for a person (exit code 1)."""


def add_database_option(
    parser: argparse.ArgumentParser,
    help_text: str = "SQLAlchemy URL (default: USERMGMT_DATABASE_URL)",
) -> None:
    parser.add_argument("--database", metavar="URL", help=help_text)


def settings_from(args: argparse.Namespace) -> Settings:
    """Settings from the environment, with a `--database` flag taking precedence."""
    overrides: dict[str, object] = {}
    if getattr(args, "database", None):
        overrides["database_url"] = args.database
    settings = load_settings(**overrides)
    configure_logging(settings.log_format, settings.log_level)
    return settings


@contextmanager
def connected(settings: Settings, redis: bool = True, database: bool = True) -> Iterator[Services]:
    """Services for a one-shot command, checked up front so failures read as one line."""
    services = bootstrap(settings)
    try:
        if redis:
            try:
                services.redis.ping()
            except REDIS_ERRORS as exc:
                raise CommandFailed(redis_unreachable(settings.redis_url, exc)) from None
        if database:
            try:
                check_database(services.engine)
            except DATABASE_ERRORS as exc:
                raise CommandFailed(database_unreachable(settings.database_url, exc)) from None
        yield services
    except REDIS_ERRORS as exc:
        raise CommandFailed(redis_unreachable(settings.redis_url, exc)) from None
    except DATABASE_ERRORS as exc:
        raise CommandFailed(database_unreachable(settings.database_url, exc)) from None
    finally:
        services.close()


def seconds(low: float, high: float, zero: bool = True) -> Callable[[str], float]:
    """An argparse type: a finite number of seconds from `low` (itself only with
    `zero`) to `high`."""

    def parse(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number of seconds: {value!r}") from None
        above = number >= low if zero else number > low
        if not (math.isfinite(number) and above and number <= high):
            bound = ">=" if zero else ">"
            raise argparse.ArgumentTypeError(
                f"must be seconds, {bound} {low:g} and <= {high:,.0f}, got {value}"
            )
        return number

    return parse


def count(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: a whole number from `low` to `high` (a bound keeps a typo such
    as an extra zero run from reaching SQL, where it overflows a 64-bit integer)."""

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {value!r}") from None
        if not low <= number <= high:
            raise argparse.ArgumentTypeError(f"must be {low:,} to {high:,}, got {value}")
        return number

    return parse
