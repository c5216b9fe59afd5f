"""Prometheus metrics for `usermgmt worker --metrics-port N`.

The consumers call `Metrics` once per batch (events) or once per request (auth); the
default `NO_METRICS` does nothing, so a worker without a metrics port pays for an
empty method call. Stream gauges (length, lag, pending) are sampled by the worker's
heartbeat thread, off the event path.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from redis import Redis

from usermgmt.persistence.keys import Keys
from usermgmt.workers.runtime.lag import BOUNDS_S
from usermgmt.workers.runtime.redis_info import group_infos, streams_of

BATCH_SIZE_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000)
BATCH_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
RANK_STEP_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.015,
    0.02,
    0.025,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    1,
)
RANK_REFRESH_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
AUTH_SECONDS_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


def stream_kind(stream: str) -> str:
    """`um:{events}:update` -> `update`: the label value of a stream."""
    return stream.rsplit(":", 1)[-1]


class Metrics:
    """No metrics: the interface the consumers call, doing nothing."""

    def observe_event_batch(
        self,
        size: int,
        seconds: float,
        outcomes: Iterable[tuple[str, str]],
        dead: Iterable[tuple[Any, str, str]],
    ) -> None:
        """One handled batch: `outcomes` are (stream, outcome), `dead` (entry, reason, message)."""

    def observe_waiting(self, count: int, oldest_age_s: float) -> None:
        """The entries waiting for what they depend on, and how long the oldest has."""

    def observe_event_lag(self, stream: str, lags_s: Sequence[float]) -> None:
        """Applied entries of `stream` now committed and acked: each one's end-to-end lag."""

    def observe_auth(self, op: str, outcome: str, seconds: float) -> None:
        """One auth request answered (or dropped / dead-lettered)."""

    def observe_conflict(self, kind: str) -> None:
        """A batch's transaction lost to another worker's (`conflict_of`) and is retried."""

    def observe_rank_step(self, seconds: float) -> None:
        """A rank refresh's slices written between two event batches (one, or a few
        while the refresh is behind its pace): event application stood still this long."""

    def observe_rank_refresh(self, seconds: float) -> None:
        """A rank refresh done: from its snapshot's start to its last slice."""

    def sample_streams(self, client: Redis, keys: Keys) -> None:
        """Refresh the stream gauges (called periodically, not per entry)."""


NO_METRICS = Metrics()


class MetricsUnavailable(Exception):
    """The metrics endpoint could not be started (the port is taken or not allowed)."""


class PrometheusMetrics(Metrics):
    """Metrics kept in a registry of their own and served over HTTP by `serve`."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.applied = Counter(
            "usermgmt_events_applied", "Game events applied, by type", ["type"], registry=r
        )
        self.duplicates = Counter(
            "usermgmt_events_duplicates",
            "Game events acked without effect because their event_id was already applied",
            ["type"],
            registry=r,
        )
        self.dead = Counter(
            "usermgmt_events_dead_lettered",
            "Game events moved to the dead-letter stream, by type and reason",
            ["type", "reason"],
            registry=r,
        )
        self.conflicts = Counter(
            "usermgmt_db_conflicts",
            "Event batches whose transaction lost to another one's and was retried, by kind "
            "(deadlock, serialization, lock_timeout, locked)",
            ["kind"],
            registry=r,
        )
        self.batch_size = Histogram(
            "usermgmt_event_batch_size",
            "Entries per handled event batch",
            buckets=BATCH_SIZE_BUCKETS,
            registry=r,
        )
        self.batch_seconds = Histogram(
            "usermgmt_event_batch_duration_seconds",
            "Time to validate, apply, publish and ack one event batch",
            buckets=BATCH_SECONDS_BUCKETS,
            registry=r,
        )
        self.waiting = Gauge(
            "usermgmt_events_waiting",
            "Game events waiting for what they depend on (pending, not counted as deliveries)",
            registry=r,
        )
        self.waiting_age = Gauge(
            "usermgmt_events_waiting_oldest_seconds",
            "Entry-id age of the oldest waiting game event",
            registry=r,
        )
        self.event_lag = Histogram(
            "usermgmt_event_lag_seconds",
            "From an applied entry's id (its millisecond, on the Redis server's clock) to its "
            "batch being committed and acked, by stream",
            ["stream"],
            buckets=BOUNDS_S,
            registry=r,
        )
        self.rank_step = Histogram(
            "usermgmt_rank_refresh_step_seconds",
            "The slices of a leaderboard rank refresh written between two event batches "
            "(one, or a few while the refresh is behind its pace): how long event "
            "application stood still",
            buckets=RANK_STEP_BUCKETS,
            registry=r,
        )
        self.rank_refresh = Histogram(
            "usermgmt_rank_refresh_seconds",
            "A whole leaderboard rank refresh: its snapshot read beside the event path, "
            "then its slices written",
            buckets=RANK_REFRESH_BUCKETS,
            registry=r,
        )
        self.auth_requests = Counter(
            "usermgmt_auth_requests",
            "Auth requests handled, by op and outcome (ok or an error code)",
            ["op", "outcome"],
            registry=r,
        )
        self.auth_seconds = Histogram(
            "usermgmt_auth_request_duration_seconds",
            "Time to answer one auth request",
            ["op"],
            buckets=AUTH_SECONDS_BUCKETS,
            registry=r,
        )
        self.length = Gauge(
            "usermgmt_stream_length", "Entries in a stream (dlq included)", ["stream"], registry=r
        )
        self.lag = Gauge(
            "usermgmt_stream_lag",
            "Entries not yet delivered to a consumer group",
            ["stream", "group"],
            registry=r,
        )
        self.pending = Gauge(
            "usermgmt_stream_pending",
            "Entries delivered to a consumer group but not acked",
            ["stream", "group"],
            registry=r,
        )

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:  # noqa: S104 - a scrape target
        """Start the `/metrics` HTTP endpoint in a daemon thread."""
        start_http_server(port, addr=addr, registry=self.registry)

    def observe_event_batch(
        self,
        size: int,
        seconds: float,
        outcomes: Iterable[tuple[str, str]],
        dead: Iterable[tuple[Any, str, str]],
    ) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)
        for (stream, outcome), count in Tally(outcomes).items():
            if outcome == "applied":
                self.applied.labels(stream_kind(stream)).inc(count)
            elif outcome == "duplicate":
                self.duplicates.labels(stream_kind(stream)).inc(count)
        for (stream, reason), count in Tally(
            (entry.stream, str(reason)) for entry, reason, _ in dead
        ).items():
            self.dead.labels(stream_kind(stream), reason).inc(count)

    def observe_waiting(self, count: int, oldest_age_s: float) -> None:
        self.waiting.set(count)
        self.waiting_age.set(oldest_age_s)

    def observe_event_lag(self, stream: str, lags_s: Sequence[float]) -> None:
        histogram = self.event_lag.labels(stream_kind(stream))
        for lag in lags_s:
            histogram.observe(lag)

    def observe_conflict(self, kind: str) -> None:
        self.conflicts.labels(kind).inc()

    def observe_rank_step(self, seconds: float) -> None:
        self.rank_step.observe(seconds)

    def observe_rank_refresh(self, seconds: float) -> None:
        self.rank_refresh.observe(seconds)

    def observe_auth(self, op: str, outcome: str, seconds: float) -> None:
        self.auth_requests.labels(op, outcome).inc()
        self.auth_seconds.labels(op).observe(seconds)

    def sample_streams(self, client: Redis, keys: Keys) -> None:
        for name, key in [*streams_of(keys), ("dlq", keys.dlq)]:
            self.length.labels(name).set(int(client.xlen(key)))
            if name == "dlq":
                continue
            for group in group_infos(client, key, with_consumers=False):
                self.pending.labels(name, group.name).set(group.pending)
                if group.lag is not None:
                    self.lag.labels(name, group.name).set(group.lag)


def serve_metrics(port: int) -> PrometheusMetrics:
    """Metrics served on `port`; raises `MetricsUnavailable` with a one-line reason."""
    metrics = PrometheusMetrics()
    try:
        metrics.serve(port)
    except OSError as exc:
        raise MetricsUnavailable(
            f"cannot serve metrics on port {port} ({exc.strerror or exc}); "
            "free it or pick another --metrics-port"
        ) from None
    return metrics
