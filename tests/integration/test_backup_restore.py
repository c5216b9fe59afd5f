"""Backups under load, restores that replay to the live state, and the CLI around them."""

from __future__ import annotations

import os
import sqlite3
import stat
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest
from sqlalchemy import text

from tests.conftest import REDIS_URL, Backend, _delete_prefix, _real_redis
from tests.integration.helpers import drain, publish, services_for
from tests.integration.replay_helpers import new_relay, register, table_rows, wait_until
from usermgmt.persistence.db import make_engine, sqlite_path
from usermgmt.persistence.keys import Keys
from usermgmt.persistence.ranking import refresh_ranks_now
from usermgmt.persistence.snapshots import inspect_snapshot, take_snapshot
from usermgmt.workers.cli.main import main
from usermgmt.workers.events.consumer import EventConsumer
from usermgmt.workers.ops.backup import NotSQLite, WorkerAlive, backup, restore
from usermgmt.workers.runtime.bootstrap import Services
from usermgmt.workers.runtime.settings import load_settings

PLAYERS = [f"p{index:02d}" for index in range(8)]


def play_games(services: Services, first: int, count: int, players: list[str]) -> int:
    """Publish `count` finished games (update, then terminate) among `players`."""
    redis, keys = services.redis, services.keys
    for game in range(first, first + count):
        pair = [players[game % len(players)], players[(game + 3) % len(players)]]
        publish(redis, keys, "update", session_id=f"game-{game}", players=pair)
        publish(
            redis,
            keys,
            "terminate",
            session_id=f"game-{game}",
            results=[
                {"username": pair[0], "outcome": "win", "earnings": game * 10},
                {"username": pair[1], "outcome": "loss", "earnings": game % 7},
            ],
        )
    return count * 2


class Running:
    """An event consumer applying entries in a thread, as the worker does."""

    def __init__(self, services: Services) -> None:
        self.stop = threading.Event()
        self.consumer = EventConsumer(services, "live", self.stop)
        self.thread = threading.Thread(target=self.consumer.run)
        self.thread.start()

    def wait_applied(self, count: int) -> None:
        wait_until(lambda: self.consumer.stats.applied >= count, timeout=60)

    def close(self) -> None:
        """Stop, and leave ranks exact as the worker does once idle."""
        self.stop.set()
        self.thread.join(30)
        assert not self.thread.is_alive()
        refresh_ranks_now(self.consumer.engine)


@pytest.fixture
def live(backend: Backend) -> Iterator[Services]:
    with services_for(backend, retry_delay_ms=50) as services:
        yield services


def test_a_backup_under_load_restores_and_replays_to_the_final_state(
    live: Services, backend: Backend, tmp_path: Path
) -> None:
    if not backend.name.startswith("sqlite"):
        with pytest.raises(NotSQLite, match="pg_dump"):
            backup(live, tmp_path / "snapshot.db")
        return
    relay = new_relay(live)
    register(live, relay, *PLAYERS)
    running = Running(live)
    try:
        published = play_games(live, 0, 40, PLAYERS)
        publishing = threading.Thread(target=play_games, args=(live, 40, 60, PLAYERS))
        publishing.start()
        running.wait_applied(published // 2)  # the worker is busy: backup now
        report = backup(live, tmp_path / "snapshot.db")
        publishing.join(60)
        published += 120
        # Players who register after the backup, and play.
        register(live, relay, "late1", "late2")
        published += play_games(live, 100, 10, ["late1", "late2", *PLAYERS])
        running.wait_applied(published)
    finally:
        running.close()
    expected = table_rows(live.engine)
    assert len(expected["game_results"]) == 2 * 110

    snapshot = report.snapshot
    assert set(snapshot.marks) == {live.keys.update_stream, live.keys.terminate_stream}
    assert inspect_snapshot(snapshot.path).revision == snapshot.revision

    restored = restore(live, snapshot.path)

    assert table_rows(live.engine) == expected
    summary = restored.summary
    assert summary is not None and summary.applied > 0 and summary.waiting == 0
    assert summary.read["accounts"] >= 2  # the late registrations
    with live.engine.connect() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM backup_marks")).scalar_one() == 0
        earnings = dict(
            conn.execute(
                text("SELECT u.username, s.earnings FROM users u JOIN stats s ON s.user_id = u.id")
            ).all()
        )
    board = live.redis.zrange(live.keys.leaderboard, 0, -1, withscores=True)
    assert {name.decode(): int(score) for name, score in board} == earnings


def test_a_snapshot_without_marks_restores_from_the_checkpoints(
    live: Services, backend: Backend, tmp_path: Path
) -> None:
    if not backend.name.startswith("sqlite"):
        return  # PostgreSQL snapshots are pg_dump's; covered by the test above
    relay = new_relay(live)
    register(live, relay, *PLAYERS)
    running = Running(live)
    try:
        published = play_games(live, 0, 10, PLAYERS)
        running.wait_applied(published)
        source = sqlite_path(live.settings.database_url)
        assert source is not None
        copy = take_snapshot(source, tmp_path / "plain.db", {}, datetime.now(UTC))
        assert copy.marks == {}
        published += play_games(live, 10, 10, PLAYERS)
        running.wait_applied(published)
    finally:
        running.close()
    expected = table_rows(live.engine)

    report = restore(live, copy.path)

    assert table_rows(live.engine) == expected
    assert report.summary is not None and report.summary.applied == 20


def test_restore_refuses_while_a_worker_is_alive(
    live: Services, backend: Backend, tmp_path: Path
) -> None:
    if not backend.name.startswith("sqlite"):
        with pytest.raises(NotSQLite, match="pg_restore"):
            restore(live, tmp_path / "nothing.db")
        return
    relay = new_relay(live)
    register(live, relay, "ann")
    snapshot = backup(live, tmp_path).snapshot  # a directory: a timestamped file in it
    assert snapshot.path.parent == tmp_path and snapshot.path.name.startswith("usermgmt-")
    register(live, relay, "ben")
    live.redis.set(live.keys.heartbeat("w1"), orjson.dumps({"pid": 1}), ex=30)
    with pytest.raises(WorkerAlive, match="w1"):
        restore(live, snapshot.path)
    report = restore(live, snapshot.path, force=True)
    # The accounts stream replays from the snapshot's checkpoint: ben only.
    assert report.summary is not None and report.summary.read == {"accounts": 1}
    with live.engine.connect() as conn:
        assert conn.execute(text("SELECT username FROM users ORDER BY id")).scalars().all() == [
            "ann",
            "ben",
        ]


def test_backup_refuses_to_overwrite_without_force(
    live: Services, backend: Backend, tmp_path: Path
) -> None:
    if not backend.name.startswith("sqlite"):
        return  # covered: backup refuses PostgreSQL
    target = tmp_path / "snap.db"
    backup(live, target)
    with pytest.raises(FileExistsError, match="--force"):
        backup(live, target)
    assert backup(live, target, force=True).snapshot.path == target


# -- the command line (real Redis: the CLI opens its own connection) -------------------


@pytest.fixture
def cli_env(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, prefix: str
) -> Iterator[dict[str, str]]:
    redis = _real_redis()
    database_url = f"sqlite:///{tmp_path / 'cli.db'}"
    env = {
        "USERMGMT_REDIS_URL": REDIS_URL,
        "USERMGMT_DATABASE_URL": database_url,
        "USERMGMT_KEY_PREFIX": prefix,
        "USERMGMT_BCRYPT_ROUNDS": "4",
        "USERMGMT_LOG_FORMAT": "json",
        "USERMGMT_LOG_LEVEL": "warning",
        "USERMGMT_RETRY_DELAY_MS": "50",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    yield env
    _delete_prefix(redis, prefix)
    redis.close()


def migrated_with_games(games: int) -> Services:
    """`usermgmt migrate` on the CLI's settings, then `PLAYERS` registered and `games`
    games applied."""
    assert main(["migrate"]) == 0
    settings = load_settings()
    services = Services(
        settings, _real_redis(), make_engine(settings.database_url), Keys(settings.key_prefix)
    )
    register(services, new_relay(services), *PLAYERS)
    play_games(services, 0, games, PLAYERS)
    drain(services)
    return services


def test_cli_backup_restore_replay_and_trim(
    cli_env: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    services = migrated_with_games(5)
    capsys.readouterr()

    assert main(["backup", str(tmp_path / "snap.db")]) == 0
    out = capsys.readouterr().out
    assert "written to" in out and "replay after restoring it starts at" in out

    play_games(services, 5, 5, PLAYERS)
    drain(services)
    expected = table_rows(services.engine)
    services.engine.dispose()

    assert main(["restore", str(tmp_path / "snap.db")]) == 0
    out = capsys.readouterr().out
    assert "restored" in out and "applied" in out and "caches rebuilt" in out
    assert table_rows(services.engine) == expected

    empty = f"sqlite:///{tmp_path / 'empty.db'}"
    assert main(["replay", "--database", empty]) == 1  # not migrated: one line, exit 1
    assert "usermgmt migrate" in capsys.readouterr().err
    assert main(["migrate", "--database", empty]) == 0
    assert main(["replay", "--database", empty]) == 0
    out = capsys.readouterr().out
    assert "entries read" in out and "dead-lettered" in out
    replayed = make_engine(empty)
    assert table_rows(replayed) == expected
    replayed.dispose()

    assert main(["replay", "--from", "not-an-id"]) == 2
    assert main(["trim", "--retention-s", "0", "--dry-run"]) == 0
    assert "would remove" in capsys.readouterr().out
    assert services.redis.xlen(services.keys.update_stream) == 10
    assert main(["trim", "--retention-s", "0"]) == 0
    assert services.redis.xlen(services.keys.update_stream) == 0
    services.engine.dispose()
    services.redis.close()


def test_cli_backup_of_postgresql_points_to_pg_dump(
    cli_env: dict[str, str],
    postgres_url: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("USERMGMT_DATABASE_URL", postgres_url)
    assert main(["migrate"]) == 0
    assert main(["backup", str(tmp_path / "pg.db")]) == 1
    err = capsys.readouterr().err
    assert "pg_dump" in err and len(err.strip().splitlines()) == 1
    assert "docs/operations.md" in err  # where the PostgreSQL steps are
    assert not (tmp_path / "pg.db").exists()
    assert main(["restore", str(tmp_path / "pg.db")]) == 1
    assert "pg_restore" in capsys.readouterr().err


def test_a_failed_backup_leaves_no_file_behind(
    cli_env: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "snap.db"
    # The database exists but was never migrated: the copy fails once it is written.
    sqlite3.connect(tmp_path / "cli.db").execute("CREATE TABLE unrelated (x)").connection.close()
    assert main(["backup", str(target)]) == 1
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert sorted(path.name for path in tmp_path.iterdir()) == ["cli.db"]


def test_cli_restore_replaces_a_corrupted_database_file(
    cli_env: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    services = migrated_with_games(3)
    assert main(["backup", str(tmp_path / "snap.db")]) == 0
    play_games(services, 3, 3, PLAYERS)
    drain(services)
    expected = table_rows(services.engine)
    services.engine.dispose()

    live = tmp_path / "cli.db"
    # A WAL with frames of the old database, left beside it: SQLite would apply them to
    # whatever file is put there.
    writer = sqlite3.connect(live, isolation_level=None)
    writer.execute("PRAGMA wal_autocheckpoint=0")
    writer.execute("UPDATE users SET wallet = wallet + 1000000")
    stale_wal = Path(f"{live}-wal").read_bytes()
    writer.close()
    live.chmod(0o600)
    # The service's own user owns it (as in the image); the restore runs as root here.
    owner = (65534, 65534) if os.geteuid() == 0 else (os.getuid(), os.getgid())
    os.chown(live, *owner)
    live.write_bytes(os.urandom(65_536))  # the database is lost: its file is garbage
    Path(f"{live}-wal").write_bytes(stale_wal)
    capsys.readouterr()

    assert main(["restore", str(tmp_path / "snap.db")]) == 0
    out, err = capsys.readouterr()
    assert "restored" in out and "caches rebuilt" in out
    assert "Traceback" not in err
    assert table_rows(services.engine) == expected
    with services.engine.connect() as conn:
        assert conn.execute(text("PRAGMA integrity_check")).scalar() == "ok"
    assert stat.S_IMODE(live.stat().st_mode) == 0o600  # the file keeps its permissions
    assert (live.stat().st_uid, live.stat().st_gid) == owner  # and its owner
    assert not Path(f"{live}.restoring").exists()
    services.engine.dispose()
    services.redis.close()


def test_cli_restore_into_another_file_leaves_the_live_caches_alone(
    cli_env: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    services = migrated_with_games(3)
    redis, keys = services.redis, services.keys
    assert main(["backup", str(tmp_path / "snap.db")]) == 0
    play_games(services, 3, 3, PLAYERS)
    drain(services)
    redis.hset(keys.user("p00"), mapping={"username": "p00", "wallet": 1})  # a cached user
    board = redis.zrange(keys.leaderboard, 0, -1, withscores=True)
    assert board
    live_rows = table_rows(services.engine)
    redis.set(keys.heartbeat("w1"), orjson.dumps({"pid": 1}), ex=30)  # a live worker
    capsys.readouterr()

    other = f"sqlite:///{tmp_path / 'inspect.db'}"
    code = main(
        ["restore", str(tmp_path / "snap.db"), "--no-replay", "--force", "--database", other]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "caches not rebuilt" in out and "caches rebuilt:" not in out
    # The other file holds the snapshot; the live database and its caches are untouched.
    inspected = make_engine(other)
    assert table_rows(inspected) != live_rows
    assert len(table_rows(inspected)["users"]) == len(PLAYERS)
    inspected.dispose()
    assert table_rows(services.engine) == live_rows
    assert redis.zrange(keys.leaderboard, 0, -1, withscores=True) == board
    assert redis.hget(keys.user("p00"), "wallet") == b"1"

    # Restoring into the configured file, named by --database, still rebuilds them.
    redis.delete(keys.heartbeat("w1"))
    services.engine.dispose()
    configured = services.settings.database_url
    code = main(["restore", str(tmp_path / "snap.db"), "--database", configured])
    assert code == 0
    assert "caches rebuilt:" in capsys.readouterr().out
    assert not redis.exists(keys.user("p00"))  # user hashes are dropped by a rebuild
    assert table_rows(services.engine) == live_rows  # the replay brought it back
    services.engine.dispose()
    services.redis.close()


def test_cli_backup_refuses_a_missing_directory_and_an_unwritable_path(
    cli_env: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["migrate"]) == 0
    capsys.readouterr()
    missing = tmp_path / "typo" / "nightly" / "snap.db"
    assert main(["backup", str(missing)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{tmp_path / 'typo' / 'nightly'} does not exist" in err[0]
    assert not (tmp_path / "typo").exists()  # nothing created on a mistyped path
    # A directory named with its slash stays one, even missing: never a file of its name.
    assert main(["backup", f"{tmp_path / 'nightly'}/"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith("nightly/: no such directory")
    assert not (tmp_path / "nightly").exists()

    # procfs lets nobody, root included, create a file: SQLite cannot open the copy.
    unwritable = Path("/proc/usermgmt-backup-test.db")
    assert main(["backup", str(unwritable)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"usermgmt: cannot write the backup to {unwritable} (unable to open database file)"
    ]
