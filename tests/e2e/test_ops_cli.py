"""Operator commands as processes: health, status, metrics, publish, dlq, acl."""

from __future__ import annotations

import socket
import subprocess
import urllib.request
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import orjson
import pytest
from redis import Redis

from tests.e2e.conftest import USERMGMT, Stack, wait_for
from usermgmt.persistence import accounts
from usermgmt.persistence.db import make_engine
from usermgmt.persistence.keys import EVENTS_GROUP, Keys
from usermgmt.workers.cli.main import main
from usermgmt.workers.client.auth import AuthClient
from usermgmt.workers.ops import acl
from usermgmt.workers.runtime.streams import Entry, dead_letter, ensure_group


def cli_with_input(stack: Stack, stdin: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`usermgmt ARGS` with `stdin` as its standard input."""
    return subprocess.run(
        [*USERMGMT, *args],
        env=stack.env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def in_process(
    stack: Stack,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    *args: str,
) -> tuple[int, str, str]:
    """`usermgmt ARGS` run in this process with the stack's environment: (code, out, err)."""
    for name, value in stack.env.items():
        if name.startswith("USERMGMT_"):
            monkeypatch.setenv(name, value)
    capsys.readouterr()
    try:
        code = main(list(args))
    except SystemExit as exc:  # argparse usage errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        body: bytes = response.read()
        return body.decode()


def sample(text: str, line_start: str) -> float | None:
    """The value of the first metrics line starting with `line_start`."""
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return None


def status_json(stack: Stack) -> dict[str, object]:
    result = stack.cli("status", "--json")
    assert result.returncode == 0, result.stderr
    data: dict[str, object] = orjson.loads(result.stdout)
    return data


def register(stack: Stack, *names: str) -> None:
    engine = make_engine(stack.database_url)
    try:
        for name in names:
            accounts.create_user(engine, name, "x" * 60, wallet=0)
    finally:
        engine.dispose()


def plant_stale_consumer(redis: Redis, keys: Keys) -> None:
    """A consumer left behind by a worker that went away, with nothing pending."""
    ensure_group(redis, keys.terminate_stream, EVENTS_GROUP)
    entry_id = redis.xadd(keys.terminate_stream, {"payload": b"[]"})
    redis.xreadgroup(EVENTS_GROUP, "gone-worker", {keys.terminate_stream: ">"}, count=1)
    redis.xack(keys.terminate_stream, EVENTS_GROUP, entry_id)
    redis.xdel(keys.terminate_stream, entry_id)


def test_health_status_and_metrics_follow_a_running_worker(stack: Stack) -> None:
    keys = Keys(stack.prefix)
    down = stack.cli("health")
    assert down.returncode == 1
    assert down.stdout.startswith("unhealthy: no worker heartbeat")
    plant_stale_consumer(stack.redis, keys)
    register(stack, "alice", "bob")
    port = free_port()
    worker = stack.start_worker(
        "--consumer", "e2e-worker", "--metrics-port", str(port), USERMGMT_CONSUMER_IDLE_REMOVE_S="1"
    )

    up = wait_for(lambda: (r := stack.cli("health", "--this-host")).returncode == 0 and r)
    assert up.stdout.strip() == "ok: 1 worker(s) alive on host " + socket.gethostname() + (
        ": e2e-worker"
    )
    published = cli_with_input(
        stack, '{"session_id": "g1", "players": ["alice", "bob"]}\n', "publish", "update"
    )
    assert published.returncode == 0, published.stderr
    AuthClient(stack.redis, prefix=stack.prefix).register("carol", "carol-password")

    metrics = wait_for(
        lambda: (
            (text := scrape(port))
            and sample(text, 'usermgmt_events_applied_total{type="update"}') == 1
            and sample(text, 'usermgmt_auth_requests_total{op="register",outcome="ok"}') == 1
            and text
        )
    )
    assert sample(metrics, 'usermgmt_auth_request_duration_seconds_count{op="register"}') == 1
    assert (sample(metrics, "usermgmt_event_batch_size_count") or 0) >= 1

    def stale_consumer_removed() -> dict[str, object] | None:
        data = status_json(stack)
        streams = {s["name"]: s for s in data["streams"]}  # type: ignore[attr-defined]
        names = {c["name"] for c in streams["terminate"]["groups"][0]["consumers"]}
        return data if "gone-worker" not in names else None

    data = wait_for(stale_consumer_removed, timeout=30)
    assert [w["consumer"] for w in data["workers"]] == ["e2e-worker"]  # type: ignore[index]
    update = next(s for s in data["streams"] if s["name"] == "update")  # type: ignore[attr-defined]
    assert update["length"] == 1
    assert update["checkpoint"] == update["last_id"]
    assert update["groups"][0]["lag"] == 0 and update["groups"][0]["pending"] == 0
    gauges = wait_for(
        lambda: (
            (text := scrape(port))
            and sample(text, 'usermgmt_stream_length{stream="update"}') == 1
            and text
        )
    )
    assert sample(gauges, 'usermgmt_stream_lag{group="usermgmt-events",stream="update"}') == 0

    table = stack.cli("status")
    assert table.returncode == 0, table.stderr
    assert "usermgmt-events" in table.stdout and "e2e-worker" in table.stdout
    assert "dead letters: 0" in table.stdout
    assert "waiting events: 0" in table.stdout

    assert stack.stop_worker(worker) == 0
    after = stack.cli("health")
    assert after.returncode == 1  # the heartbeat key is removed on a clean stop


def test_publish_is_all_or_nothing_and_reads_files(
    stack: Stack,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    keys = Keys(stack.prefix)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"session_id": "a", "results": [{"username": "alice", "outcome": "win", "earnings": 1}]}\n'
        '{"session_id": "b", "results": [{"username": "bob", "outcome": "draw", "earnings": 0}]}\n'
        "\n"
        "nope\n"
    )
    result = stack.cli("publish", "terminate", str(bad))
    assert result.returncode == 1
    assert "line 2: terminate event: results.0.outcome" in result.stderr
    assert "line 4: not JSON" in result.stderr
    assert "2 invalid line(s)" in result.stderr and "nothing was published" in result.stderr
    assert not stack.redis.exists(keys.terminate_stream)

    event_id = str(uuid.uuid4())
    good = tmp_path / "good.jsonl"
    good.write_text(
        orjson.dumps({"event_id": event_id, "session_id": "a", "reason": "aborted"}).decode()
        + "\n"
        + '{"session_id": "b", "reason": "aborted"}\n'
    )
    result = stack.cli("publish", "terminate", str(good))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"published 2 terminate event(s) to {keys.terminate_stream}"
    sent = [orjson.loads(f[b"payload"]) for _, f in stack.redis.xrange(keys.terminate_stream)]
    assert [s["session_id"] for s in sent] == ["a", "b"]
    assert sent[0]["event_id"] == event_id and uuid.UUID(sent[1]["event_id"])

    missing = in_process(stack, monkeypatch, capsys, "publish", "update", str(tmp_path / "nope"))
    assert missing[0] == 1 and "cannot read" in missing[2]
    assert in_process(stack, monkeypatch, capsys, "publish", "results")[0] == 2


def test_dead_letters_are_listed_shown_retried_and_purged(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = Keys(stack.prefix)
    stack.start_worker("--only", "events")
    published = cli_with_input(
        stack, '{"session_id": "s1", "players": ["dora", "eve"]}\n', "publish", "update", "-"
    )
    assert published.returncode == 0, published.stderr
    wait_for(lambda: stack.redis.xlen(keys.dlq) == 1)

    listed = stack.cli("dlq", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    (letter,) = orjson.loads(listed.stdout)
    assert letter["reason"] == "unknown_user"
    shown = stack.cli("dlq", "show", letter["id"])
    assert shown.returncode == 0
    assert "unknown_user" in shown.stdout and '"session_id": "s1"' in shown.stdout
    # Usage errors and misses, in-process (no need for a process each).
    assert in_process(stack, monkeypatch, capsys, "dlq", "show", "1-1")[0] == 1
    for action in ("show", "retry"):  # not an id at all: a usage error, not a traceback
        assert in_process(stack, monkeypatch, capsys, "dlq", action, "garbage")[0] == 2
    assert in_process(stack, monkeypatch, capsys, "dlq", "retry")[0] == 2
    assert in_process(stack, monkeypatch, capsys, "dlq", "retry", letter["id"], "--all")[0] == 2
    code, table, _ = in_process(stack, monkeypatch, capsys, "dlq", "list")
    assert code == 0 and letter["id"] in table and "unknown_user" in table

    # Fix the cause, retry, and the running worker applies the event.
    register(stack, "dora", "eve")
    retried = stack.cli("dlq", "retry", letter["id"])
    assert retried.returncode == 0, retried.stderr
    assert retried.stdout.startswith(f"retried {letter['id']} as entry ")
    wait_for(lambda: stack.redis.hget(keys.user("dora"), "session") == b"s1")
    assert stack.redis.xlen(keys.dlq) == 0

    # An auth request's letter cannot be retried; purge needs confirmation.
    request = Entry(keys.auth_requests, "1-0", b'{"request_id": "x", "op": "login"}')
    dead_letter(stack.redis, keys.dlq, request, "invalid_request", "request_id must be a UUID")
    all_ = stack.cli("dlq", "retry", "--all")
    assert all_.returncode == 1
    assert "password was removed" in all_.stderr
    assert "retried 0 letter(s), 1 not retryable" in all_.stdout
    assert stack.cli("dlq", "purge").returncode == 2  # stdin is not a terminal: no prompt
    typo = stack.cli("dlq", "purge", "--reason", "invalid_requests", "--yes")
    assert typo.returncode == 2 and "invalid choice: 'invalid_requests'" in typo.stderr
    assert stack.redis.xlen(keys.dlq) == 1
    purged = stack.cli("dlq", "purge", "--reason", "invalid_request", "--yes")
    assert purged.returncode == 0 and purged.stdout.strip() == "deleted 1 dead letter(s)"
    assert stack.redis.xlen(keys.dlq) == 0


def test_acl_prints_one_setuser_line_per_role(stack: Stack) -> None:
    text = stack.cli("acl")
    assert text.returncode == 0
    lines = text.stdout.splitlines()
    assert [line.split()[2] for line in lines] == [
        f"{stack.prefix}-{role}" for role in ("matchmaking", "game-server", "auth-client", "worker")
    ]
    assert all(line.startswith("ACL SETUSER ") for line in lines)
    as_json = orjson.loads(stack.cli("acl", "--json", "--user-prefix", "prod-").stdout)
    assert as_json[0]["user"] == "prod-matchmaking"
    assert f"~{stack.prefix}:{{events}}:terminate" in as_json[1]["rules"]
    assert all("+select|0" in role["rules"] for role in as_json)
    # The database the URL names is the one each role may select, and no other.
    url = urlsplit(stack.env["USERMGMT_REDIS_URL"])._replace(path="/5").geturl()
    in_db_5 = stack.cli("acl", "--json", USERMGMT_REDIS_URL=url)
    assert all("+select|5" in role["rules"] for role in orjson.loads(in_db_5.stdout))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["trim", "--retention-s", "nan", "--dry-run"], "argument --retention-s: must be seconds"),
        (["trim", "--retention-s", "inf", "--dry-run"], "argument --retention-s: must be seconds"),
        (["trim", "--retention-s", "-1"], "argument --retention-s: must be seconds"),
        (["leaderboard", "--top", "100000000000000000000"], "argument --top: must be 1 to"),
        (["leaderboard", "--top", "0"], "argument --top: must be 1 to"),
        (["dlq", "list", "--limit", "100000000000000000000"], "argument --limit: must be 1 to"),
        (["simulate", "--games", "100000000000000000000"], "argument --games: must be 0 to"),
        (["simulate", "--players", "100000000000000000000"], "argument --players: must be 1 to"),
        (["simulate", "--players", "lots"], "argument --players: not a whole number"),
    ],
)
def test_out_of_range_numbers_are_usage_errors_naming_the_option(
    capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    # Refused by the parser, before anything is contacted: the entry point runs in-process.
    with pytest.raises(SystemExit) as exited:
        main(args)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_redis_user_without_the_rights_gets_one_line_naming_the_permission(
    stack: Stack,
) -> None:
    # A producer's credentials (the matchmaking role of `usermgmt acl`) used for
    # operator commands: Redis answers NOPERM.
    role = next(r for r in acl.roles(Keys(stack.prefix), user_prefix=f"{stack.prefix}-"))
    assert role.role == "matchmaking"
    stack.redis.execute_command("ACL", "SETUSER", role.user, *role.rules)
    stack.redis.execute_command("ACL", "SETUSER", role.user, "on", ">acl-test-password-1")
    try:
        parts = urlsplit(stack.env["USERMGMT_REDIS_URL"])
        url = urlunsplit(parts._replace(netloc=f"{role.user}:acl-test-password-1@{parts.netloc}"))
        for command, missing in (("health", "'scan' command"), ("status", "'xlen' command")):
            result = stack.cli(command, USERMGMT_REDIS_URL=url)
            assert result.returncode == 1, (command, result.stderr)
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1, (command, result.stderr)
            assert "refused a command for lack of permission" in lines[0]
            assert missing in lines[0] and role.user in lines[0]
            assert "acl-test-password-1" not in lines[0]
    finally:
        stack.redis.execute_command("ACL", "DELUSER", role.user)
