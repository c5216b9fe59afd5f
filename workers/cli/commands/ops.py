"""`usermgmt status`, `usermgmt health` and `usermgmt acl`: seeing the system at a glance."""

from __future__ import annotations

import argparse
import socket
import sys

import orjson
from redis.connection import parse_url
from rich.console import Console
from rich.table import Table

from usermgmt.persistence.keys import Keys
from usermgmt.workers.cli.commands.base import Subparsers, connected, settings_from
from usermgmt.workers.ops import acl, status
from usermgmt.workers.runtime import redis_info


def register(subparsers: Subparsers) -> None:
    status_ = subparsers.add_parser(
        "status",
        help="show streams, groups, consumers, dead letters and the database checkpoint",
        description="Per stream and consumer group: length, first and last entry id, lag "
        "(entries not yet delivered), pending (delivered, not acked) and each consumer's "
        "pending count and idle time; dead letters by reason; the last entry id the "
        "database has applied per stream; live workers. Exit 1 when the database cannot "
        "be read (the Redis part is still shown).",
    )
    status_.add_argument("--json", action="store_true", help="print one JSON object")
    status_.set_defaults(func=cmd_status)

    health = subparsers.add_parser(
        "health",
        help="exit 0 while a worker's heartbeat is alive, 1 otherwise",
        description="Check the workers' heartbeat keys (<prefix>:worker:heartbeat:<consumer>, "
        "refreshed every 5 s, expiring after 15 s). Prints one line; exit 0 when at least "
        "one worker is alive, 1 when none is or Redis cannot be reached. Fit for a container "
        "healthcheck.",
    )
    health.add_argument(
        "--this-host",
        action="store_true",
        help="count only workers running on this host (a container checks its own worker)",
    )
    health.set_defaults(func=cmd_health)

    acl_ = subparsers.add_parser(
        "acl",
        help="print Redis ACL rules for the matchmaking, game-server, auth-client and worker roles",
        description="Print one `ACL SETUSER` line per role, for the keys under the configured "
        "prefix (Redis 7.0+). The lines reset the user: afterwards give each one a password "
        "and switch it on (ACL SETUSER <user> on ><password>). Roles: matchmaking (XADD to "
        "the update stream, read user and session hashes), game-server (XADD to the "
        "terminate stream), auth-client (XADD auth requests, BLPOP/LPOP reply keys), worker "
        "(every key under the prefix, no dangerous or admin command).",
    )
    acl_.add_argument("--json", action="store_true", help="print the roles as JSON")
    acl_.add_argument(
        "--user-prefix",
        metavar="TEXT",
        help="prefix of the ACL user names (default: '<key prefix>-', e.g. um-matchmaking)",
    )
    acl_.set_defaults(func=cmd_acl)


def make_console() -> Console:
    """Console for tables: no markup (data may hold brackets), wide when piped."""
    return Console(
        markup=False, highlight=False, width=None if sys.stdout.isatty() else 160, soft_wrap=False
    )


def cmd_status(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    with connected(settings, database=False) as services:
        report = status.collect(
            services.redis, services.engine, services.keys, settings.database_url
        )
    if args.json:
        sys.stdout.write(orjson.dumps(report.to_json(), option=orjson.OPT_INDENT_2).decode())
        sys.stdout.write("\n")
    else:
        print_status(make_console(), report)
    return 1 if report.database_error else 0


def print_status(console: Console, report: status.Status) -> None:
    """The status as tables: streams with their groups, consumers, then one-line summaries."""
    console.print(f"usermgmt status: prefix {report.prefix!r}, database {report.database}")
    streams = Table(title="streams", title_justify="left")
    for column in ("stream", "length", "first id", "last id", "db checkpoint"):
        streams.add_column(column, no_wrap=True)
    for column in ("group", "lag", "pending", "consumers"):
        streams.add_column(column, no_wrap=True)
    consumers = Table(title="consumers", title_justify="left")
    for column in ("stream", "group", "consumer", "pending", "idle"):
        consumers.add_column(column, no_wrap=True)
    for stream in report.streams:
        row = [
            stream.name,
            str(stream.length) if stream.exists else "(none)",
            stream.first_id or "-",
            stream.last_id or "-",
            stream.checkpoint or "-",
        ]
        if not stream.groups:
            streams.add_row(*row, "-", "-", "-", "-")
        for index, group in enumerate(stream.groups):
            lag = "?" if group.lag is None else f"{group.lag}{'+' if group.lag_capped else ''}"
            cells = row if index == 0 else ["", "", "", "", ""]
            streams.add_row(*cells, group.name, lag, str(group.pending), str(len(group.consumers)))
            for consumer in group.consumers:
                consumers.add_row(
                    stream.name,
                    group.name,
                    consumer.name,
                    str(consumer.pending),
                    format_idle(consumer.idle_ms),
                )
    console.print(streams)
    if consumers.row_count:
        console.print(consumers)
    reasons = ", ".join(f"{reason} {count}" for reason, count in report.dlq_by_reason.items())
    console.print(f"dead letters: {report.dlq_length}" + (f" ({reasons})" if reasons else ""))
    if report.workers:
        alive = ", ".join(
            f"{w.consumer} ({w.only}{', standing by' if w.standing_by else ''}, "
            f"beat {w.seconds_since_beat} s ago{lag_text(w)}"
            f"{conflicts_text(w)})"
            for w in report.workers
        )
        console.print(f"workers alive: {len(report.workers)}: {alive}")
    else:
        console.print("workers alive: none")
    if report.waiting is not None:
        console.print(waiting_line(report.waiting))
    if report.database_error:
        console.print(f"database checkpoint: unavailable: {report.database_error}")
    if report.redis_evicts:
        console.print(f"warning: {redis_info.eviction_warning(report.redis_evicts)}")
    for key, ahead in report.ids_ahead.items():
        console.print(f"warning: {status.ahead_warning(key, ahead)}", markup=False)


def waiting_line(waiting: status.WaitingInfo) -> str:
    """`waiting events: 2 (oldest 12.5 s: terminate 17...-0, waits for ...)`."""
    line = f"waiting events: {waiting.entries}"
    if waiting.oldest_entry_id is not None:
        line += (
            f" (oldest {waiting.oldest_age_s} s: {waiting.oldest_stream} "
            f"{waiting.oldest_entry_id}, waits for {waiting.oldest_waits_for})"
        )
    return line


def format_idle(idle_ms: int) -> str:
    """`850 ms`, `12.5 s`, `3 min`, `2.0 h`."""
    if idle_ms < 1_000:
        return f"{idle_ms} ms"
    seconds = idle_ms / 1000
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7_200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def cmd_health(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    keys = Keys(settings.key_prefix)
    with connected(settings, database=False) as services:
        workers = redis_info.alive_workers(services.redis, keys)
    where = ""
    if args.this_host:
        host = socket.gethostname()
        workers = [w for w in workers if w.host == host]
        where = f" on host {host}"
    if not workers:
        print(
            f"unhealthy: no worker heartbeat{where} under {keys.heartbeat_prefix}* "
            "(is `usermgmt worker` running?)"
        )
        return 1
    names = ", ".join(w.consumer for w in workers)
    print(f"ok: {len(workers)} worker(s) alive{where}: {names}")
    return 0


def cmd_acl(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    database = int(parse_url(settings.redis_url).get("db") or 0)  # type: ignore[no-untyped-call]
    roles = acl.roles(Keys(settings.key_prefix), args.user_prefix, database)
    if args.json:
        data = [
            {
                "role": role.role,
                "user": role.user,
                "purpose": role.purpose,
                "rules": list(role.rules),
                "command": role.setuser(),
            }
            for role in roles
        ]
        sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    for role in roles:
        print(role.setuser())
    print(
        "# the users are off and have no password until you run, for each: "
        "ACL SETUSER <user> on ><password>",
        file=sys.stderr,
    )
    return 0


def conflicts_text(worker: redis_info.WorkerInfo) -> str:
    """Batches the worker retried because another worker's transaction won, if any."""
    if not worker.conflicts:
        return ""
    kinds = ", ".join(f"{count:,} {kind}" for kind, count in sorted(worker.conflicts.items()))
    return f"; batches retried after conflicts: {kinds}"


def lag_text(worker: redis_info.WorkerInfo) -> str:
    """The worker's event lag over the last minute, when it applied anything."""
    lag = worker.event_lag
    if not lag or not lag.get("count"):
        return ""
    return (
        f"; event lag over the last minute: p50 {lag['p50_ms']:g} ms, p99 {lag['p99_ms']:g} ms, "
        f"max {lag['max_ms']:g} ms ({int(lag['count']):,} entries)"
    )
