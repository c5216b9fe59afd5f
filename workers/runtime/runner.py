"""Runs the consumers side by side in one process, with two-stage shutdown."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from types import FrameType

import structlog
from redis.exceptions import RedisError

from usermgmt.persistence.db import (
    checkpoint_wal,
    current_revision,
    is_sqlite,
    schema_mismatch,
)
from usermgmt.persistence.keys import AUTH_GROUP, EVENTS_GROUP
from usermgmt.workers.auth.relay import Relay
from usermgmt.workers.auth.replies import drop_stale_requests
from usermgmt.workers.auth.server import AuthServer
from usermgmt.workers.events.consumer import EventConsumer
from usermgmt.workers.events.leaderboard_watch import LeaderboardWatch
from usermgmt.workers.ops.trim import Trimmer
from usermgmt.workers.runtime import early_signals
from usermgmt.workers.runtime.backoff import Backoff
from usermgmt.workers.runtime.bootstrap import Services
from usermgmt.workers.runtime.connections import (
    DATABASE_ERRORS,
    REDIS_ERRORS,
    database_unreachable,
    safe_url,
)
from usermgmt.workers.runtime.consumer_name import HEARTBEAT_EVERY_S, NameClaim
from usermgmt.workers.runtime.metrics import NO_METRICS, Metrics
from usermgmt.workers.runtime.pending import remove_idle_consumers
from usermgmt.workers.runtime.redis_info import alive_workers, evicting_policy, eviction_warning

log = structlog.get_logger("usermgmt.worker")

PRUNE_EVERY_S = 60.0
# An event transaction in hand this long is reported: lock and connect timeouts end a
# wait well before, so the database has stopped answering (a hung server or storage).
STALL_WARN_S = 30.0
WAL_CHECKPOINT_EVERY_S = 0.1  # SQLite: see `checkpoint_wal`


class NotMigrated(Exception):
    """The database has no schema yet: `usermgmt migrate` must run first."""


class Worker:
    """The auth consumer and the event consumer (or one of them) in one process.

    The first SIGTERM/SIGINT stops reading and lets each consumer finish and ack the
    batch in hand; a second signal, or `drain_timeout` seconds, exits at once.
    """

    def __init__(
        self,
        services: Services,
        consumer: str,
        only: str | None = None,
        burst: bool = False,
        drain_timeout: float = 30.0,
        metrics: Metrics = NO_METRICS,
    ) -> None:
        self.services = services
        self.metrics = metrics
        self.last_prune = 0.0
        self.consumer = consumer
        self.only = only
        self.burst = burst
        self.drain_timeout = drain_timeout
        self.stop = threading.Event()
        self.failed = False
        self.events: EventConsumer | None = None
        self.auth: AuthServer | None = None
        self.relay: Relay | None = None
        self.evicting: str | None = None  # Redis's maxmemory-policy, when it evicts
        self.stalled_since: float | None = None  # the event transaction reported stalled
        self.log = log.bind(consumer=consumer)
        key = services.keys.heartbeat(consumer)
        self.name = NameClaim(services.redis, key, consumer, self.stop, self.log)

    def run(self, handle_signals: bool = True) -> int:
        """Run until stopped; returns the exit code (0 after a clean drain)."""
        if handle_signals:
            # Before waiting for the database, so a signal while it is away still exits 0.
            signal.signal(signal.SIGTERM, self._on_signal)
            signal.signal(signal.SIGINT, self._on_signal)
            for signum in early_signals.take():  # arrived while the program was starting
                self._on_signal(signum, None)
        self.wait_for_schema()
        self.name.take(self._describe, self.services.settings.redis_url)  # or NameTaken
        if self.stop.is_set():
            self.log.info("worker stopped before it started", exit_code=0)
            return 0
        threads = []
        if self.only in (None, "events"):
            self.events = EventConsumer(
                self.services, self.consumer, self.stop, burst=self.burst, metrics=self.metrics
            )
            threads.append(self._thread("events", self.events.run))
        if self.only in (None, "auth") and not self.burst:
            self.relay = Relay(self.services, self.stop)
            self.auth = AuthServer(
                self.services, self.consumer, self.stop, metrics=self.metrics, relay=self.relay
            )
            threads.append(self._thread("auth", self.auth.run))
        background = self._start_background()
        self._check_eviction()
        threads.append(self._thread("heartbeat", self._heartbeat, daemon=True))
        self.log.info("worker started", only=self.only or "all", pid=os.getpid())
        for thread in threads[:-1]:
            while thread.is_alive():
                thread.join(0.2)
                if self.stop.is_set() and self._draining_too_long():
                    self.log.error("drain timed out; exiting now", timeout_s=self.drain_timeout)
                    os._exit(1)
        self.stop.set()
        for thread in background:
            thread.join(5.0)  # the relay makes one last pass
        self.log.info("worker stopped", exit_code=1 if self.failed else 0)
        return 1 if self.failed else 0

    def _start_background(self) -> list[threading.Thread]:
        """The outbox relay (beside the auth consumer), the stream trimmer and the
        leaderboard watch (beside the event consumer); they stop with the worker and are
        not waited for in the drain."""
        settings = self.services.settings
        started = []
        if is_sqlite(self.services.engine):
            started.append(self._thread("wal-checkpoint", self._checkpoint_wal, daemon=True))
        if self.relay is not None:
            started.append(self._thread("relay", self.relay.run, daemon=True))
        if self.only in (None, "events") and not self.burst and settings.trim_interval_s > 0:
            trimmer = Trimmer(
                self.services, self.stop, settings.trim_interval_s, settings.stream_retention_s
            )
            started.append(self._thread("trim", trimmer.run, daemon=True))
        if self.only in (None, "events") and not self.burst:
            watch = LeaderboardWatch(self.services, self.stop)
            started.append(self._thread("leaderboard-watch", watch.run, daemon=True))
        return started

    def _checkpoint_wal(self) -> None:
        """Checkpoint SQLite's WAL off the consumers' threads (see `checkpoint_wal`)."""
        outage = Backoff()  # for its logging: once, then once a minute, not 10 times a second
        while not self.stop.wait(WAL_CHECKPOINT_EVERY_S):
            try:
                checkpoint_wal(self.services.engine)
            except DATABASE_ERRORS as exc:
                outage.retry(self.log, "WAL checkpoint failed; trying again", error=repr(exc))
            else:
                outage.recovered(self.log, "the WAL checkpoint")

    def wait_for_schema(self) -> None:
        """Wait (with backoff) for a reachable database; refuse to run on one whose schema
        is not this release's (never migrated, migrated by an older or a newer release)."""
        backoff = Backoff(first=0.5)
        while not self.stop.is_set():
            try:
                revision = current_revision(self.services.settings.database_url)
            except DATABASE_ERRORS as exc:
                url = self.services.settings.database_url
                self.stop.wait(backoff.retry(self.log, database_unreachable(url, exc)))
                continue
            backoff.recovered(self.log, "the database")
            problem = schema_mismatch(revision)
            if problem is not None:  # its statements would fail, some as dead letters
                raise NotMigrated(problem)
            return

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if self.stop.is_set():
            self.log.warning("second signal; exiting at once", signal=signum)
            os._exit(1)
        self.log.info("shutting down: finishing the batch in hand", signal=signum)
        self.stopped_at = time.monotonic()
        self.stop.set()

    def _draining_too_long(self) -> bool:
        started = getattr(self, "stopped_at", None)
        return started is not None and time.monotonic() - started > self.drain_timeout

    def _thread(
        self, name: str, target: Callable[[], None], daemon: bool = False
    ) -> threading.Thread:
        def guarded() -> None:
            try:
                target()
            except Exception as exc:
                self.failed = True
                self.log.exception("consumer crashed", thread=name, error=repr(exc))
                self.stop.set()

        thread = threading.Thread(target=guarded, name=name, daemon=daemon)
        thread.start()
        return thread

    def _heartbeat(self) -> None:
        """Keep `um:worker:heartbeat:<consumer>` alive so `usermgmt health` can tell."""
        while not self.stop.is_set():
            self._watch_database()
            try:
                self.name.beat(self._describe())
            except REDIS_ERRORS:
                pass  # the consumers report the outage
            else:
                self._housekeeping()
            self.stop.wait(HEARTBEAT_EVERY_S)
        try:
            self.name.release()
        except REDIS_ERRORS:
            pass

    def _watch_database(self) -> None:
        """Say when the event consumer's transaction has waited `STALL_WARN_S` for the
        database (psycopg has no read timeout: a stopped server is waited for without
        end), and when it is answered."""
        since = self.events.store.busy_since if self.events is not None else None
        if since is not None and since == self.stalled_since:
            return
        if self.stalled_since is not None:
            self.log.info(
                "the database answered the event consumer again",
                waited_s=round(time.monotonic() - self.stalled_since, 1),
            )
            self.stalled_since = None
        if since is not None and time.monotonic() - since >= STALL_WARN_S:
            self.log.error(
                "the database has not answered the event consumer for a while; "
                "is the server or its storage hung?",
                waited_s=round(time.monotonic() - since, 1),
                database=safe_url(self.services.settings.database_url),
            )
            self.stalled_since = since

    def _describe(self) -> dict[str, object]:
        """What the heartbeat says: who this worker is, and how its events go."""
        info: dict[str, object] = {
            "consumer": self.consumer,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "only": self.only or "all",
            "at": time.time(),
        }
        if self.events is not None:
            info["applied"] = self.events.stats.applied
            info["event_lag"] = self.events.lag.summary().as_dict()
            info["conflicts"] = dict(self.events.stats.conflicts)
            info["standing_by"] = self.events.standing_by
        return info

    def _housekeeping(self) -> None:
        """Sample the stream gauges, delete auth requests too old to answer; now and
        then, drop consumers that went away.

        Housekeeping never stops the worker: a failure is logged and tried next beat.
        """
        try:
            self._sample_and_prune()
        except (RedisError, *REDIS_ERRORS) as exc:
            self.log.warning("housekeeping failed; trying again later", error=repr(exc))

    def _check_eviction(self) -> None:
        """Warn when Redis evicts keys at its memory limit; again whenever its policy
        changes (checked at start, then once a minute)."""
        policy = evicting_policy(self.services.redis)
        if policy != self.evicting:
            if policy is not None:
                self.log.warning(eviction_warning(policy))
            elif self.evicting is not None:
                self.log.info("Redis no longer evicts keys", maxmemory_policy="noeviction")
        self.evicting = policy

    def _sample_and_prune(self) -> None:
        redis, keys = self.services.redis, self.services.keys
        self.metrics.sample_streams(redis, keys)
        dropped = drop_stale_requests(redis, keys)
        if dropped:
            self.log.info("deleted auth requests too old to answer (over 30 s)", count=dropped)
        idle_s = self.services.settings.consumer_idle_remove_s
        if time.monotonic() - self.last_prune < min(PRUNE_EVERY_S, idle_s):
            return
        self.last_prune = time.monotonic()
        self._check_eviction()
        groups = [(keys.update_stream, EVENTS_GROUP), (keys.terminate_stream, EVENTS_GROUP)]
        groups.append((keys.auth_requests, AUTH_GROUP))
        alive = {self.consumer, *(worker.consumer for worker in alive_workers(redis, keys))}
        for stream, group in groups:
            removed = remove_idle_consumers(redis, stream, group, int(idle_s * 1000), alive)
            if removed:
                self.log.info("removed idle consumers", stream=stream, group=group, names=removed)
