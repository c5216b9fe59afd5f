"""`make demo` (`python -m usermgmt.workers.sim.demo`): the whole loop on one machine.

Uses the Redis at USERMGMT_REDIS_URL when one answers (under a private key
prefix, removed at the end) or starts a private `redis-server`; migrates a fresh
SQLite file; starts `usermgmt worker` as a separate process; registers players and
publishes simulated games; waits until both event streams are drained; prints the
top of the leaderboard and a summary, checks every player's totals against what
was published, and stops the worker with SIGTERM (expecting exit code 0).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from redis import Redis

from usermgmt.persistence import standings
from usermgmt.persistence.db import current_revision, make_engine, upgrade
from usermgmt.persistence.keys import EVENTS_GROUP, Keys
from usermgmt.workers.cli.tables import (
    leaderboard_table,
    progress_report,
    stdout_console,
    summary_table,
)
from usermgmt.workers.runtime.connections import REDIS_ERRORS, make_redis, safe_url
from usermgmt.workers.runtime.redis_info import group_infos
from usermgmt.workers.runtime.settings import ConfigError, load_settings
from usermgmt.workers.sim.matchmaker import Expected, SimConfig
from usermgmt.workers.sim.players import NoWorker
from usermgmt.workers.sim.simulate import SimulationReport, run_simulation

DEMO_PASSWORD = "demo-password"  # noqa: S105 - the documented password of the demo's players
CONSUMER = "demo-worker"


class DemoFailed(Exception):
    """The demo cannot go on; the message is one line for a person."""


def events_drained(redis: Redis, keys: Keys) -> bool:
    """Both event streams fully delivered to `usermgmt-events` and acked (lag 0, pending 0)."""
    for stream in (keys.update_stream, keys.terminate_stream):
        groups = group_infos(redis, stream, with_consumers=False)
        group = next((g for g in groups if g.name == EVENTS_GROUP), None)
        if group is None or group.lag != 0 or group.pending != 0:
            return False
    return True


# -- Redis ------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _answers(url: str) -> str | None:
    """None when Redis answers at `url`, else why not."""
    client = make_redis(url)
    try:
        client.ping()
    except REDIS_ERRORS as exc:
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    finally:
        client.close()
    return None


@contextmanager
def redis_for_demo(url: str) -> Iterator[tuple[str, str]]:
    """(URL, how it was found): the given Redis if it answers, else a private one."""
    reason = _answers(url)
    if reason is None:
        yield url, "already running"
        return
    binary = shutil.which("redis-server")
    if binary is None:
        raise DemoFailed(
            f"no Redis answers at {safe_url(url)} ({reason}) and redis-server is not installed; "
            "install Redis (e.g. `apt-get install redis-server` or `brew install redis`) "
            "or set USERMGMT_REDIS_URL to a running one"
        )
    port = _free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    private = f"redis://127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + 10
        while _answers(private) is not None:
            if process.poll() is not None or time.monotonic() > deadline:
                raise DemoFailed(f"the private redis-server on port {port} did not start")
            time.sleep(0.05)
        yield private, f"private redis-server (pid {process.pid}), stopped at the end"
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def delete_prefix(redis: Redis, prefix: str) -> None:
    """Remove every key under the demo's own prefix (nothing else)."""
    batch: list[Any] = []
    for key in redis.scan_iter(match=f"{prefix}:*", count=1000):
        batch.append(key)
        if len(batch) >= 500:
            redis.delete(*batch)
            batch.clear()
    if batch:
        redis.delete(*batch)


# -- the worker -------------------------------------------------------------------------


@dataclass
class WorkerProcess:
    process: subprocess.Popen[bytes]
    log: IO[bytes]
    log_path: Path

    def tail(self, lines: int = 15) -> str:
        self.log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then the exit code (the worker drains the batch in hand first)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise DemoFailed(f"the worker did not stop within {timeout:g} s of SIGTERM") from None


def start_worker(env: dict[str, str], log_dir: Path) -> WorkerProcess:
    log_path = log_dir / "worker.log"
    log = log_path.open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "usermgmt.workers.cli.main", "worker", "--consumer", CONSUMER],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    return WorkerProcess(process, log, log_path)


def wait_until(what: str, condition: Any, worker: WorkerProcess, timeout: float) -> float:
    """Poll `condition()` while the worker lives; returns the seconds it took."""
    started = time.monotonic()
    while not condition():
        if worker.process.poll() is not None:
            raise DemoFailed(
                f"the worker exited with code {worker.process.returncode} while {what}; "
                f"its last log lines:\n{worker.tail()}"
            )
        if time.monotonic() - started > timeout:
            raise DemoFailed(f"timed out after {timeout:g} s {what}")
        time.sleep(0.05)
    return time.monotonic() - started


# -- the run ----------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m usermgmt.workers.sim.demo",
        description="Run the whole loop: worker, simulated traffic, leaderboard, clean stop.",
    )
    parser.add_argument("--players", type=int, default=200, metavar="N", help="default 200")
    parser.add_argument("--games", type=int, default=2000, metavar="N", help="default 2000")
    parser.add_argument(
        "--players-per-game", type=int, default=4, metavar="N", help="roster size (default 4)"
    )
    parser.add_argument("--seed", type=int, default=42, metavar="N", help="default 42")
    parser.add_argument(
        "--database",
        default="demo.db",
        metavar="PATH",
        help="SQLite file, removed and recreated (default ./demo.db)",
    )
    parser.add_argument(
        "--bcrypt-rounds",
        type=int,
        default=4,
        metavar="N",
        help="bcrypt cost for the demo's accounts (default 4, for speed; the product's is 12)",
    )
    parser.add_argument(
        "--timeout", type=float, default=300, metavar="S", help="give up after S seconds per step"
    )
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    config = SimConfig(
        players=args.players, games=args.games, per_game=args.players_per_game, seed=args.seed
    )
    problems = config.problems()
    if not 4 <= args.bcrypt_rounds <= 31:
        problems.append("--bcrypt-rounds must be 4-31")
    if problems:
        raise DemoFailed("; ".join(problems))
    settings = load_settings()
    database = Path(args.database).resolve()
    database_url = f"sqlite:///{database}"
    prefix = f"demo-{uuid.uuid4().hex[:6]}"
    console = stdout_console()
    started = time.monotonic()
    with ExitStack() as stack:
        url, origin = stack.enter_context(redis_for_demo(settings.redis_url))
        redis = make_redis(url)
        stack.callback(redis.close)
        stack.callback(delete_prefix, redis, prefix)
        print("usermgmt demo")
        print(f"  redis     {safe_url(url)} ({origin}); keys under {prefix}:*")
        print(f"  database  {database_url} (fresh)")
        print(
            f"  accounts  bcrypt cost {args.bcrypt_rounds} so registering is quick "
            "(a demo setting; the default cost is 12)"
        )

        fresh_database(database, database_url)

        env = {
            **os.environ,
            "USERMGMT_REDIS_URL": url,
            "USERMGMT_DATABASE_URL": database_url,
            "USERMGMT_KEY_PREFIX": prefix,
            "USERMGMT_BCRYPT_ROUNDS": str(args.bcrypt_rounds),
            "USERMGMT_LOG_FORMAT": "json",
        }
        log_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="usermgmt-demo-")))
        worker = start_worker(env, log_dir)
        stack.callback(worker.log.close)
        stack.callback(_kill_if_running, worker)
        keys = Keys(prefix)
        wait_until(
            "starting",
            lambda: redis.exists(keys.heartbeat(CONSUMER)),
            worker,
            args.timeout,
        )
        print(f"worker started (pid {worker.process.pid}, consumer {CONSUMER})")

        sim_started = time.monotonic()
        with progress_report(sys.stdout) as progress:
            try:
                report = run_simulation(redis, keys, config, DEMO_PASSWORD, progress=progress)
            except NoWorker as exc:
                raise DemoFailed(str(exc)) from None
        publish_started = sim_started + report.registered.elapsed
        drain_wait = wait_until(
            "waiting for the streams to drain",
            lambda: events_drained(redis, keys),
            worker,
            args.timeout,
        )
        drained_at = time.monotonic()
        print(f"streams drained {drain_wait:.1f} s after the last event was published")

        # Stopped first: a stopping worker leaves the leaderboard table exact.
        code = worker.stop()
        if code != 0:
            raise DemoFailed(
                f"the worker exited with code {code}; last log lines:\n{worker.tail()}"
            )
        engine = make_engine(database_url)
        stack.callback(engine.dispose)
        total = standings.count_players(engine)
        console.print(leaderboard_table(standings.top(engine, 10), total, title="Top 10"))
        applied = standings.count_applied_events(engine)
        dead = int(redis.xlen(keys.dlq))
        mismatches = compare_totals(
            standings.player_totals(engine), report.expected, settings.starting_wallet
        )

        elapsed = drained_at - publish_started
        check = (
            f"all {total:,} players match"
            if not mismatches
            else f"{len(mismatches):,} players differ: {', '.join(mismatches[:3])}"
        )
        console.print(
            summary_table(
                "Summary",
                [
                    *summary_rows(report, applied, dead, elapsed),
                    ("check against the published results", check),
                ],
            )
        )
        print(f"worker stopped with SIGTERM, exit code {code}")
        if mismatches or applied != report.published.events or dead:
            raise DemoFailed("the database does not match the published traffic (see above)")
    print(f"demo finished in {time.monotonic() - started:.1f} s; the database stays in {database}")
    print(f"  look around: {_usermgmt()} leaderboard --database {database_url} --around player0001")


def fresh_database(path: Path, url: str) -> None:
    """Remove the SQLite file (and its WAL files) and migrate a new one."""
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    upgrade(url)
    print(f"migrated the database to revision {current_revision(url)}")


def summary_rows(
    report: SimulationReport, applied: int, dead: int, elapsed: float
) -> list[tuple[str, str]]:
    """The figures of the closing summary."""
    registered, expected = report.registered, report.expected
    return [
        ("players", f"{registered.created:,} registered in {registered.elapsed:.1f} s"),
        ("games", f"{expected.games:,} ({expected.aborted:,} aborted)"),
        ("events published", f"{report.published.events:,}"),
        ("events applied", f"{applied:,}"),
        ("dead-lettered", f"{dead:,}"),
        ("elapsed (publish → drained)", f"{elapsed:.2f} s"),
        ("events/s", f"{applied / elapsed:,.0f}" if elapsed > 0 else "-"),
    ]


def compare_totals(
    actual: dict[str, tuple[int, int, int, int]], expected: Expected, starting_wallet: int = 0
) -> list[str]:
    """Names of players whose (wins, losses, earnings, wallet) differ from the simulation's."""
    wrong = []
    for name, totals in expected.players.items():
        want = (totals.wins, totals.losses, totals.earnings, starting_wallet + totals.earnings)
        if actual.get(name) != want:
            wrong.append(name)
    return sorted(wrong)


def _usermgmt() -> str:
    """How to call `usermgmt` from here: the venv's script when it is not on PATH."""
    script = Path(sys.executable).parent / "usermgmt"
    if shutil.which("usermgmt") == str(script) or not script.exists():
        return "usermgmt"
    try:
        return shlex.quote(str(script.relative_to(Path.cwd())))
    except ValueError:
        return shlex.quote(str(script))


def _kill_if_running(worker: WorkerProcess) -> None:
    if worker.process.poll() is None:
        worker.process.kill()
        worker.process.wait()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except ConfigError as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return 2
    except DemoFailed as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("demo: interrupted", file=sys.stderr)
        # Ctrl-C stopped the worker too: registrations in flight would each wait out
        # their reply timeout (30 s) before the interpreter could exit.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
