"""`usermgmt replay`, `backup`, `restore` and `trim`: recovery by replay, and retention."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from usermgmt.persistence.db import current_revision, schema_mismatch, sqlite_path
from usermgmt.persistence.snapshots import SnapshotError, SnapshotInfo
from usermgmt.workers.cli.commands.base import (
    CommandFailed,
    Subparsers,
    UsageError,
    add_database_option,
    connected,
    seconds,
    settings_from,
)
from usermgmt.workers.ops.backup import (
    DEFAULT_LOOKBACK_S,
    NotSQLite,
    WorkerAlive,
    backup,
    checkpoint_starts,
    restore,
)
from usermgmt.workers.ops.replay import ProgressCallback, Replayer, ReplaySummary, rebuild_caches
from usermgmt.workers.ops.trim import TrimResult, trim_streams
from usermgmt.workers.runtime.bootstrap import Services
from usermgmt.workers.runtime.connections import DATABASE_ERRORS, database_unreachable, safe_url
from usermgmt.workers.runtime.ranges import FIRST, LAST, EntryKey, format_id, parse_id
from usermgmt.workers.runtime.settings import CENTURY_S, ConfigError, load_settings

PLAIN_PROGRESS_EVERY_S = 2.0


def register(subparsers: Subparsers) -> None:
    replay = subparsers.add_parser(
        "replay",
        help="apply the retained accounts, update and terminate entries to a database",
        description="Read the accounts, update and terminate streams with XRANGE (the "
        "consumer groups are not touched), merge them in entry-id order and apply them to "
        "the database idempotently: registrations recreate users under their ids, game "
        "events go through the worker's own rules. Entries in the dead-letter stream are "
        "skipped as the worker skipped them. Replaying into an empty migrated database "
        "rebuilds users, stats, wallets, results, sessions and the leaderboard; replaying "
        "twice changes nothing. Writes SQL only, unless --refresh-caches.",
    )
    replay.add_argument("--from", dest="start", metavar="ID", help="first entry id (default 0)")
    replay.add_argument("--to", dest="end", metavar="ID", help="last entry id (default: the end)")
    replay.add_argument(
        "--since-checkpoint",
        action="store_true",
        help="start where the database's checkpoints (and backup marks) say: after "
        "restoring a dump taken by other means, e.g. pg_dump",
    )
    replay.add_argument(
        "--lookback-s",
        type=seconds(0, 30 * 86_400),
        default=DEFAULT_LOOKBACK_S,
        metavar="S",
        help="with --since-checkpoint and no backup marks: start this long before the "
        f"checkpoint of each event stream (default {DEFAULT_LOOKBACK_S:.0f})",
    )
    replay.add_argument(
        "--refresh-caches",
        action="store_true",
        help="afterwards, rebuild the leaderboard sorted set and session hashes and drop "
        "cached user hashes under the configured prefix",
    )
    add_database_option(replay)
    replay.set_defaults(func=cmd_replay)

    backup_ = subparsers.add_parser(
        "backup",
        help="write a consistent snapshot of the SQLite database while the worker runs",
        description="Copy the SQLite database with SQLite's online backup API: a consistent "
        "snapshot as of one commit, taken while workers keep writing. The snapshot records "
        "where a replay must start after restoring it. PATH is a file, or a directory to "
        "write usermgmt-<UTC time>.db into; a missing directory is refused, not created. "
        "For PostgreSQL use pg_dump (exit 1 with a hint).",
    )
    backup_.add_argument("path", metavar="PATH", help="snapshot file or directory")
    backup_.add_argument("--force", action="store_true", help="overwrite an existing file")
    add_database_option(backup_)
    backup_.set_defaults(func=cmd_backup)

    restore_ = subparsers.add_parser(
        "restore",
        help="put a snapshot back into the SQLite database, replay the streams, rebuild caches",
        description="Replace the database in USERMGMT_DATABASE_URL's SQLite file with the "
        "snapshot, upgrade its schema, replay the streams from the snapshot's marks to their "
        "end (idempotently), and rebuild the Redis caches. Refused while a worker's heartbeat "
        "is alive: stop every worker first.",
    )
    restore_.add_argument("path", metavar="PATH", type=Path, help="snapshot file")
    restore_.add_argument(
        "--force", action="store_true", help="restore even though a worker heartbeat is alive"
    )
    restore_.add_argument(
        "--no-replay", action="store_true", help="only put the snapshot back (caches rebuilt)"
    )
    restore_.add_argument(
        "--from", dest="start", metavar="ID", help="replay every stream from this id instead"
    )
    add_database_option(
        restore_,
        help_text="restore into this SQLite file instead of USERMGMT_DATABASE_URL's; the Redis "
        "caches are then left alone (they belong to the configured database)",
    )
    restore_.set_defaults(func=cmd_restore)

    trim = subparsers.add_parser(
        "trim",
        help="trim the event streams to the retention, never past an unapplied entry",
        description="XTRIM MINID the accounts, update and terminate streams to now minus the "
        "retention, but never past the oldest pending entry of a consumer group, an entry "
        "not yet delivered, or the database's checkpoint. The worker does the same every "
        "USERMGMT_TRIM_INTERVAL_S seconds. Replay and restore need the entries kept: keep "
        "more than the time between two backups.",
    )
    trim.add_argument(
        "--retention-s",
        type=seconds(0, CENTURY_S),
        metavar="N",
        help="keep entries younger than N seconds (default USERMGMT_STREAM_RETENTION_S)",
    )
    trim.add_argument("--dry-run", action="store_true", help="show what would be removed")
    add_database_option(trim)
    trim.set_defaults(func=cmd_trim)


# -- replay -------------------------------------------------------------------------------


def cmd_replay(args: argparse.Namespace) -> int:
    start = _entry_id(args.start, "--from") if args.start else None
    end = _entry_id(args.end, "--to", end=True) if args.end else LAST
    if start is not None and start > end:
        raise UsageError(
            f"--from {args.start} comes after --to {args.end or 'the end'}: nothing to replay"
        )
    if start is not None and args.since_checkpoint:
        raise UsageError("--from and --since-checkpoint cannot be combined")
    settings = settings_from(args)
    _require_schema(settings.database_url)
    with connected(settings) as services:
        starts: dict[str, EntryKey] | EntryKey = start or FIRST
        if args.since_checkpoint:
            starts = checkpoint_starts(services.engine, services.keys, args.lookback_s)
        with replay_progress() as progress:
            summary = Replayer(
                services.redis,
                services.keys,
                services.engine,
                batch_size=settings.batch_size,
                limits=settings.limits(),
                progress=progress(services, starts, end),
            ).run(starts, end)
        caches = {}
        if args.refresh_caches:
            caches = rebuild_caches(services.engine, services.redis, services.keys)
    console = Console(highlight=False)
    console.print(replay_table(f"Replay into {safe_url(settings.database_url)}", summary))
    if caches:
        console.print(caches_line(caches))
    return 0


def _entry_id(text: str, option: str, end: bool = False) -> EntryKey:
    try:
        return parse_id(text, end=end)
    except ValueError as exc:
        raise UsageError(f"{option}: {exc}") from None


def _require_schema(database_url: str) -> None:
    try:
        revision = current_revision(database_url)
    except DATABASE_ERRORS as exc:
        raise CommandFailed(database_unreachable(database_url, exc)) from None
    path = sqlite_path(database_url)
    if revision is None and path is not None and not path.exists():
        raise CommandFailed(
            f"there is no database at {path}; run `usermgmt migrate` "
            "(with the same --database) to create it"
        )
    if revision is None:
        raise CommandFailed(
            f"the database at {safe_url(database_url)} has no schema; "
            "run `usermgmt migrate` (with the same --database) first"
        )
    problem = schema_mismatch(revision)
    if problem is not None:
        raise CommandFailed(problem)


def replay_table(title: str, summary: ReplaySummary) -> Table:
    """The closing summary: what was read, applied, skipped, and how long it took."""
    table = Table(title=title, box=box.SIMPLE_HEAVY, title_justify="left", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_column("detail")
    per_kind = ", ".join(f"{kind} {count:,}" for kind, count in sorted(summary.read.items()))
    table.add_row("entries read", f"{summary.total_read:,}", per_kind)
    table.add_row("applied", f"{summary.applied:,}", "")
    table.add_row("duplicates", f"{summary.duplicates:,}", "already in the database")
    table.add_row("dead-lettered", f"{summary.dead_lettered:,}", "skipped, as the worker did")
    reasons = ", ".join(f"{r} {n:,}" for r, n in sorted(summary.invalid.items()))
    table.add_row(
        "invalid", f"{summary.total_invalid:,}", f"skipped{': ' + reasons if reasons else ''}"
    )
    table.add_row(
        "still waiting", f"{summary.waiting:,}", "not applicable yet (left to the worker)"
    )
    if summary.first_id is not None:
        table.add_row("entry ids", "", f"{summary.first_id} .. {summary.last_id}")
    rate = summary.total_read / summary.elapsed_s if summary.elapsed_s > 0 else 0.0
    table.add_row("elapsed", f"{summary.elapsed_s:.2f} s", f"{rate:,.0f} entries/s")
    return table


def caches_line(caches: dict[str, int]) -> str:
    return "caches rebuilt: " + ", ".join(f"{label} {count:,}" for label, count in caches.items())


@contextmanager
def replay_progress() -> Iterator[
    Callable[[Services, dict[str, EntryKey] | EntryKey, EntryKey], ProgressCallback]
]:
    """A progress callback factory: a rich bar on a terminal, plain lines otherwise.

    Progress is the share of the replayed id range (stream time) covered so far.
    """
    out = sys.stderr
    progress = (
        Progress(
            TextColumn("replay"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[note]}"),
            TimeElapsedColumn(),
            console=Console(file=out),
        )
        if out.isatty()
        else None
    )

    def factory(
        services: Services, starts: dict[str, EntryKey] | EntryKey, end: EntryKey
    ) -> ProgressCallback:
        low, high = _id_range(services, starts, end)
        span = max(1, high - low)
        task = progress.add_task("replay", total=span, note="") if progress else None
        started = last_line = time.monotonic()

        def report(done: int, last_ms: int) -> None:
            nonlocal last_line
            covered = min(span, max(0, last_ms - low))
            note = f"{done:,} entries"
            if progress is not None and task is not None:
                progress.update(task, completed=covered, note=note)
                return
            now = time.monotonic()
            if now - last_line >= PLAIN_PROGRESS_EVERY_S:
                last_line = now
                print(
                    f"replay: {covered / span:.0%}, {note}, {now - started:.1f} s",
                    file=out,
                    flush=True,
                )

        return report

    if progress is None:
        yield factory
    else:
        with progress:
            yield factory


def _id_range(
    services: Services, starts: dict[str, EntryKey] | EntryKey, end: EntryKey
) -> tuple[int, int]:
    """Milliseconds of the first and last entry the replay will read (for the bar)."""
    keys = services.keys
    lows, highs = [], []
    for stream in (keys.accounts_stream, keys.update_stream, keys.terminate_stream):
        start = starts.get(stream, FIRST) if isinstance(starts, dict) else starts
        first: Any = services.redis.xrange(stream, min=format_id(start), max="+", count=1)
        last: Any = services.redis.xrevrange(stream, max=format_id(end), min="-", count=1)
        if first and last:
            lows.append(_ms(first[0][0]))
            highs.append(_ms(last[0][0]))
    return (min(lows), max(highs)) if lows else (0, 1)


def _ms(entry_id: bytes | str) -> int:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(text.partition("-")[0])


# -- backup and restore ----------------------------------------------------------------------


def cmd_backup(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    path = Path(args.path)
    if args.path.endswith(("/", os.sep)) and not path.expanduser().is_dir():
        # `Path` drops the slash: a missing `dir/` would be written as a file named dir.
        raise CommandFailed(f"cannot write the backup into {args.path}: no such directory")
    with connected(settings, redis=False) as services:
        try:
            report = backup(services, path, force=args.force)
        except NotSQLite as exc:
            raise CommandFailed(str(exc)) from None
        except (FileExistsError, FileNotFoundError, SnapshotError) as exc:
            raise CommandFailed(str(exc)) from None
        except OSError as exc:
            raise CommandFailed(f"cannot write the backup to {args.path} ({exc})") from None
    info = report.snapshot
    print(
        f"backup of {safe_url(settings.database_url)} written to {info.path} "
        f"({_size(info.size_bytes)}, schema {info.revision}, {report.elapsed_s:.2f} s)"
    )
    print(f"replay after restoring it starts at: {_marks_text(info)}")
    if report.marks_note:
        print(f"note: {report.marks_note}")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    start = _entry_id(args.start, "--from") if args.start else None
    settings = settings_from(args)
    configured = _configured_database_url(args)
    # The caches under the prefix mirror the configured database: rebuilding them from
    # another file would overwrite a live deployment's caches with that file's content.
    own_caches = configured is not None and sqlite_path(configured) == sqlite_path(
        settings.database_url
    )
    with connected(settings, database=False) as services, replay_progress() as progress:
        try:
            report = restore(
                services,
                args.path,
                force=args.force,
                replay=not args.no_replay,
                start=start,
                progress=lambda starts: progress(services, starts, LAST),
                refresh_caches=own_caches,
            )
        except (NotSQLite, WorkerAlive, SnapshotError, FileExistsError) as exc:
            raise CommandFailed(str(exc)) from None
        except OSError as exc:
            raise CommandFailed(
                f"cannot put the snapshot in place of {safe_url(settings.database_url)} ({exc})"
            ) from None
    console = Console(highlight=False)
    info = report.snapshot
    console.print(
        f"restored {info.path} ({_size(info.size_bytes)}, schema {info.revision}) into "
        f"{safe_url(settings.database_url)}"
    )
    for warning in report.warnings:
        console.print(f"warning: {warning}")
    if report.summary is not None:
        starts = ", ".join(
            f"{stream.rsplit(':', 1)[-1]} {format_id(key)}" for stream, key in report.starts.items()
        )
        console.print(replay_table(f"Replay from {starts}", report.summary))
    if own_caches:
        console.print(caches_line(report.caches))
    else:
        configured_text = safe_url(configured) if configured else "an invalid setting"
        console.print(
            f"caches not rebuilt: {safe_url(settings.database_url)} is not the configured "
            f"database (USERMGMT_DATABASE_URL is {configured_text}); the Redis caches under "
            f"prefix {settings.key_prefix!r} belong to that one"
        )
    console.print(f"done in {report.elapsed_s:.2f} s")
    return 0


def _configured_database_url(args: argparse.Namespace) -> str | None:
    """USERMGMT_DATABASE_URL (or its default), whatever `--database` says; None when
    that setting is invalid."""
    if not args.database:
        return settings_from(args).database_url
    try:
        return load_settings().database_url
    except ConfigError:
        return None


def _marks_text(info: SnapshotInfo) -> str:
    parts = [f"{stream.rsplit(':', 1)[-1]} {mark}" for stream, mark in sorted(info.marks.items())]
    accounts = [s for s in info.checkpoints if s.endswith(":accounts")]
    for stream in accounts:
        parts.append(f"accounts after {info.checkpoints[stream]}")
    return ", ".join(parts) if parts else "the beginning of the streams"


def _size(size: int) -> str:
    return f"{size / 1_048_576:.1f} MB" if size >= 1_048_576 else f"{size / 1024:.1f} kB"


# -- trim ---------------------------------------------------------------------------------


def cmd_trim(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    retention = settings.stream_retention_s if args.retention_s is None else args.retention_s
    with connected(settings) as services:
        results = trim_streams(services, retention, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    Console(highlight=False).print(
        trim_table(f"Trim to {retention:,.0f} s of retention ({verb})", results, verb)
    )
    return 0


def trim_table(title: str, results: list[TrimResult], verb: str) -> Table:
    table = Table(title=title, box=box.SIMPLE_HEAVY, title_justify="left")
    table.add_column("stream")
    table.add_column("length", justify="right")
    table.add_column(verb, justify="right")
    table.add_column("MINID")
    table.add_column("held by")
    for result in results:
        table.add_row(
            result.stream.rsplit(":", 1)[-1],
            f"{result.length:,}",
            f"{result.removed:,}",
            result.minid or "-",
            result.reason,
        )
    return table
