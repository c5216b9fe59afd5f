"""`make soak`: the event worker under real producers, crashes and Redis restarts.

Phase 1 runs one `usermgmt worker --only events` on SQLite, phase 2 two of them on
PostgreSQL (a private database, dropped afterwards). In each phase 4 producers
(threads, each with its own Redis connection and its own slice of the players)
publish real games in MULTI/EXEC bursts of 1..500 entries without ever waiting for
the clock, reusing players the moment their game's terminate is published, with
hostile entries mixed in. Meanwhile the workers are SIGKILLed at random moments and
restarted at once (a kill waits until something was acked since the previous one:
kills in a row before any batch could finish are a crash loop, which
USERMGMT_MAX_DELIVERIES dead-letters by design), and a private redis-server (AOF,
fsync always) is shut down and started again. Once the streams are drained the tables
and the dead-letter stream are compared with a model computed from the published
history alone, and the caches (user hashes, leaderboard scores, session hashes) with
the tables (`bench.soak_caches`).

Exit 1 when an event was lost or applied twice, a hostile entry got the wrong
dead-letter reason (or none), a cache differs from the tables, or a worker crashed.
Tables go to the terminal and to bench/results/soak-latest.md.

    python -m bench.soak                       # 200,000 events + 10,000 hostile per phase
    python -m bench.soak --events 20000 --hostile 1000 --kills 4 --skip-postgres
"""

from __future__ import annotations

import argparse
import bisect
import os
import platform
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import sqlalchemy as sa
from redis import Redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from bench.soak_caches import cache_mismatches
from bench.soak_history import Credit, Entry, Producer, id_key
from usermgmt.domain.payloads import text_of
from usermgmt.persistence.db import make_engine
from usermgmt.persistence.keys import EVENTS_GROUP, Keys
from usermgmt.persistence.models import LeaderboardEntry, Stats, User, utcnow

RESULTS = Path(__file__).resolve().parent / "results" / "soak-latest.md"
USERMGMT = Path(sys.executable).parent / "usermgmt"
PREFIX = "soak"
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
BYSTANDERS = 8  # registered players never put in a game: the "not in roster" results
POLL_S = 0.02
STARTUP_S = 0.5  # a worker this young may not have its signal handlers yet (`WorkerPool.stop`)


class SoakError(Exception):
    """A phase could not be run to the end; the message is one line for a person."""


def log(message: str) -> None:
    print(f"[soak] {message}", flush=True)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def client(port: int, timeout: float = 10.0) -> Redis:
    """A loopback client that never retries by itself: a retried MULTI/EXEC whose reply
    was lost would publish its burst twice."""
    return Redis(
        host="127.0.0.1",
        port=port,
        retry=Retry(NoBackoff(), 0),
        socket_timeout=timeout,
        socket_connect_timeout=2,
    )


# -- Redis ---------------------------------------------------------------------------------


class RedisServer:
    """A private redis-server on a loopback port: AOF with fsync always, no RDB."""

    def __init__(self, directory: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SoakError("redis-server is not installed (Debian: apt-get install redis-server)")
        self.binary = binary
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.restarts = 0

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--protected-mode",
                "yes",
                "--dir",
                str(self.directory),
                "--logfile",
                str(self.directory / "redis.log"),
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C reaches us, and we stop it
        )
        probe = client(self.port, timeout=2)
        deadline = time.monotonic() + 60
        try:
            while True:
                try:
                    probe.ping()  # refused while the AOF loads
                    return
                except RedisError:
                    if self.process.poll() is not None or time.monotonic() > deadline:
                        raise SoakError(
                            f"redis-server on port {self.port} did not start "
                            f"(log: {self.directory / 'redis.log'})"
                        ) from None
                    time.sleep(0.02)
        finally:
            probe.close()

    def restart(self) -> None:
        """SHUTDOWN (AOF flushed), then start again on the same port and directory."""
        assert self.process is not None
        probe = client(self.port)
        try:
            probe.shutdown()
        except RedisError:
            self.process.send_signal(signal.SIGTERM)  # also a clean shutdown for Redis
        finally:
            probe.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            raise SoakError("redis-server did not shut down within 30 s") from None
        self.restarts += 1
        self.start()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


# -- PostgreSQL ----------------------------------------------------------------------------


class PrivateDatabase:
    """A database of our own on the PostgreSQL server, created and dropped by us."""

    def __init__(self, admin_url: str) -> None:
        url = sa.make_url(admin_url)
        if url.host not in LOOPBACK:
            raise SoakError(f"PostgreSQL must be on a loopback address, not {url.host!r}")
        self.url = url
        self.name = f"usermgmt_soak_{secrets.token_hex(4)}"
        self.user: str | None = None
        self.version = "?"

    def _connect(self, user: str) -> Any:
        import psycopg

        return psycopg.connect(
            host=self.url.host,
            port=self.url.port or 5432,
            user=user,
            password=self.url.password,
            dbname=self.url.database or "postgres",
            autocommit=True,
            connect_timeout=5,
        )

    def _admin(self) -> Any:
        import psycopg

        users = [self.user] if self.user else [self.url.username or "postgres"]
        if not self.user and users[0] == "postgres":
            users.append("root")
        failure: Exception | None = None
        for user in users:
            assert user is not None
            try:
                conn = self._connect(user)
            except psycopg.Error as exc:
                failure = exc
                continue
            self.user = user
            return conn
        raise SoakError(f"cannot reach PostgreSQL at {self.url.host}: {failure}")

    def create(self) -> str:
        from psycopg import sql

        with self._admin() as conn:
            self.version = conn.execute("SHOW server_version").fetchone()[0]
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.name)))
        return sa.URL.create(
            "postgresql",
            username=self.user,
            password=self.url.password,
            host=self.url.host,
            port=self.url.port or 5432,
            database=self.name,
        ).render_as_string(hide_password=False)

    def drop(self) -> None:
        from psycopg import sql

        with self._admin() as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(self.name))
            )


# -- workers -------------------------------------------------------------------------------


@dataclass
class Crash:
    consumer: str
    code: int
    when: str
    log_tail: str


class WorkerPool:
    """`usermgmt worker --only events` processes with fixed consumer names."""

    def __init__(self, count: int, env: dict[str, str], work: Path) -> None:
        self.names = [f"soak-w{i + 1}" for i in range(count)]
        self.env = env
        self.work = work
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.started: dict[str, float] = {}  # monotonic time of each one's last start
        self.kills = 0
        self.crashes: list[Crash] = []

    def log_path(self, name: str) -> Path:
        return self.work / f"{name}.log"

    def start(self, name: str) -> None:
        with self.log_path(name).open("ab") as log_file:
            self.processes[name] = subprocess.Popen(
                [str(USERMGMT), "worker", "--only", "events", "--consumer", name],
                env=self.env,
                cwd=self.work,  # no stray .env file changes the settings
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # signals come from us only
            )
        self.started[name] = time.monotonic()

    def start_all(self) -> None:
        for name in self.names:
            self.start(name)

    def kill(self, name: str) -> None:
        """SIGKILL, then start it again at once under the same consumer name."""
        process = self.processes[name]
        if process.poll() is None:
            process.kill()
            process.wait()
            self.kills += 1
        else:
            self._crashed(name, process.returncode, "before a kill")
        self.start(name)

    def check(self) -> None:
        """A worker that exited by itself is a crash: recorded, then started again."""
        for name, process in list(self.processes.items()):
            code = process.poll()
            if code is not None:
                self._crashed(name, code, "while running")
                self.start(name)

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM every worker; each must finish its batch and exit 0.

        No program acts on a signal before its first line runs: while Python starts (20-30
        ms here) SIGTERM kills a worker with -15. The last kill may have come after the
        last ack (the streams then drain at once), so every worker gets `STARTUP_S` of
        life first.
        """
        youngest = max(self.started.values(), default=0.0)
        time.sleep(max(0.0, youngest + STARTUP_S - time.monotonic()))
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for name, process in self.processes.items():
            try:
                code = process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                self._crashed(name, -9, f"still running {timeout:g} s after SIGTERM")
                continue
            if code != 0:
                self._crashed(name, code, "on SIGTERM")

    def kill_all(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()

    def _crashed(self, name: str, code: int, when: str) -> None:
        lines = self.log_path(name).read_text(errors="replace").splitlines()
        self.crashes.append(Crash(name, code, when, "\n".join(lines[-12:])))
        log(f"worker {name} exited with {code} {when}; log tail:\n" + "\n".join(lines[-12:]))


def worker_env(redis_url: str, database_url: str, extra: list[str]) -> dict[str, str]:
    """The environment without any USERMGMT_* of the caller's, plus ours."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("USERMGMT_")}
    env.update(
        USERMGMT_REDIS_URL=redis_url,
        USERMGMT_DATABASE_URL=database_url,
        USERMGMT_KEY_PREFIX=PREFIX,
        USERMGMT_LOG_FORMAT="json",
        USERMGMT_LOG_LEVEL="warning",
    )
    for item in extra:
        name, _, value = item.partition("=")
        env[name] = value
    return env


def migrate(env: dict[str, str], work: Path) -> None:
    try:
        done = subprocess.run(
            [str(USERMGMT), "migrate"],
            env=env,
            cwd=work,
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
    except subprocess.TimeoutExpired:
        raise SoakError("usermgmt migrate did not finish within 120 s") from None
    if done.returncode != 0:
        raise SoakError(f"usermgmt migrate failed: {(done.stderr or done.stdout).strip()}")


def register(database_url: str, wallets: dict[str, int]) -> None:
    """Players straight into SQL (no bcrypt: they never log in), with their wallets."""
    engine = make_engine(database_url)
    try:
        now = utcnow()
        with engine.begin() as conn:
            conn.execute(
                sa.insert(User),
                [
                    {
                        "username": name,
                        "username_key": name.lower(),
                        "password_hash": "x" * 60,
                        "wallet": wallet,
                        "created_at": now,
                    }
                    for name, wallet in wallets.items()
                ],
            )
            users = conn.execute(sa.select(User.id)).scalars().all()
            conn.execute(
                sa.insert(Stats),
                [{"user_id": uid, "win_count": 0, "loss_count": 0, "earnings": 0} for uid in users],
            )
            stats = conn.execute(sa.select(Stats.id)).scalars().all()
            conn.execute(
                sa.insert(LeaderboardEntry),
                [{"stats_id": sid, "rank": 1, "earnings": 0} for sid in stats],
            )
    finally:
        engine.dispose()


# -- progress --------------------------------------------------------------------------------


@dataclass
class Progress:
    delivered: int  # published entries up to the group's last-delivered-id, both streams
    pending: int
    lag: int  # published entries the group has not delivered yet
    drained: bool  # nothing pending, everything delivered (up to the last entry id)


def read_progress(redis: Redis, keys: Keys, producers: list[Producer]) -> Progress | None:
    """The events group on both streams, or None while Redis is away.

    Counted against the producers' own entry ids: Redis 7.0 reports `entries-read` and
    `lag` as nil once it has restarted from its AOF.
    """
    kinds = ("update", "terminate")
    try:
        pipe = redis.pipeline(transaction=False)
        for kind in kinds:
            pipe.xinfo_groups(keys.event_stream(kind))
            pipe.xinfo_stream(keys.event_stream(kind))
        replies = pipe.execute(raise_on_error=False)
    except RedisError:
        return None
    delivered = pending = lag = 0
    drained = True
    for index, kind in enumerate(kinds):
        groups, stream = replies[2 * index], replies[2 * index + 1]
        published = sum(len(p.ids[kind]) for p in producers)
        group = None
        if not isinstance(groups, Exception) and not isinstance(stream, Exception):
            group = next((g for g in groups if text_of(g["name"]) == EVENTS_GROUP), None)
        if group is None:  # no stream or no group yet, or Redis went away in between
            lag += published
            drained = False
            continue
        last = text_of(group["last-delivered-id"])
        mark = id_key(last)
        done = sum(bisect.bisect_right(p.ids[kind], mark) for p in producers)
        delivered += done
        lag += published - done
        pending += int(group["pending"])
        caught_up = last == text_of(stream["last-generated-id"])
        drained = drained and int(group["pending"]) == 0 and caught_up
    return Progress(delivered, pending, lag, drained)


# -- one phase --------------------------------------------------------------------------------


@dataclass
class Plan:
    label: str
    backend: str  # sqlite | postgresql
    workers: int
    seed: int


@dataclass
class Outcome:
    """Everything a phase measured; `rows` renders it."""

    plan: Plan
    error: str | None = None
    figures: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def run_phase(args: argparse.Namespace, plan: Plan) -> Outcome:
    outcome = Outcome(plan)
    started = time.monotonic()
    halt = threading.Event()
    rng = random.Random(plan.seed)
    with ExitStack() as stack:
        work = Path(tempfile.mkdtemp(prefix=f"usermgmt-soak-{plan.backend}-"))
        if args.keep:
            log(f"{plan.label}: work directory {work} (kept)")
        else:
            stack.callback(shutil.rmtree, work, True)
        redis = RedisServer(work / "redis")
        stack.callback(redis.stop)
        redis.start()
        redis_url = f"redis://127.0.0.1:{redis.port}/0"
        if plan.backend == "sqlite":
            database_url = f"sqlite:///{work / 'soak.db'}"
            outcome.figures["database"] = "SQLite (temp file)"
        else:
            private = PrivateDatabase(args.postgres_url)
            if args.keep:
                log(f"{plan.label}: database {private.name} (kept)")
            else:
                stack.callback(private.drop)  # before it exists: DROP ... IF EXISTS
            database_url = private.create()
            outcome.figures["database"] = f"PostgreSQL {private.version} (database {private.name})"
        env = worker_env(redis_url, database_url, args.worker_env)
        migrate(env, work)

        names = [f"soak{i:05d}" for i in range(1, args.players + 1)]
        bystanders = [f"bystander-{i}" for i in range(1, BYSTANDERS + 1)]
        wallets = {name: rng.randint(0, 10_000) for name in names + bystanders}
        register(database_url, wallets)

        pool = WorkerPool(plan.workers, env, work)
        stack.callback(pool.kill_all)
        pool.start_all()

        keys = Keys(PREFIX)
        producers = []
        for index in range(args.producers):
            producers.append(
                Producer(
                    index,
                    names[index :: args.producers],
                    bystanders,
                    share(args.events, args.producers, index),
                    share(args.hostile, args.producers, index),
                    plan.seed * 31 + index,
                    lambda: client(redis.port, timeout=30),
                    keys,
                    halt,
                )
            )
        stack.callback(halt.set)
        watcher = client(redis.port, timeout=5)
        stack.callback(watcher.close)

        total = args.events + args.hostile
        kill_at = sorted(rng.uniform(0.02, 0.97) * total for _ in range(args.kills))
        restart_at = sorted(rng.uniform(0.1, 0.9) for _ in range(args.redis_restarts))
        log(
            f"{plan.label}: {len(names):,} players, {args.producers} producers, "
            f"{plan.workers} worker(s), Redis on port {redis.port}, seed {plan.seed}"
        )
        for producer in producers:
            producer.start()
        phase_start = time.monotonic()
        last_publish: float | None = None
        drained_at: float | None = None
        next_report = phase_start + 5
        progress = Progress(0, 0, 0, False)
        acked_at_kill = -1
        while True:
            now = time.monotonic()
            if now - phase_start > args.timeout:
                outcome.problems.append(
                    f"stopped after {args.timeout:g} s (--timeout): {progress.pending:,} pending, "
                    f"lag {progress.lag:,}, {sum(not p.done for p in producers)} producers busy"
                )
                break
            pool.check()
            for producer in producers:
                if producer.error is not None:
                    raise SoakError(f"producer {producer.index} failed: {producer.error!r}")
            published = sum(p.published for p in producers)
            if last_publish is None and all(p.done for p in producers):
                last_publish = max(p.finished_at or now for p in producers)
                log(f"{plan.label}: last publish after {last_publish - phase_start:.1f} s")
            progress = read_progress(watcher, keys, producers) or progress
            acked = progress.delivered - progress.pending
            # A due kill waits until something was acked since the last one: kills in a row
            # before any batch could finish are a crash loop, which MAX_DELIVERIES is for.
            if kill_at and progress.delivered >= kill_at[0] and acked > acked_at_kill:
                kill_at.pop(0)
                acked_at_kill = acked
                pool.kill(rng.choice(pool.names))
            advance = (min(published, total) + min(progress.delivered, total)) / (2 * total)
            if restart_at and advance >= restart_at[0]:
                restart_at.pop(0)
                log(f"{plan.label}: restarting Redis ({advance:.0%} through)")
                redis.restart()
                continue
            if last_publish is not None:
                if progress.drained and not restart_at:  # a kill left then has nothing to hit
                    drained_at = now
                    break
                if now - last_publish > args.drain_timeout:
                    outcome.problems.append(
                        f"not drained {args.drain_timeout:g} s after the last publish "
                        f"(--drain-timeout): {progress.pending:,} pending, lag {progress.lag:,}"
                    )
                    break
            if now >= next_report:
                next_report = now + 5
                log(
                    f"{plan.label}: {now - phase_start:5.0f} s  published {published:,}/"
                    f"{total:,}  delivered {progress.delivered:,}  pending {progress.pending:,}"
                    f"  kills {pool.kills}/{args.kills}  Redis restarts "
                    f"{redis.restarts}/{args.redis_restarts}"
                )
            time.sleep(POLL_S)
        halt.set()  # after a timeout: let each producer finish the burst in hand
        for producer in producers:
            producer.join(timeout=10)
        pool.stop()
        figures = outcome.figures
        figures["planned"] = (args.kills, args.redis_restarts)
        figures["drain_s"] = (
            None if drained_at is None or last_publish is None else (drained_at - last_publish)
        )
        figures["publish_s"] = (last_publish or time.monotonic()) - phase_start
        figures["kills"] = pool.kills
        figures["redis_restarts"] = redis.restarts
        figures["crashes"] = pool.crashes
        history = [entry for producer in producers for entry in producer.history]
        figures["stream_entries"] = sum(
            int(watcher.xlen(s)) for s in (keys.update_stream, keys.terminate_stream)
        )
        figures["pending_at_end"] = read_pending(watcher, keys)
        letters = read_dead_letters(watcher, keys)
        state = read_database(database_url)
        evaluate(outcome, producers, history, letters, state, wallets)
        figures["cache_mismatches"] = cache_mismatches(watcher, keys, database_url)
    figures["wall_s"] = time.monotonic() - started
    return outcome


def share(total: int, parts: int, index: int) -> int:
    return total // parts + (1 if index < total % parts else 0)


def read_pending(redis: Redis, keys: Keys, count: int = 5) -> list[tuple[str, str, str, int]]:
    """(stream kind, entry id, consumer, deliveries) of the first entries still pending."""
    found = []
    for kind in ("update", "terminate"):
        for item in redis.xpending_range(keys.event_stream(kind), EVENTS_GROUP, "-", "+", count):
            found.append(
                (
                    kind,
                    text_of(item["message_id"]),
                    text_of(item["consumer"]),
                    int(item["times_delivered"]),
                )
            )
    return found


def read_dead_letters(redis: Redis, keys: Keys) -> list[tuple[str, str, str]]:
    """(stream kind, entry id, reason) of every dead letter, oldest first."""
    letters: list[tuple[str, str, str]] = []
    start = "-"
    while True:
        page = redis.xrange(keys.dlq, min=start, max="+", count=2_000)
        if not page:
            return letters
        for _, fields in page:
            letter = orjson.loads(fields[b"payload"])
            kind = str(letter.get("stream", "")).rsplit(":", 1)[-1]
            letters.append((kind, str(letter.get("entry_id")), str(letter.get("reason"))))
        start = f"({text_of(page[-1][0])}"


@dataclass
class DatabaseState:
    processed: set[str]
    totals: dict[str, tuple[int, int, int, int]]  # username -> wins, losses, earnings, wallet
    results_rows: int | None
    live_sessions: int | None


def read_database(database_url: str) -> DatabaseState:
    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            processed = set(
                conn.execute(sa.text("SELECT event_id FROM processed_events")).scalars()
            )
            totals = {
                row[0]: (int(row[1]), int(row[2]), int(row[3]), int(row[4]))
                for row in conn.execute(
                    sa.text(
                        "SELECT u.username, s.win_count, s.loss_count, s.earnings, u.wallet "
                        "FROM users u JOIN stats s ON s.user_id = u.id"
                    )
                )
            }
            results_rows = _count(conn, "SELECT count(*) FROM game_results")
            live = _count(conn, "SELECT count(*) FROM session_players")
    finally:
        engine.dispose()
    return DatabaseState(processed, totals, results_rows, live)


def _count(conn: sa.Connection, query: str) -> int | None:
    """A count from a table of the project's choosing (docs/protocol.md, "SQL tables").

    None if it is not there.
    """
    try:
        with conn.begin_nested():
            return int(conn.execute(sa.text(query)).scalar_one())
    except sa.exc.DBAPIError:
        return None


# -- the model and the comparison ---------------------------------------------------------------


def add_credits(model: dict[str, list[int]], credits: tuple[Credit, ...]) -> None:
    for player, won, earnings in credits:
        totals = model[player]
        totals[0 if won else 1] += 1
        totals[2] += earnings


def evaluate(
    outcome: Outcome,
    producers: list[Producer],
    history: list[Entry],
    letters: list[tuple[str, str, str]],
    state: DatabaseState,
    wallets: dict[str, int],
) -> None:
    f = outcome.figures
    by_entry = {(entry.kind, entry.entry_id): entry for entry in history}
    reasons: dict[tuple[str, str], list[str]] = defaultdict(list)
    dead: dict[str, Counter[str]] = defaultdict(Counter)  # reason -> valid/hostile/other
    for kind, entry_id, reason in letters:
        reasons[(kind, entry_id)].append(reason)
        entry = by_entry.get((kind, entry_id))
        who = "other" if entry is None else "valid" if entry.expect is None else "hostile"
        dead[reason][who] += 1
    valid = [e for e in history if e.expect is None]
    hostile = [e for e in history if e.expect is not None]
    processed = state.processed

    lost = [e for e in valid if e.event_id not in processed]
    applied_and_dead = sum(
        1 for e in valid if e.event_id in processed and (e.kind, e.entry_id) in reasons
    )
    wrong: Counter[str] = Counter()
    wrong_entries: list[tuple[Entry, str]] = []
    for e in hostile:
        got = set(reasons.get((e.kind, e.entry_id), ()))
        if e.event_id is not None and e.event_id in processed:
            what = "applied"
        elif not got:
            what = "not dead-lettered"
        elif got != {e.expect}:
            what = f"{e.expect} as {'/'.join(sorted(got))}"
        else:
            continue
        wrong[what] += 1
        wrong_entries.append((e, what))
    sessions: dict[str, list[Entry]] = defaultdict(list)
    for e in valid:
        sessions[e.session_id].append(e)

    history_model: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    applied_model: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    applied_results = 0
    for e in history:
        if e.kind != "terminate":
            continue
        if e.expect is None:
            add_credits(history_model, e.credits)
        if e.event_id is not None and e.event_id in processed:
            add_credits(applied_model, e.credits)
            applied_results += len(e.credits)
    above = below = differ = 0
    for player, (wins, losses, earnings, wallet) in state.totals.items():
        got = (wins, losses, earnings, wallet - wallets.get(player, 0))
        want = applied_model[player]
        if any(g > w for g, w in zip(got, [*want, want[2]], strict=True)):
            above += 1
        if any(g < w for g, w in zip(got, [*want, want[2]], strict=True)):
            below += 1
        history_want = history_model[player]
        differ += got != (*history_want, history_want[2])
    extra_rows = 0
    if state.results_rows is not None:
        extra_rows = max(0, state.results_rows - applied_results)

    tally = [p.tally for p in producers]
    f.update(
        valid=len(valid),
        updates=sum(1 for e in valid if e.kind == "update"),
        terminates=sum(1 for e in valid if e.kind == "terminate"),
        hostile=len(hostile),
        hostile_kinds=Counter(e.expect for e in hostile),
        games=sum(t.games for t in tally),
        second_updates=sum(t.second_updates for t in tally),
        aborted=sum(t.aborted for t in tally),
        bursts=sum(t.bursts for t in tally),
        rematched=sum(t.rematched_in_burst for t in tally),
        resent=sum(t.resent_bursts for t in tally),
        landed=sum(t.landed_bursts for t in tally),
        applied=len(valid) - len(lost),
        dead={reason: dict(split) for reason, split in sorted(dead.items())},
        lost=len(lost),
        lost_dead=Counter(
            "/".join(reasons[(e.kind, e.entry_id)]) for e in lost if (e.kind, e.entry_id) in reasons
        ),
        lost_examples=[
            f"{e.kind} {e.entry_id} of {e.session_id}: "
            + ("/".join(reasons.get((e.kind, e.entry_id), [])) or "never applied")
            + f"; the session: {_entries(sessions[e.session_id])}"
            for e in lost[:5]
        ],
        pending_examples=[
            f"{kind} {entry_id} (consumer {consumer}, {deliveries} deliveries): "
            + _fate(by_entry.get((kind, entry_id)), processed, reasons)
            for kind, entry_id, consumer, deliveries in f["pending_at_end"]
        ],
        wrong_examples=[
            f"{e.kind} {e.entry_id} ({what}) of {e.session_id or '-'}"
            + (f"; the session: {_entries(sessions[e.session_id])}" if e.session_id else "")
            for e, what in wrong_entries[:5]
        ],
        applied_twice=above + applied_and_dead + extra_rows,
        above=above,
        applied_and_dead=applied_and_dead,
        extra_rows=extra_rows,
        below=below,
        dead_twice=sum(1 for found in reasons.values() if len(found) > 1),
        unmatched_letters=sum(split.get("other", 0) for split in dead.values()),
        wrong=wrong,
        differ=differ,
        players=len(state.totals),
        live_sessions=state.live_sessions,
        anomalies=[a for t in tally for a in t.anomalies],
    )
    if f["stream_entries"] != len(history):
        f["anomalies"].append(
            f"the streams hold {f['stream_entries']:,} entries, the producers published "
            f"{len(history):,}"
        )


def _fate(entry: Entry | None, processed: set[str], reasons: dict[Any, list[str]]) -> str:
    if entry is None:
        return "not a published entry"
    if entry.event_id is not None and entry.event_id in processed:
        return f"already applied ({entry.session_id})"
    if (entry.kind, entry.entry_id) in reasons:
        return "already dead-lettered: " + "/".join(reasons[(entry.kind, entry.entry_id)])
    return f"undecided ({entry.session_id or 'hostile'})"


def _entries(entries: list[Entry]) -> str:
    return ", ".join(f"{e.kind} {e.entry_id}" for e in entries)


# -- the report --------------------------------------------------------------------------------


def rows(outcome: Outcome) -> tuple[list[tuple[str, str, str]], bool]:
    """(figure, value, check) rows and whether the phase failed."""
    f = outcome.figures
    failed = False

    def must_be_zero(value: int) -> str:
        nonlocal failed
        if value:
            failed = True
            return "**FAIL** (must be 0)"
        return "ok (must be 0)"

    if outcome.error is not None:
        return [("phase", f"did not finish: {outcome.error}", "**FAIL**")], True
    kinds = ", ".join(f"{kind} {n:,}" for kind, n in sorted(f["hostile_kinds"].items()))
    mean_burst = (f["valid"] + f["hostile"]) / max(1, f["bursts"])
    out = [
        ("database", f["database"], ""),
        (
            "events published",
            f"{f['valid'] + f['hostile']:,}: valid {f['valid']:,} / hostile {f['hostile']:,}",
            "",
        ),
        (
            "valid events",
            f"{f['updates']:,} updates + {f['terminates']:,} terminates: {f['games']:,} games, "
            f"{f['second_updates']:,} with a roster change, {f['aborted']:,} aborted; "
            f"{f['rematched']:,} players matched again in the burst that ended their game",
            "",
        ),
        ("hostile entries", kinds, ""),
        (
            "publishing",
            f"{f['bursts']:,} MULTI/EXEC bursts (mean {mean_burst:.0f} entries) in "
            f"{f['publish_s']:.1f} s; bursts cut off by a Redis restart: "
            f"{f['resent']} sent again, {f['landed']} had got in",
            "",
        ),
        ("applied", f"{f['applied']:,} of {f['valid']:,} valid events (processed_events)", ""),
    ]
    for reason, split in f["dead"].items():
        parts = [f"{who} {n:,}" for who, n in sorted(split.items())]
        out.append(
            (f"dead-lettered: {reason}", f"{sum(split.values()):,} ({', '.join(parts)})", "")
        )
    lost = f"{f['lost']:,}"
    if f["lost_dead"]:
        lost += (
            " (dead-lettered: "
            + ", ".join(f"{reason} {n:,}" for reason, n in f["lost_dead"].most_common())
            + ")"
        )
    out.append(("lost (valid events not applied)", lost, must_be_zero(f["lost"])))
    out.append(
        (
            "applied twice",
            f"{f['applied_twice']:,} (players above the applied events {f['above']}, events "
            f"applied and dead-lettered {f['applied_and_dead']}, extra result rows "
            f"{f['extra_rows']})",
            must_be_zero(f["applied_twice"]),
        )
    )
    out.append(
        (
            "applied without effect",
            f"{f['below']:,} players below what their applied events add up to",
            must_be_zero(f["below"]),
        )
    )
    wrong = sum(f["wrong"].values())
    detail = ", ".join(f"{what} {n:,}" for what, n in f["wrong"].most_common())
    out.append(
        (
            "hostile: wrong reason or not dead-lettered",
            f"{wrong:,}" + (f" ({detail})" if detail else ""),
            must_be_zero(wrong),
        )
    )
    crashes = f["crashes"]
    out.append(
        (
            "worker crashes",
            f"{len(crashes)}"
            + (" (" + ", ".join(f"{c.consumer} exit {c.code} {c.when}" for c in crashes) + ")")
            * bool(crashes),
            must_be_zero(len(crashes)),
        )
    )
    kills, restarts = f["planned"]
    out.append(("worker kills (SIGKILL, restarted at once)", f"{f['kills']} of {kills}", ""))
    out.append(("Redis restarts (SHUTDOWN, start)", f"{f['redis_restarts']} of {restarts}", ""))
    drain = f["drain_s"]
    out.append(
        (
            "time to drain after the last publish",
            "not drained" if drain is None else f"{drain:.1f} s",
            "**FAIL**" if drain is None else "",
        )
    )
    failed = failed or drain is None
    out.append(
        (
            "players whose totals differ from the history",
            f"{f['differ']:,} of {f['players']:,} (follows from lost events)",
            "",
        )
    )
    if f["live_sessions"] is not None:
        out.append(("players left in a live session", f"{f['live_sessions']:,}", ""))
    out.append(("dead letters for one entry twice", f"{f['dead_twice']:,}", ""))
    caches = f.get("cache_mismatches", [])
    out.append(
        (
            "cached users, scores and sessions that differ from the tables",
            f"{len(caches):,}" + (f" (first: {'; '.join(caches[:3])})" if caches else ""),
            must_be_zero(len(caches)),
        )
    )
    if f["unmatched_letters"]:
        out.append(("dead letters of no published entry", f"{f['unmatched_letters']:,}", ""))
    if f["anomalies"]:
        failed = True
        out.append(("harness anomalies", "; ".join(f["anomalies"][:3]), "**FAIL**"))
    for problem in outcome.problems:
        failed = True
        out.append(("problem", problem, "**FAIL**"))
    out.append(("phase wall time", f"{f['wall_s']:.0f} s", ""))
    return out, failed


def examples(outcome: Outcome) -> list[tuple[str, list[str]]]:
    f = outcome.figures
    return [
        ("First lost events", f.get("lost_examples", [])),
        ("First hostile entries with the wrong outcome", f.get("wrong_examples", [])),
        ("Entries still pending at the end", f.get("pending_examples", [])),
    ]


def markdown(title: str, table: list[tuple[str, str, str]], outcome: Outcome) -> str:
    lines = [f"### {title}", "", "| figure | value | check |", "| --- | --- | --- |"]
    lines += [f"| {a} | {b.replace('|', '/')} | {c} |" for a, b, c in table]
    for heading, items in examples(outcome):
        if items:
            lines += ["", f"{heading} (entry ids):", ""] + [f"- `{item}`" for item in items]
    return "\n".join(lines) + "\n"


def show(title: str, table: list[tuple[str, str, str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    rich_table = Table(title=title, show_lines=False, title_justify="left")
    rich_table.add_column("figure")
    rich_table.add_column("value", overflow="fold")
    rich_table.add_column("check")
    for a, b, c in table:
        style = "bold red" if "FAIL" in c else "green" if c.startswith("ok") else ""
        rich_table.add_row(a, b, c.replace("**", ""), style=style)
    Console(width=max(120, shutil.get_terminal_size().columns)).print(rich_table)


def write_report(args: argparse.Namespace, sections: list[str], failed: bool, wall: float) -> None:
    redis_version = subprocess.run(
        ["redis-server", "--version"], capture_output=True, text=True, check=False, timeout=10
    ).stdout.split()
    machine = (
        f"{os.cpu_count()} cores, {platform.platform()}, Python {platform.python_version()}, "
        f"{' '.join(redis_version[:3])}"
    )
    command = " ".join(["python -m bench.soak", *sys.argv[1:]])
    text = (
        "# Soak test results (`make soak`)\n\n"
        f"Run {datetime.now(UTC):%Y-%m-%d %H:%M} UTC: `{command}`; {machine}. "
        f"Verdict: **{'FAILED' if failed else 'passed'}** ({wall:.0f} s).\n\n"
        f"{args.events:,} valid events and {args.hostile:,} hostile entries per phase from "
        f"{args.producers} producers (own Redis connections, disjoint player slices of "
        f"{args.players:,} players, MULTI/EXEC bursts of 1..500, no pauses); workers "
        f"SIGKILLed {args.kills} times, Redis restarted {args.redis_restarts} times. The "
        "model is computed from the published history alone.\n\n" + "\n".join(sections)
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text)


# -- main ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--events", type=int, default=200_000, help="valid events per phase")
    parser.add_argument("--hostile", type=int, default=10_000, help="hostile entries per phase")
    parser.add_argument("--players", type=int, default=2_000, help="players in games")
    parser.add_argument("--producers", type=int, default=4)
    parser.add_argument("--kills", type=int, default=20, help="worker SIGKILLs per phase")
    parser.add_argument("--redis-restarts", type=int, default=2, help="per phase")
    parser.add_argument("--pg-workers", type=int, default=2, help="workers in phase 2")
    parser.add_argument("--skip-postgres", action="store_true", help="phase 1 (SQLite) only")
    parser.add_argument("--skip-sqlite", action="store_true", help="phase 2 (PostgreSQL) only")
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get(
            "USERMGMT_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
        ),
        help="a loopback PostgreSQL server to create a private database on (dropped at the end)",
    )
    parser.add_argument(
        "--drain-timeout", type=float, default=240.0, help="seconds after the last publish"
    )
    parser.add_argument(
        "--timeout", type=float, default=420.0, help="longest phase from the first publish, seconds"
    )
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--worker-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an extra setting for the workers (repeatable), e.g. USERMGMT_CLAIM_IDLE_MS=5000",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the work directory and PostgreSQL database"
    )
    args = parser.parse_args(argv)
    if args.events < 2 or args.hostile < 0 or args.producers < 1:
        parser.error("need --events >= 2, --hostile >= 0, --producers >= 1")
    if args.players < 8 * args.producers:
        parser.error("need at least 8 players per producer")
    if args.skip_postgres and args.skip_sqlite:
        parser.error("nothing to run")
    return args


def _interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for signum in (signal.SIGINT, signal.SIGTERM):  # SIGINT too: even when started ignoring it
        signal.signal(signum, _interrupt)  # everything started is stopped and removed
    seed = args.seed if args.seed is not None else secrets.randbelow(10**6)
    plans = []
    if not args.skip_sqlite:
        plans.append(Plan("phase 1: SQLite, 1 worker", "sqlite", 1, seed))
    if not args.skip_postgres:
        plans.append(
            Plan(
                f"phase 2: PostgreSQL, {args.pg_workers} workers",
                "postgresql",
                args.pg_workers,
                seed + 1,
            )
        )
    started = time.monotonic()
    sections: list[str] = []
    failed = False
    for plan in plans:
        try:
            outcome = run_phase(args, plan)
        except KeyboardInterrupt:
            log("interrupted; everything this run started is stopped and removed")
            return 130
        except (SoakError, RedisError, sa.exc.SQLAlchemyError, OSError) as exc:
            outcome = Outcome(plan, error=f"{type(exc).__name__}: {exc}")
        table, phase_failed = rows(outcome)
        failed = failed or phase_failed
        title = f"{plan.label} (seed {plan.seed})"
        show(title, table)
        for heading, items in examples(outcome):
            if items:
                print(f"{heading} (entry ids):\n  " + "\n  ".join(items))
        sections.append(markdown(title, table, outcome))
    write_report(args, sections, failed, time.monotonic() - started)
    log(f"{'FAILED' if failed else 'passed'}; tables in {RESULTS}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
