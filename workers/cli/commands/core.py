"""`usermgmt migrate` and `usermgmt worker`."""

from __future__ import annotations

import argparse

from usermgmt.persistence.db import current_revision, upgrade
from usermgmt.workers.cli.commands.base import (
    CommandFailed,
    Subparsers,
    add_database_option,
    seconds,
    settings_from,
)
from usermgmt.workers.runtime.bootstrap import bootstrap, default_consumer_name
from usermgmt.workers.runtime.connections import DATABASE_ERRORS, database_unreachable, safe_url
from usermgmt.workers.runtime.consumer_name import NameTaken
from usermgmt.workers.runtime.metrics import NO_METRICS, MetricsUnavailable, serve_metrics
from usermgmt.workers.runtime.runner import NotMigrated, Worker


def register(subparsers: Subparsers) -> None:
    migrate = subparsers.add_parser(
        "migrate",
        help="upgrade the database schema to the latest version",
        description="Upgrade the database to the latest schema (Alembic head). Creates the "
        "SQLite file if it is missing; running it again changes nothing.",
    )
    add_database_option(migrate)
    migrate.set_defaults(func=cmd_migrate)

    worker = subparsers.add_parser(
        "worker",
        help="run the event and auth consumers until SIGTERM/SIGINT",
        description="Consume the game-event streams (group usermgmt-events) and the auth "
        "request stream (group usermgmt-auth). The first SIGTERM/SIGINT finishes and acks "
        "the batch in hand and exits 0; a second one exits at once.",
    )
    worker.add_argument(
        "--only", choices=["events", "auth"], help="run only one consumer (default: both)"
    )
    worker.add_argument(
        "--consumer",
        metavar="NAME",
        help="consumer name in the groups (default: <host>-<pid>-<random>); "
        "reuse a name after a crash to finish its pending entries first "
        "(a live worker's name is refused)",
    )
    worker.add_argument(
        "--burst", action="store_true", help="process the event streams until drained, then exit"
    )
    worker.add_argument(
        "--drain-timeout",
        type=seconds(0, 86_400, zero=False),
        default=30.0,
        metavar="S",
        help="seconds to finish the batch in hand after a signal (default 30)",
    )
    worker.add_argument(
        "--metrics-port",
        type=port_number,
        metavar="N",
        help="serve Prometheus metrics on http://0.0.0.0:N/metrics (default: off)",
    )
    add_database_option(worker)
    worker.set_defaults(func=cmd_worker, owns_signals=True)  # see early_signals


def cmd_migrate(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    try:
        before = current_revision(settings.database_url)
        upgrade(settings.database_url)
        after = current_revision(settings.database_url)
    except DATABASE_ERRORS as exc:
        raise CommandFailed(database_unreachable(settings.database_url, exc)) from None
    where = safe_url(settings.database_url)
    if before == after:
        print(f"database {where} is already at the latest schema ({after})")
    else:
        print(f"database {where} upgraded from {before or 'empty'} to {after}")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    try:
        metrics = serve_metrics(args.metrics_port) if args.metrics_port else NO_METRICS
    except MetricsUnavailable as exc:
        raise CommandFailed(str(exc)) from None
    services = bootstrap(settings, background_checkpoints=True)  # Worker runs them
    try:
        worker = Worker(
            services,
            args.consumer or default_consumer_name(),
            only=args.only,
            burst=args.burst,
            drain_timeout=args.drain_timeout,
            metrics=metrics,
        )
        return worker.run()
    except (NotMigrated, NameTaken) as exc:
        raise CommandFailed(str(exc)) from None
    finally:
        services.close()


def port_number(value: str) -> int:
    """An argparse type: a TCP port, 1-65535."""
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {value!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 1-65535, got {port}")
    return port
