"""The real `usermgmt` command line and worker process, talked to only through Redis."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import orjson
import pytest

from tests.conftest import REDIS_URL, _real_redis
from tests.e2e.conftest import REPO, USERMGMT, Stack, wait_for
from usermgmt.persistence.db import current_revision, upgrade
from usermgmt.workers.cli.main import build_parser, main
from usermgmt.workers.client.auth import AuthClient, AuthError

pytestmark = pytest.mark.e2e

PASSWORD = "E2e-Secret-Pass1"
T = TypeVar("T")


class Tail:
    """Collects a running process's stderr lines in a thread, so tests can wait on them."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        assert process.stderr is not None
        self.stream = process.stderr
        self.lines: list[str] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for raw in iter(self.stream.readline, b""):
            self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))

    def finish(self) -> list[str]:
        """All lines, once the process has exited and its stderr is at end of file."""
        self.thread.join(10)
        return self.lines

    def has(self, text: str) -> str | None:
        return next((line for line in list(self.lines) if text in line), None)

    def events(self) -> list[dict[str, object]]:
        """The JSON log records among the lines."""
        records = []
        for line in list(self.lines):
            if line.startswith("{"):
                records.append(orjson.loads(line))
        return records


def subcommands() -> list[str]:
    parser = build_parser()
    actions = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    return sorted(actions[0].choices)  # type: ignore[union-attr]


def stderr_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


@pytest.fixture
def cli(tmp_path: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """`usermgmt ARGS` as a process, for commands that need no running services."""
    base = {
        **os.environ,
        "USERMGMT_DATABASE_URL": f"sqlite:///{tmp_path / 'cli.db'}",
        "USERMGMT_REDIS_URL": REDIS_URL,
        "USERMGMT_BCRYPT_ROUNDS": "4",
        "USERMGMT_LOG_FORMAT": "json",
        "PYTHONPATH": str(REPO),
    }

    def run(
        *args: str, cwd: Path | None = None, executable: list[str] = USERMGMT, **env: str
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*executable, *args],
            env={**base, **env},
            cwd=cwd or tmp_path,
            capture_output=True,
            text=True,
            timeout=90,
            check=False,
        )

    return run


def in_parallel(calls: list[Callable[[], T]]) -> list[T]:
    """Run independent CLI processes side by side (each spends most of its time importing)."""
    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(lambda call: call(), calls))


# -- help ----------------------------------------------------------------------------------


def test_help_lists_every_command_and_the_core_ones_explain_themselves(cli: Any) -> None:
    names = subcommands()
    assert {"migrate", "worker"} <= set(names)
    top, migrate, worker = in_parallel(
        [lambda: cli("--help"), lambda: cli("migrate", "--help"), lambda: cli("worker", "--help")]
    )
    for result in (top, migrate, worker):
        assert result.returncode == 0, result.stderr
    for name in names:
        assert name in top.stdout
    assert "usage: usermgmt migrate" in migrate.stdout
    assert "SIGTERM" in worker.stdout
    assert "--only" in worker.stdout


@pytest.mark.parametrize("name", subcommands())
def test_every_subcommand_explains_itself(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Each `usermgmt NAME --help` (the same `main` the script runs; a process each is slow)."""
    with pytest.raises(SystemExit) as exited:
        main([name, "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: usermgmt {name}" in out
    assert len(out.splitlines()) >= 3


def test_the_installed_console_script_answers_help_and_no_command_is_a_usage_error(
    cli: Any,
) -> None:
    script = Path(sys.executable).parent / "usermgmt"
    assert script.exists(), "pip install -e . should have installed the usermgmt script"
    helped, bare = in_parallel([lambda: cli("--help", executable=[str(script)]), cli])
    assert helped.returncode == 0, helped.stderr
    assert "worker" in helped.stdout
    assert bare.returncode == 2
    assert "Traceback" not in bare.stderr


# -- bad settings --------------------------------------------------------------------------

BAD_SETTINGS = [
    ("worker", "USERMGMT_BCRYPT_ROUNDS", "abc"),
    ("worker", "USERMGMT_LOG_FORMAT", "xml"),
    ("worker", "USERMGMT_REDIS_URL", "http://127.0.0.1:6379"),
    ("migrate", "USERMGMT_BCRYPT_ROUNDS", "abc"),
    ("migrate", "USERMGMT_LOG_FORMAT", "xml"),
    ("migrate", "USERMGMT_DATABASE_URL", "mysql://db/users"),
]


def test_a_bad_setting_exits_2_with_one_line_naming_it(cli: Any) -> None:
    results = in_parallel(
        [
            lambda command=command, variable=variable, value=value: cli(
                command, **{variable: value}
            )
            for command, variable, value in BAD_SETTINGS
        ]
    )
    for (command, variable, _), result in zip(BAD_SETTINGS, results, strict=True):
        case = (command, variable, result.stderr)
        assert result.returncode == 2, case
        lines = stderr_lines(result)
        assert len(lines) == 1, case
        assert variable in lines[0], case
        assert "Traceback" not in result.stderr, case
        assert result.stdout == "", case


def test_a_bad_argument_is_a_usage_error(cli: Any) -> None:
    cases = [
        (["worker", "--drain-timeout", "-1"], "must be seconds"),
        (["worker", "--drain-timeout", "0"], "must be seconds"),
        (["worker", "--drain-timeout", "nan"], "must be seconds"),
        (["worker", "--drain-timeout", "inf"], "must be seconds"),
        (["replay", "--from", "5", "--to", "3"], "nothing to replay"),
        (["replay", "--since-checkpoint", "--lookback-s", "inf"], "must be seconds"),
        (["replay", "--since-checkpoint", "--lookback-s", "-5"], "must be seconds"),
        (["dlq", "show", str(2**64) + "-0"], "not a dead letter id"),
        (["dlq", "retry", "1-" + str(2**64)], "not a dead letter id"),
    ]
    results = in_parallel([lambda args=args: cli(*args) for args, _ in cases])
    for (args, said), result in zip(cases, results, strict=True):
        assert result.returncode == 2, (args, result.stderr)
        assert said in result.stderr and "Traceback" not in result.stderr, (args, result.stderr)


def test_a_bad_setting_out_of_range_or_a_missing_redis_database_exits_2(cli: Any) -> None:
    """Values a consumer cannot hold (a Redis argument, a wait, a BIGINT) stop the worker at
    start, like any bad setting; so does a database number the server does not have (no
    Redis has 2**31 - 1 databases: only it can tell, when the worker connects)."""
    missing_db = urlsplit(REDIS_URL)._replace(path="/2147483646", query="").geturl()
    cases = [
        ("USERMGMT_REDIS_URL", missing_db, "DB index is out of range"),
        ("USERMGMT_REDIS_URL", urlsplit(REDIS_URL)._replace(path="/abc").geturl(), "'abc'"),
        ("USERMGMT_MAX_WAIT_S", "inf", "finite number"),
        ("USERMGMT_SESSION_TIMEOUT_S", "inf", "finite number"),
        ("USERMGMT_CLAIM_IDLE_MS", "99999999999999999999", "86400000"),
        ("USERMGMT_STARTING_WALLET", str(2**63), str(2**63 - 1)),
    ]
    results = in_parallel(
        [
            lambda variable=variable, value=value: cli("worker", **{variable: value})
            for variable, value, _ in cases
        ]
    )
    for (variable, _, said), result in zip(cases, results, strict=True):
        case = (variable, result.stderr)
        assert result.returncode == 2, case
        lines = stderr_lines(result)
        assert len(lines) == 1, case
        assert lines[0].startswith(f"usermgmt: error: invalid setting {variable}="), case
        assert said in lines[0], case
        assert result.stdout == "", case


def test_dotenv_settings_and_hidden_passwords_in_settings_errors(cli: Any, tmp_path: Path) -> None:
    workdir = tmp_path / "ops"
    workdir.mkdir()
    (workdir / ".env").write_text("USERMGMT_MAX_DELIVERIES=never\n")
    from_file, with_password = in_parallel(
        [
            lambda: cli("migrate", cwd=workdir),
            lambda: cli("worker", USERMGMT_REDIS_URL="redis://:Hidden-Pw-42@host:port/0"),
        ]
    )
    assert from_file.returncode == 2
    lines = stderr_lines(from_file)
    assert len(lines) == 1
    assert "USERMGMT_MAX_DELIVERIES" in lines[0]
    assert with_password.returncode == 2
    assert "USERMGMT_REDIS_URL" in with_password.stderr
    assert "Hidden-Pw-42" not in with_password.stderr


# -- migrate -------------------------------------------------------------------------------


def table_names(path: Path) -> set[str]:
    with sqlite3.connect(path) as conn:
        return {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}


def test_migrate_twice_is_fine(stack: Stack) -> None:
    # The fixture migrated once already.
    again = stack.cli("migrate")
    assert again.returncode == 0, again.stderr
    assert "already at the latest schema" in again.stdout
    database = Path(stack.database_url.removeprefix("sqlite:///"))
    assert {"users", "stats", "leaderboard", "alembic_version"} <= table_names(database)


def test_migrate_works_from_any_directory(cli: Any, tmp_path: Path) -> None:
    """The migrations ship inside the package: the working directory does not matter."""
    workdir = tmp_path / "somewhere" / "else"
    workdir.mkdir(parents=True)
    relative = workdir / "data" / "relative.db"
    absolute = tmp_path / "elsewhere" / "absolute.db"
    urls = ["sqlite:///data/relative.db", f"sqlite:///{absolute}"]
    for expected in ("upgraded from empty", "already at the latest schema"):
        results = in_parallel(
            [lambda url=url: cli("migrate", cwd=workdir, USERMGMT_DATABASE_URL=url) for url in urls]
        )
        for result in results:
            assert result.returncode == 0, result.stderr
            assert expected in result.stdout
    for target in (relative, absolute):
        assert {"users", "stats", "leaderboard"} <= table_names(target)


def test_migrate_against_an_unreachable_database_is_one_line(cli: Any) -> None:
    result = cli(
        "migrate", USERMGMT_DATABASE_URL="postgresql://postgres:Db-Secret-7@127.0.0.1:1/test"
    )
    assert result.returncode == 1
    lines = stderr_lines(result)
    assert len(lines) == 1, result.stderr
    assert "cannot use the database at" in lines[0]
    assert "127.0.0.1:1" in lines[0]
    assert "Db-Secret-7" not in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", [["migrate"], ["leaderboard"], ["user", "alice"]])
def test_a_file_that_is_not_a_database_is_one_line(
    cli: Any, tmp_path: Path, command: list[str]
) -> None:
    path = tmp_path / "notes.db"
    path.write_text("shopping list: eggs, milk\n" * 100)
    result = cli(*command, USERMGMT_DATABASE_URL=f"sqlite:///{path}")
    assert result.returncode == 1
    lines = stderr_lines(result)
    assert len(lines) == 1, result.stderr
    assert "(file is not a database)" in lines[0] and str(path) in lines[0]
    assert path.read_text().startswith("shopping list")


@pytest.mark.parametrize(
    ("command", "says"),
    [
        (["leaderboard"], "there is no database at"),
        (["user", "alice"], "there is no database at"),
        (["trim"], "there is no database at"),
        (["worker", "--only", "events"], "no schema yet; run `usermgmt migrate` first"),
        (["replay"], "there is no database at"),
    ],
)
def test_a_missing_sqlite_file_is_named_and_not_created(
    cli: Any, tmp_path: Path, command: list[str], says: str
) -> None:
    """A mistyped path: said in one line, with no empty database (or folder) left
    there for the next command to find; only `migrate` creates one."""
    path = tmp_path / "typo" / "usermgmt.db"
    result = cli(*command, USERMGMT_DATABASE_URL=f"sqlite:///{path}")
    assert result.returncode == 1
    lines = stderr_lines(result)
    assert len(lines) == 1 and says in lines[0], result.stderr
    assert not path.parent.exists()
    assert cli("migrate", USERMGMT_DATABASE_URL=f"sqlite:///{path}").returncode == 0
    assert {"users", "stats", "leaderboard"} <= table_names(path)


@pytest.mark.parametrize("command", [["acl"], ["leaderboard", "--json"]])
def test_output_cut_short_by_its_reader_is_no_traceback(stack: Stack, command: list[str]) -> None:
    """`usermgmt … | head`: the reader goes before the output is written."""
    process = subprocess.Popen(
        [*USERMGMT, *command],
        env=stack.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    process.stdout.close()  # as `head` does once it has read what it wanted
    _, stderr = process.communicate(timeout=60)
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr
    assert process.returncode == 1


# -- the worker process ----------------------------------------------------------------------


def test_the_worker_serves_accounts_and_stops_cleanly_on_sigterm(stack: Stack) -> None:
    process = stack.start_worker("--only", "auth")
    tail = Tail(process)
    client = AuthClient(stack.redis, prefix=stack.prefix, timeout=30)
    registered = client.register("Alice", PASSWORD)
    assert registered["username"] == "Alice"
    user, token = client.login("alice", PASSWORD)
    assert user == registered
    assert client.verify_token(token)["id"] == registered["id"]
    with pytest.raises(AuthError) as caught:
        client.register("ALICE", "Another-Pass-2")
    assert caught.value.code == "username_taken"
    with pytest.raises(AuthError) as caught:
        client.login("alice", "Wrong-Pass-3")
    assert caught.value.code == "invalid_credentials"
    # Junk carrying secrets is dead-lettered; the secrets reach neither the log nor the DLQ.
    requests, dlq = f"{stack.prefix}:auth:requests", f"{stack.prefix}:dlq"
    stack.redis.xadd(requests, {"payload": b"op=login&password=Junk-Pass-4"})
    stack.redis.xadd(
        requests, {"payload": orjson.dumps({"request_id": 7, "password": "Junk-Pass-5"})}
    )
    wait_for(lambda: stack.redis.xlen(dlq) == 2)
    assert client.get_user("ALICE")["username"] == "Alice"  # still serving

    assert stack.stop_worker(process) == 0
    lines = tail.finish()
    assert any("worker stopped" in line for line in lines)
    output = "\n".join(lines)
    dead = repr(stack.redis.xrange(dlq))
    for secret in (PASSWORD, "Another-Pass-2", "Wrong-Pass-3", token, "Junk-Pass-4", "Junk-Pass-5"):
        assert secret not in output
        assert secret not in dead
    assert "Traceback" not in output
    answered = [r for r in tail.events() if r.get("event") == "request answered"]
    assert {r.get("op") for r in answered} >= {"register", "login", "verify_token"}
    for record in answered:
        assert {"request_id", "entry_id", "outcome", "duration_ms"} <= set(record)
    # Every answered entry is gone from the stream: no password waits there.
    assert stack.redis.xlen(f"{stack.prefix}:auth:requests") == 0


def test_sigint_also_exits_0(stack: Stack) -> None:
    process = stack.start_worker()
    tail = Tail(process)
    client = AuthClient(stack.redis, prefix=stack.prefix, timeout=30)
    client.register("bob", PASSWORD)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=30) == 0
    assert any("worker stopped" in line for line in tail.finish())


def start_importing(stack: Stack, *args: str) -> tuple[subprocess.Popen[bytes], Tail]:
    """Start `usermgmt ARGS` and return once it is importing its modules (a few hundred
    milliseconds): a stop from an orchestrator can land there, before any command has
    set its handlers."""
    process = subprocess.Popen(
        [sys.executable, "-X", "importtime", *USERMGMT[1:], *args],
        env=stack.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    stack.workers.append(process)
    tail = Tail(process)
    # `-X importtime` reports each module on stderr as its import completes; the layers
    # below the command line come first, and SQLAlchemy, pydantic and redis after them.
    importing = "usermgmt.persistence"
    wait_for(
        lambda: any(line.rsplit("|")[-1].strip() == importing for line in list(tail.lines)),
        interval=0.001,
    )
    return process, tail


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_start_up_stops_the_worker_with_exit_0(
    stack: Stack, signum: signal.Signals
) -> None:
    process, tail = start_importing(stack, "worker")
    process.send_signal(signum)
    assert process.wait(timeout=30) == 0
    # "worker stopped before it started" unless this process stalled for the rest of
    # the worker's imports: then it ran, and it stopped as a running worker does.
    assert tail.has("worker stopped")
    assert not tail.has("Traceback")


def test_other_commands_still_stop_at_a_signal_during_start_up(stack: Stack) -> None:
    process, _ = start_importing(stack, "status")
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == -signal.SIGTERM
    process, tail = start_importing(stack, "status")
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=30) == 1
    assert tail.has("usermgmt: interrupted")
    assert not tail.has("Traceback")


def test_the_worker_keeps_running_while_redis_is_unreachable(stack: Stack) -> None:
    process = stack.start_worker(USERMGMT_REDIS_URL="redis://:Redis-Secret-9@127.0.0.1:1/0")
    tail = Tail(process)
    line = wait_for(lambda: tail.has("cannot reach Redis at"))
    assert "127.0.0.1:1" in line
    assert "USERMGMT_REDIS_URL" in line
    # It retries rather than dying (0.2, 0.4, 0.8, 1.6 s apart) and says so once: the
    # retries are debug lines, the next error line comes a minute later. (The events
    # consumer, the auth consumer and the outbox relay each say it.)
    time.sleep(3.5)
    assert process.poll() is None
    assert 1 <= sum("cannot reach Redis at" in item for item in tail.lines) <= 3
    assert stack.stop_worker(process) == 0
    lines = tail.finish()
    assert any("worker stopped" in item for item in lines)
    assert not any("Redis-Secret-9" in item for item in lines)
    assert not any("Traceback" in item for item in lines)


def test_a_second_worker_under_a_live_ones_name_refuses_and_a_crashed_ones_is_taken(
    stack: Stack,
) -> None:
    """Two live workers under one name would share a pending list; the second refuses."""
    first = stack.start_worker("--consumer", "w-shared", "--only", "auth")
    first_tail = Tail(first)
    wait_for(lambda: first_tail.has("worker started"))
    second = stack.start_worker("--consumer", "w-shared")
    second_tail = Tail(second)
    assert second.wait(timeout=60) == 1
    lines = [line for line in second_tail.finish() if line.strip()]
    assert lines[-1] == (
        f"usermgmt: another worker is running as consumer 'w-shared' (pid {first.pid} on "
        f"{os.uname().nodename}); give this one another --consumer name"
    )
    assert not any("Traceback" in line for line in lines)
    assert first.poll() is None  # the live one goes on serving
    client = AuthClient(stack.redis, prefix=stack.prefix, timeout=30)
    assert client.register("Twin-Check", PASSWORD)["username"] == "Twin-Check"

    first.kill()  # a crash leaves its heartbeat behind
    first.wait(10)
    again = stack.start_worker("--consumer", "w-shared", "--only", "auth")
    tail = Tail(again)
    wait_for(lambda: tail.has("worker started"))  # at once: its predecessor is gone
    assert tail.has("took over the consumer name of a stopped worker")
    assert not tail.has("waiting to see whether it is alive")
    assert stack.stop_worker(again) == 0


def test_the_worker_waits_for_an_unreachable_database_and_stops_on_sigterm(stack: Stack) -> None:
    process = stack.start_worker(
        USERMGMT_DATABASE_URL="postgresql://postgres:Db-Secret-8@127.0.0.1:1/test"
    )
    tail = Tail(process)
    line = wait_for(lambda: tail.has("cannot use the database at"))
    assert "127.0.0.1:1" in line
    assert process.poll() is None
    assert stack.stop_worker(process) == 0
    lines = tail.finish()
    assert not any("Db-Secret-8" in item for item in lines)
    assert not any("Traceback" in item for item in lines)


def test_the_worker_refuses_an_unmigrated_database_in_one_line(
    stack: Stack, tmp_path: Path
) -> None:
    empty = tmp_path / "never-migrated.db"
    process = stack.start_worker(USERMGMT_DATABASE_URL=f"sqlite:///{empty}")
    tail = Tail(process)
    assert process.wait(timeout=30) == 1
    lines = [line for line in tail.finish() if line.strip()]
    assert len(lines) == 1, lines
    assert "usermgmt migrate" in lines[0]
    assert "Traceback" not in lines[0]


def test_a_wrong_redis_password_is_named_as_such_not_as_redis_being_away(
    cli: Any, prefix: str
) -> None:
    """Redis answers and refuses the credentials: "start it" would send the operator
    after the wrong thing."""
    admin = _real_redis()
    user = f"{prefix}-operator"
    admin.execute_command("ACL", "SETUSER", user, "on", ">right-password", "~*", "+@all")
    try:
        parts = urlsplit(REDIS_URL)
        url = parts._replace(netloc=f"{user}:wrong-password@{parts.hostname}:{parts.port}")
        result = cli("status", USERMGMT_REDIS_URL=url.geturl())
    finally:
        admin.execute_command("ACL", "DELUSER", user)
        admin.close()
    assert result.returncode == 1
    (line,) = stderr_lines(result)
    assert "refused the credentials" in line and "check the user and password" in line
    assert "wrong-password" not in line and "start it" not in line


@pytest.mark.parametrize(
    ("revision", "says"),
    [
        ("0006", "at schema revision 0006 and this release needs"),
        ("0099", "which this release does not know"),
    ],
)
def test_a_worker_refuses_a_database_another_release_migrated(
    cli: Any, tmp_path: Path, revision: str, says: str
) -> None:
    """An old schema lacks what the worker writes (on PostgreSQL its statements failed
    as errors that dead-lettered valid events); a newer one may mean anything. The
    worker and replay refuse it at once, in one line, and leave it as it is."""
    path = tmp_path / "old.db"
    url = f"sqlite:///{path}"
    upgrade(url, "0006")
    if revision == "0099":
        with sqlite3.connect(path) as db:
            db.execute("UPDATE alembic_version SET version_num = '0099'")
    for command in (["worker", "--only", "events"], ["replay"]):
        result = cli(*command, USERMGMT_DATABASE_URL=url)
        assert result.returncode == 1, command
        (line,) = stderr_lines(result)
        assert says in line, line
    assert current_revision(url) == revision
