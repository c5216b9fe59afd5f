"""End-to-end fixtures: the real `usermgmt` CLI as processes, talking only through Redis."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from redis import Redis

from tests.conftest import REDIS_URL, _delete_prefix, _real_redis

USERMGMT = [sys.executable, "-m", "usermgmt.workers.cli.main"]
REPO = Path(__file__).resolve().parents[2]


@dataclass
class Stack:
    """Environment for CLI processes: a fresh SQLite file, a private key prefix."""

    env: dict[str, str]
    redis: Redis
    prefix: str
    database_url: str
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def cli(self, *args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
        """Run `usermgmt ARGS` to completion, capturing output."""
        return subprocess.run(
            [*USERMGMT, *args],
            env={**self.env, **env},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def start_worker(self, *args: str, **env: str) -> subprocess.Popen[bytes]:
        """Start `usermgmt worker ARGS` in the background (stderr kept for inspection)."""
        process = subprocess.Popen(
            [*USERMGMT, "worker", *args],
            env={**self.env, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.workers.append(process)
        return process

    def close(self) -> None:
        """Kill the workers still running and close their pipes."""
        for process in self.workers:
            if process.poll() is None:
                process.kill()
                process.wait()
            for stream in (process.stdout, process.stderr):
                if stream is not None:
                    stream.close()

    def stop_worker(self, process: subprocess.Popen[bytes], timeout: float = 30) -> int:
        """SIGTERM, then wait for the exit code."""
        process.send_signal(signal.SIGTERM)
        return process.wait(timeout=timeout)


def wait_for(condition, timeout: float = 30.0, interval: float = 0.05):  # type: ignore[no-untyped-def]
    """Poll `condition()` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


@pytest.fixture
def stack(tmp_path: Path, prefix: str) -> Iterator[Stack]:
    """A migrated SQLite database and a prefix on the real Redis, cleaned up afterwards."""
    redis = _real_redis()
    database_url = f"sqlite:///{tmp_path / 'usermgmt.db'}"
    env = {
        **os.environ,
        "USERMGMT_REDIS_URL": REDIS_URL,
        "USERMGMT_DATABASE_URL": database_url,
        "USERMGMT_KEY_PREFIX": prefix,
        "USERMGMT_BCRYPT_ROUNDS": "4",
        "USERMGMT_LOG_FORMAT": "json",
        "USERMGMT_RETRY_DELAY_MS": "50",
        "PYTHONPATH": str(REPO),
    }
    built = Stack(env=env, redis=redis, prefix=prefix, database_url=database_url)
    migrated = built.cli("migrate")
    assert migrated.returncode == 0, migrated.stderr
    yield built
    built.close()
    _delete_prefix(redis, prefix)
    redis.close()
