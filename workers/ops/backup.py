"""Backups and restores of a SQLite database, and where a replay of one must start.

`backup` first notes, per event stream, the oldest entry the live worker has not
settled (its oldest pending entry, or the first one it has not been given), then
takes the snapshot. Every entry below that mark was acked before the snapshot began,
so its effect (or its dead letter) is in the snapshot: replaying a restored snapshot
from the marks misses nothing and re-decides nothing already decided.

`restore` puts a snapshot back, replays from its marks (the accounts stream from its
own checkpoint) up to the end of the streams, and rebuilds the Redis caches.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from redis import Redis
from redis.exceptions import ResponseError
from sqlalchemy import Engine

from usermgmt.domain.events import entry_id_key
from usermgmt.domain.payloads import text_of
from usermgmt.persistence.db import sqlite_path, upgrade
from usermgmt.persistence.keys import EVENTS_GROUP, Keys
from usermgmt.persistence.replay import clear_backup_marks, load_backup_marks, load_checkpoints
from usermgmt.persistence.snapshots import (
    SnapshotInfo,
    inspect_snapshot,
    restore_snapshot,
    take_snapshot,
)
from usermgmt.workers.ops.replay import ProgressCallback, Replayer, ReplaySummary, rebuild_caches
from usermgmt.workers.ops.trim import group_floors
from usermgmt.workers.runtime.bootstrap import Services
from usermgmt.workers.runtime.connections import REDIS_ERRORS
from usermgmt.workers.runtime.ranges import FIRST, EntryKey, format_id, successor

# Without backup marks (a copy made by other means, a PostgreSQL dump), replay starts
# this long before the oldest checkpoint: entries deferred and retried, or left
# pending by a consumer that died, are older than the checkpoint by about that much.
DEFAULT_LOOKBACK_S = 600.0

PG_BACKUP_HINT = (
    "backup copies SQLite databases only; for PostgreSQL take a dump with "
    "`pg_dump --format=custom --file PATH DBNAME` "
    '(see docs/operations.md, "Backups, retention and replay")'
)
PG_RESTORE_HINT = (
    "restore puts back SQLite snapshots only; for PostgreSQL restore the dump with "
    "`pg_restore --clean --if-exists --dbname DBNAME PATH`, then run "
    "`usermgmt replay --since-checkpoint --refresh-caches` "
    '(see docs/operations.md, "Backups, retention and replay")'
)


class NotSQLite(Exception):
    """The configured database is not a SQLite file."""


class WorkerAlive(Exception):
    """A worker's heartbeat is fresh: restoring under it would lose its writes."""


@dataclass(frozen=True)
class BackupReport:
    snapshot: SnapshotInfo
    marks_note: str | None  # why no marks were recorded, if none were
    elapsed_s: float


@dataclass
class RestoreReport:
    snapshot: SnapshotInfo
    starts: dict[str, EntryKey]
    summary: ReplaySummary | None
    caches: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0


# -- backup -------------------------------------------------------------------------------


def backup(services: Services, path: Path, force: bool = False) -> BackupReport:
    """Write a consistent snapshot of the SQLite database to `path` (a file or directory)."""
    started = time.perf_counter()
    source = sqlite_path(services.settings.database_url)
    if source is None:
        raise NotSQLite(PG_BACKUP_HINT)
    if not source.is_file():
        raise FileNotFoundError(f"the database file {source} does not exist")
    dest = _destination(path)
    if dest.resolve() == source:
        raise FileExistsError(f"{dest} is the database itself; choose another path")
    if dest.exists() and not force:
        raise FileExistsError(f"{dest} exists; pass --force to overwrite it")
    note: str | None = None
    try:
        marks = replay_marks(services.redis, services.keys)
    except REDIS_ERRORS as exc:
        marks = {}
        note = f"Redis unreachable ({exc}); a restore will start {DEFAULT_LOOKBACK_S:.0f} s early"
    info = take_snapshot(source, dest, marks, datetime.now(UTC))
    return BackupReport(info, note, time.perf_counter() - started)


def _destination(path: Path) -> Path:
    path = path.expanduser()
    if path.is_dir():
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        return path / f"usermgmt-{stamp}.db"
    # Never created: a mistyped directory would hide the backups where nobody looks.
    if not path.parent.is_dir():
        raise FileNotFoundError(
            f"cannot write the backup to {path}: the directory {path.parent} does not exist "
            "(create it first, or check the path)"
        )
    return path


def replay_marks(redis: Redis, keys: Keys) -> dict[str, str]:
    """Per event stream: the live group's oldest unsettled entry (pending or undelivered).

    Taken before the snapshot. A stream without the group has settled nothing: `0-0`.
    """
    marks: dict[str, str] = {}
    for stream in (keys.update_stream, keys.terminate_stream):
        floors = group_floors(redis, stream, only=EVENTS_GROUP) or []
        lowest = min((floor.key for floor in floors), default=FIRST)
        marks[stream] = format_id(lowest)
    return marks


# -- restore ------------------------------------------------------------------------------


def live_workers(redis: Redis, keys: Keys) -> list[str]:
    """Consumers whose heartbeat key is alive."""
    pattern = keys.heartbeat_prefix + "*"
    return sorted(
        text_of(key)[len(keys.heartbeat_prefix) :] for key in redis.scan_iter(match=pattern)
    )


def restore(
    services: Services,
    snapshot_path: Path,
    force: bool = False,
    replay: bool = True,
    start: EntryKey | None = None,
    progress: Callable[[dict[str, EntryKey]], ProgressCallback] | None = None,
    refresh_caches: bool = True,
) -> RestoreReport:
    """Put a snapshot back into the configured SQLite file, replay, rebuild the caches.

    `progress`, given the replay's starting points, returns the replay's progress callback.
    Without `refresh_caches` the Redis caches are left alone (`report.caches` is empty):
    the caller restores into a database the caches do not belong to.
    """
    started = time.perf_counter()
    target = sqlite_path(services.settings.database_url)
    if target is None:
        raise NotSQLite(PG_RESTORE_HINT)
    info = inspect_snapshot(snapshot_path.expanduser())
    if info.path.resolve() == target:
        raise FileExistsError(f"{info.path} is the database itself; nothing to restore")
    alive = live_workers(services.redis, services.keys)
    if alive and not force:
        raise WorkerAlive(
            f"worker(s) still running: {', '.join(alive)}; stop every worker first "
            "(or pass --force if those heartbeats are stale)"
        )
    services.engine.dispose()  # nothing of ours holds the file while it is replaced
    restore_snapshot(info.path, target)
    upgrade(services.settings.database_url)  # an older snapshot gets the current schema
    report = RestoreReport(snapshot=info, starts={}, summary=None)
    if replay:
        report.starts = (
            dict.fromkeys(_streams(services.keys), start)
            if start is not None
            else checkpoint_starts(services.engine, services.keys)
        )
        report.warnings = trimmed_past(services.redis, services.keys, services.engine)
        report.summary = Replayer(
            services.redis,
            services.keys,
            services.engine,
            batch_size=services.settings.batch_size,
            limits=services.settings.limits(),
            progress=progress(report.starts) if progress is not None else None,
        ).run(report.starts)
    clear_backup_marks(services.engine)
    if refresh_caches:
        report.caches = rebuild_caches(services.engine, services.redis, services.keys)
    report.elapsed_s = time.perf_counter() - started
    return report


def checkpoint_starts(
    engine: Engine, keys: Keys, lookback_s: float = DEFAULT_LOOKBACK_S
) -> dict[str, EntryKey]:
    """Where a replay onto this database must start, per stream.

    Accounts: right after the checkpoint (every entry up to it is a user the database
    holds). Event streams: the backup marks when the database is a restored snapshot;
    otherwise `lookback_s` before the checkpoint (or everything, without one).
    """
    checkpoints = load_checkpoints(engine)
    marks = load_backup_marks(engine)
    starts: dict[str, EntryKey] = {}
    accounts = checkpoints.get(keys.accounts_stream)
    starts[keys.accounts_stream] = successor(accounts) if accounts else FIRST
    for stream in (keys.update_stream, keys.terminate_stream):
        if stream in marks:
            starts[stream] = entry_id_key(marks[stream])
        elif stream in checkpoints:
            ms = entry_id_key(checkpoints[stream])[0] - int(lookback_s * 1000)
            starts[stream] = (max(0, ms), 0)
        else:
            starts[stream] = FIRST
    return starts


def trimmed_past(redis: Redis, keys: Keys, engine: Engine) -> list[str]:
    """Warnings for streams trimmed beyond the database's checkpoint (effects lost)."""
    checkpoints = load_checkpoints(engine)
    warnings = []
    for stream in _streams(keys):
        oldest: Any = redis.xrange(stream, count=1)
        if not oldest:
            continue
        first = entry_id_key(text_of(oldest[0][0]))
        checkpoint = checkpoints.get(stream)
        removed = _removed_entries(redis, stream)
        if checkpoint is None:
            if removed:
                warnings.append(
                    f"{stream}: {removed} entries were trimmed and the database has no "
                    "checkpoint for it; their effects cannot be replayed"
                )
        elif first > entry_id_key(checkpoint):
            warnings.append(
                f"{stream}: trimmed past the database's checkpoint {checkpoint} (oldest entry "
                f"is {format_id(first)}); entries published in between, if any, are lost"
            )
    return warnings


def _removed_entries(redis: Redis, stream: str) -> int:
    try:
        info: Any = redis.xinfo_stream(stream)
    except ResponseError:  # the stream is gone
        return 0
    added = info.get("entries-added")
    return max(0, int(added) - int(info["length"])) if added is not None else 0


def _streams(keys: Keys) -> tuple[str, str, str]:
    return keys.accounts_stream, keys.update_stream, keys.terminate_stream
