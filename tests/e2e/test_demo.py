"""The demo driver end to end, with a tiny load.

`make demo` = `python -m usermgmt.workers.sim.demo`.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REDIS_URL, _real_redis
from tests.e2e.conftest import REPO
from usermgmt.persistence import standings
from usermgmt.persistence.db import make_engine
from usermgmt.workers.runtime.connections import REDIS_ERRORS, make_redis

pytestmark = pytest.mark.e2e

SMALL = ["--players", "8", "--games", "20", "--players-per-game", "2", "--seed", "3"]


def run_demo(
    tmp_path: Path, redis_url: str, *args: str, path: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "USERMGMT_REDIS_URL": redis_url,
        "PYTHONPATH": str(REPO),
        "PATH": path if path is not None else os.environ.get("PATH", ""),
    }
    return subprocess.run(
        [sys.executable, "-m", "usermgmt.workers.sim.demo", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def figure(output: str, label: str) -> int:
    match = re.search(rf"^\s*{re.escape(label)}\s+([\d,]+)", output, re.MULTILINE)
    assert match, f"no {label!r} in the output"
    return int(match.group(1).replace(",", ""))


def unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_demo_runs_the_whole_loop_on_the_machines_redis(tmp_path: Path) -> None:
    database = tmp_path / "demo.db"
    database.write_text("left over from an earlier run")  # the demo starts afresh
    result = run_demo(tmp_path, REDIS_URL, *SMALL, "--database", str(database))
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "(already running)" in out
    assert "bcrypt cost 4" in out  # the demo says it uses a cheap hash
    assert "Top 10" in out
    assert "worker stopped with SIGTERM, exit code 0" in out
    assert "all 8 players match" in out

    published = figure(out, "events published")
    assert figure(out, "events applied") == published > 20
    assert figure(out, "dead-lettered") == 0

    engine = make_engine(f"sqlite:///{database}")
    try:
        assert standings.count_players(engine) == 8
        assert standings.count_applied_events(engine) == published
        top = standings.top(engine, 10)
    finally:
        engine.dispose()
    shown = [
        line.split()[1] for line in out.splitlines() if re.match(r"^\s+\d+\s+player\d{4}", line)
    ]
    assert shown == [row.username for row in top]

    # Its keys lived under a prefix of its own, removed at the end.
    prefix = re.search(r"keys under (demo-[0-9a-f]+):\*", out)
    assert prefix
    redis = _real_redis()
    try:
        assert list(redis.scan_iter(match=f"{prefix.group(1)}:*")) == []
    finally:
        redis.close()


def test_demo_starts_a_private_redis_when_none_answers(tmp_path: Path) -> None:
    nowhere = f"redis://127.0.0.1:{unused_port()}/0"
    result = run_demo(tmp_path, nowhere, *SMALL, "--database", str(tmp_path / "demo.db"))
    assert result.returncode == 0, result.stdout + result.stderr
    started = re.search(
        r"redis://127\.0\.0\.1:(\d+)/0 \(private redis-server \(pid (\d+)\)", result.stdout
    )
    assert started, result.stdout
    assert "all 8 players match" in result.stdout
    # ...and stops it at the end.
    with pytest.raises(ProcessLookupError):
        os.kill(int(started.group(2)), 0)
    client = make_redis(f"redis://127.0.0.1:{started.group(1)}/0")
    try:
        with pytest.raises(REDIS_ERRORS):
            client.ping()
    finally:
        client.close()


def test_demo_without_redis_or_redis_server_says_how_to_get_it(tmp_path: Path) -> None:
    nowhere = f"redis://127.0.0.1:{unused_port()}/0"
    empty_path = tmp_path / "bin"
    empty_path.mkdir()
    result = run_demo(tmp_path, nowhere, *SMALL, path=str(empty_path))
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "redis-server is not installed" in lines[0]
    assert "install Redis" in lines[0] and "USERMGMT_REDIS_URL" in lines[0]
    assert not (tmp_path / "demo.db").exists()


def test_ctrl_c_while_players_register_ends_the_demo_at_once_and_cleans_up(
    tmp_path: Path,
) -> None:
    """Ctrl-C reaches the whole process group, the demo's worker too: the registrations
    in flight then never get a reply, and the demo used to wait out their 30 s timeout."""
    env = {**os.environ, "USERMGMT_REDIS_URL": REDIS_URL, "PYTHONPATH": str(REPO)}
    args = ["--players", "2000", "--games", "10", "--bcrypt-rounds", "12"]
    demo = subprocess.Popen(
        [sys.executable, "-m", "usermgmt.workers.sim.demo", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert demo.stdout is not None
    prefix = None
    for line in demo.stdout:  # the banner, then the worker's start
        if match := re.search(r"keys under ([\w-]+):\*", line):
            prefix = match.group(1)
        if line.startswith("worker started"):
            break
    assert prefix is not None
    time.sleep(2)  # registering: at cost 12, 2,000 players take minutes
    os.killpg(demo.pid, signal.SIGINT)
    started = time.monotonic()
    _, err = demo.communicate(timeout=60)
    took = time.monotonic() - started
    assert demo.returncode == 1 and "demo: interrupted" in err, err
    assert took < 15, f"the demo took {took:.1f} s to stop"
    redis = _real_redis()
    try:
        assert list(redis.scan_iter(match=f"{prefix}:*", count=1000)) == []
    finally:
        redis.close()
