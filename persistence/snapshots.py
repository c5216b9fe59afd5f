"""SQLite snapshots: a consistent online copy, and putting one back.

Both directions use SQLite's online backup API (one step, inside a read
transaction) into a new file beside the destination, checked, then renamed over it:
the copy is the database as of one commit while the worker keeps writing in WAL
mode, and a restore does not depend on what the file it replaces holds.
"""

from __future__ import annotations

import os
import sqlite3
import stat
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool

from usermgmt.persistence.replay import write_backup_marks

BUSY_TIMEOUT_S = 30.0


class SnapshotError(Exception):
    """A file that is not a usable usermgmt snapshot, or a copy that failed its check."""


@dataclass(frozen=True)
class SnapshotInfo:
    """What a snapshot holds: schema revision, checkpoints, backup marks, size."""

    path: Path
    size_bytes: int
    revision: str | None
    checkpoints: dict[str, str]
    marks: dict[str, str]


def take_snapshot(source: Path, dest: Path, marks: dict[str, str], now: datetime) -> SnapshotInfo:
    """Copy `source` to `dest` consistently (written aside, checked, then renamed).

    `marks` (per event stream, where a replay of this copy must start) go into the
    copy's `backup_marks` table.
    """
    partial = dest.with_name(dest.name + ".partial")
    partial.unlink(missing_ok=True)
    try:
        try:
            dst = sqlite3.connect(partial)
        except sqlite3.Error as exc:  # e.g. a directory where no file can be created
            raise SnapshotError(f"cannot write the backup to {dest} ({exc})") from None
        try:
            src = sqlite3.connect(source, timeout=BUSY_TIMEOUT_S)
            try:
                src.backup(dst)  # pages=-1: the whole database in one step, one snapshot
            finally:
                src.close()
        except sqlite3.Error as exc:  # e.g. a full disk, a locked or damaged source
            raise SnapshotError(f"copying {source} to {dest} failed ({exc})") from None
        finally:
            dst.close()
        _write_marks(partial, marks, now)
        _finalize(partial)
        os.replace(partial, dest)
    except BaseException:
        partial.unlink(missing_ok=True)  # a failed copy leaves nothing behind
        raise
    _fsync_dir(dest.parent)
    return inspect_snapshot(dest)


def _write_marks(path: Path, marks: dict[str, str], now: datetime) -> None:
    engine = create_engine(f"sqlite:///{path}", poolclass=NullPool)
    try:
        with engine.begin() as conn:
            write_backup_marks(conn, marks, now)
    finally:
        engine.dispose()


def _finalize(path: Path) -> None:
    """Check the copy and make it one self-contained file (rollback journal, not WAL)."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=DELETE")
        verdict = conn.execute("PRAGMA quick_check").fetchone()[0]
    finally:
        conn.close()
    if verdict != "ok":
        path.unlink(missing_ok=True)
        raise SnapshotError(f"the copy failed SQLite's quick_check ({verdict})")
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def inspect_snapshot(path: Path) -> SnapshotInfo:
    """Read a snapshot's revision, checkpoints and marks; raise if it is not one."""
    if not path.is_file():
        raise SnapshotError(f"{path} is not a file")
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise SnapshotError(f"{path} cannot be opened as SQLite ({exc})") from None
    try:
        verdict = conn.execute("PRAGMA quick_check").fetchone()[0]
        if verdict != "ok":
            raise SnapshotError(f"{path} failed SQLite's quick_check ({verdict})")
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
        if not {"alembic_version", "users", "stream_checkpoints"} <= tables:
            raise SnapshotError(f"{path} is not a usermgmt database (tables are missing)")
        revision = conn.execute("SELECT version_num FROM alembic_version").fetchone()
        checkpoints = dict(conn.execute("SELECT stream, last_entry_id FROM stream_checkpoints"))
        marks = (
            dict(conn.execute("SELECT stream, replay_from FROM backup_marks"))
            if "backup_marks" in tables
            else {}
        )
    except sqlite3.DatabaseError as exc:
        raise SnapshotError(f"{path} is not a usable SQLite database ({exc})") from None
    finally:
        conn.close()
    return SnapshotInfo(
        path=path,
        size_bytes=path.stat().st_size,
        revision=revision[0] if revision else None,
        checkpoints=checkpoints,
        marks=marks,
    )


# Files SQLite keeps beside a database; stale ones must not meet a restored file.
SIDE_FILES = ("-wal", "-shm", "-journal")


def restore_snapshot(snapshot: Path, target: Path) -> None:
    """Replace the database file `target` with the snapshot's content.

    The copy is written beside the target and renamed over it, so whatever the old
    file holds (garbage, a half-written page, nothing) does not matter, and a failed
    copy leaves the old file as it was. The old file's WAL, shared-memory and
    rollback-journal files go first: left beside the new file, SQLite would apply them to it.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".restoring")
    partial.unlink(missing_ok=True)
    try:
        try:
            src = sqlite3.connect(f"file:{snapshot}?mode=ro", uri=True)
            try:
                dst = sqlite3.connect(partial)
                try:
                    src.backup(dst)
                finally:
                    dst.close()
            finally:
                src.close()
        except sqlite3.Error as exc:
            raise SnapshotError(f"copying {snapshot} to {partial} failed ({exc})") from None
        _finalize(partial)
        _keep_owner_and_mode(target, partial)
        for suffix in SIDE_FILES:
            target.with_name(target.name + suffix).unlink(missing_ok=True)
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


def _keep_owner_and_mode(old: Path, new: Path) -> None:
    """Give `new` the owner and permission bits of `old`, when there is an old file: a
    restore run as root (`docker exec`, sudo) must leave the database writable by the
    service's user. Only root may give a file away; anyone else keeps their own."""
    try:
        info = old.stat()
    except OSError:
        return
    if os.geteuid() == 0 and (info.st_uid, info.st_gid) != (os.geteuid(), os.getegid()):
        os.chown(new, info.st_uid, info.st_gid)
    os.chmod(new, stat.S_IMODE(info.st_mode))
