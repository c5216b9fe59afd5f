"""`usermgmt`: the command line. Exit codes: 0 success, 1 failure, 2 usage error."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from usermgmt.workers.runtime import early_signals

# The subcommands are imported by the functions below, after `early_signals.hold()`:
# loading them (SQLAlchemy, Alembic, pydantic, ...) takes a few hundred milliseconds.


def build_parser() -> argparse.ArgumentParser:
    """The parser with every subcommand registered by `usermgmt.workers.cli.commands`."""
    from usermgmt.workers.cli import commands

    parser = argparse.ArgumentParser(
        prog="usermgmt",
        description="User management backend for online game platforms: Redis Streams "
        "consumers that keep users, stats and the leaderboard in SQL. Settings come from "
        "USERMGMT_* environment variables (or a .env file).",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    commands.register_all(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `usermgmt` console script."""
    early_signals.hold()  # the worker takes them over; other commands get them back
    try:
        code = run(argv)
        sys.stdout.flush()  # here, not at exit, where a broken pipe is a traceback
        return code
    except BrokenPipeError:  # the reader went away (`usermgmt … | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    finally:
        early_signals.release(deliver=False)  # the program is ending anyway


def run(argv: Sequence[str] | None = None) -> int:
    """Parse `argv` and run its command, mapping failures to exit codes."""
    from redis.exceptions import ResponseError
    from sqlalchemy.exc import DatabaseError

    from usermgmt.workers.cli.commands.base import CommandFailed, UsageError
    from usermgmt.workers.runtime.connections import database_unreachable, redis_refused
    from usermgmt.workers.runtime.settings import ConfigError, missing_redis_database

    args = build_parser().parse_args(argv)
    try:
        if not getattr(args, "owns_signals", False):
            early_signals.release()
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"usermgmt: error: {exc}", file=sys.stderr)
        return 2
    except UsageError as exc:
        print(f"usermgmt: error: {exc}", file=sys.stderr)
        return 2
    except CommandFailed as exc:
        print(f"usermgmt: {exc}", file=sys.stderr)
        return 1
    except ResponseError as exc:  # an error reply, e.g. NOPERM from a user with fewer rights
        config_error = missing_redis_database(exc)  # a setting only the server can judge
        if config_error is not None:
            print(f"usermgmt: error: {config_error}", file=sys.stderr)
            return 2
        print(f"usermgmt: {redis_refused(_redis_url(), exc)}", file=sys.stderr)
        return 1
    except DatabaseError as exc:  # not an outage (those are caught nearer): a file that is
        # not a database, a schema not ours
        print(f"usermgmt: {database_unreachable(_database_url(args), exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("usermgmt: interrupted", file=sys.stderr)
        return 1


def _redis_url() -> str:
    """The Redis URL the command used (the settings were read before the failure)."""
    from usermgmt.workers.runtime.settings import load_settings

    try:
        return load_settings().redis_url
    except Exception:  # a fallback, as in `_database_url`
        return "USERMGMT_REDIS_URL"


def _database_url(args: argparse.Namespace) -> str:
    """The database URL the command used (`--database`, or the settings')."""
    from usermgmt.workers.cli.commands.base import settings_from

    try:
        return settings_from(args).database_url
    except Exception:  # the settings were read before the failure; this is a fallback
        return str(getattr(args, "database", None) or "USERMGMT_DATABASE_URL")


if __name__ == "__main__":
    sys.exit(main())
