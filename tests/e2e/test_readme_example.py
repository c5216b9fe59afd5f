"""The README's Python example, run as printed against a real worker (only its Redis
URL and key prefix swapped for the test's): both events apply, nothing is
dead-lettered, and the wrong password prints `invalid_credentials`."""

from __future__ import annotations

import re
import sqlite3
import subprocess
import sys

from tests.conftest import REDIS_URL
from tests.e2e.conftest import REPO, Stack, wait_for


def readme_example() -> str:
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    (example,) = [block for block in blocks if "Publisher(redis)" in block]
    return example


def test_the_readme_python_example_applies_its_game_with_no_dead_letter(stack: Stack) -> None:
    example = readme_example()
    for printed in ('"redis://localhost:6379/0"', "Publisher(redis)", "AuthClient(redis,"):
        assert printed in example, printed
    source = (
        example.replace('"redis://localhost:6379/0"', repr(REDIS_URL))
        .replace("Publisher(redis)", f"Publisher(redis, prefix={stack.prefix!r})")
        .replace("AuthClient(redis,", f"AuthClient(redis, prefix={stack.prefix!r},")
    )
    worker = stack.start_worker("--consumer", "readme")
    try:
        ran = subprocess.run(
            [sys.executable, "-c", source],
            env=stack.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert ran.returncode == 0, ran.stderr
        assert ran.stdout.split() == ["invalid_credentials"]
        path = stack.database_url.removeprefix("sqlite:///")

        def results() -> list[tuple[str, int, int, int]]:
            with sqlite3.connect(path) as db:
                return db.execute(
                    "SELECT u.username, s.win_count, s.loss_count, u.wallet FROM users u "
                    "JOIN stats s ON s.user_id = u.id ORDER BY u.username"
                ).fetchall()

        wait_for(lambda: results() == [("alice", 1, 0, 150), ("bob", 0, 1, 0)], timeout=30)
        assert stack.redis.xlen(f"{stack.prefix}:dlq") == 0
    finally:
        assert stack.stop_worker(worker) == 0
