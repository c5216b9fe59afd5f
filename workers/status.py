"""What `usermgmt status` and `usermgmt health` read: streams, groups, dead letters, checkpoints.

Everything here only reads: XINFO, XRANGE, SCAN over heartbeat keys and a few SELECTs.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import orjson
from redis import Redis
from redis.exceptions import ResponseError
from sqlalchemy import Engine, text
from sqlalchemy.exc import SQLAlchemyError

from persistence.keys import Keys
from persistence.waiting import waiting_summary
from workers.connections import database_unreachable, safe_url

# Above this many undelivered entries, a lag Redis cannot report is shown as "at least".
LAG_COUNT_CAP = 10_000

Row = tuple[str, dict[bytes, bytes]]


@dataclass
class ConsumerInfo:
    """One consumer of a group: its pending entries and how long since it last read."""

    name: str
    pending: int
    idle_ms: int


@dataclass
class GroupInfo:
    """One consumer group on a stream."""

    name: str
    last_delivered_id: str
    pending: int
    lag: int | None  # entries not yet delivered to the group; None when unknown
    lag_capped: bool = False  # True when `lag` is a lower bound
    consumers: list[ConsumerInfo] = field(default_factory=list)


@dataclass
class StreamInfo:
    """One stream: size, id range and groups, plus the database checkpoint when it has one."""

    name: str  # update, terminate, accounts, auth_requests
    key: str
    exists: bool
    length: int = 0
    first_id: str | None = None
    last_id: str | None = None
    groups: list[GroupInfo] = field(default_factory=list)
    checkpoint: str | None = None


@dataclass
class WorkerInfo:
    """A live worker, from its heartbeat key."""

    consumer: str
    host: str | None
    pid: int | None
    only: str
    seconds_since_beat: float | None


@dataclass
class WaitingInfo:
    """Game events waiting for what they depend on (the `waiting_events` table)."""

    entries: int
    oldest_stream: str | None = None
    oldest_entry_id: str | None = None
    oldest_age_s: float | None = None  # since its entry id's time
    oldest_waits_for: str | None = None


@dataclass
class Status:
    """The whole picture `usermgmt status` prints."""

    prefix: str
    streams: list[StreamInfo]
    dlq_length: int
    dlq_by_reason: dict[str, int]
    workers: list[WorkerInfo]
    database: str
    checkpoints: dict[str, dict[str, str]] = field(default_factory=dict)
    waiting: WaitingInfo | None = None
    database_error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def text_of(value: bytes | str | None) -> str:
    """A Redis reply value as text."""
    if value is None:
        return ""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def xrange_rows(
    client: Redis, key: str, start: str = "-", end: str = "+", count: int | None = None
) -> list[Row]:
    """XRANGE as (entry id, fields) pairs; an entry deleted meanwhile has no fields."""
    rows = cast(
        list[tuple[bytes, dict[bytes, bytes] | None]],
        client.xrange(key, min=start, max=end, count=count) or [],
    )
    return [(text_of(entry_id), fields or {}) for entry_id, fields in rows]


def streams_of(keys: Keys) -> list[tuple[str, str]]:
    """(name, key) of every stream the project consumes: the accounts stream when it exists."""
    return [
        ("update", keys.update_stream),
        ("terminate", keys.terminate_stream),
        ("accounts", keys.accounts_stream),
        ("auth_requests", keys.auth_requests),
    ]


def stream_info(client: Redis, name: str, key: str) -> StreamInfo:
    """Length, first and last entry id, and the groups of one stream."""
    try:
        raw: dict[str, Any] = client.xinfo_stream(key)
    except ResponseError:  # no such key
        return StreamInfo(name=name, key=key, exists=False)
    first, last = raw.get("first-entry"), raw.get("last-entry")
    return StreamInfo(
        name=name,
        key=key,
        exists=True,
        length=int(raw.get("length", 0)),
        first_id=text_of(first[0]) if first else None,
        last_id=text_of(last[0]) if last else None,
        groups=group_infos(client, key),
    )


def group_infos(client: Redis, key: str, with_consumers: bool = True) -> list[GroupInfo]:
    """The groups of a stream with pending counts, lag and (optionally) consumers."""
    try:
        groups: list[dict[str, Any]] = client.xinfo_groups(key)
    except ResponseError:
        return []
    infos: list[GroupInfo] = []
    for raw in groups:
        name = text_of(raw["name"])
        last_delivered = text_of(raw.get("last-delivered-id")) or "0-0"
        lag = raw.get("lag")
        capped = False
        if lag is None:  # Redis cannot tell after deletions: count what is left to deliver
            lag, capped = undelivered(client, key, last_delivered)
        info = GroupInfo(
            name=name,
            last_delivered_id=last_delivered,
            pending=int(raw.get("pending", 0)),
            lag=int(lag),
            lag_capped=capped,
        )
        if with_consumers:
            info.consumers = consumer_infos(client, key, name)
        infos.append(info)
    return infos


def undelivered(client: Redis, key: str, after_id: str) -> tuple[int, bool]:
    """Entries after `after_id`, counted up to `LAG_COUNT_CAP` (and whether the cap was hit)."""
    entries = xrange_rows(client, key, f"({after_id}", "+", LAG_COUNT_CAP)
    return len(entries), len(entries) >= LAG_COUNT_CAP


def consumer_infos(client: Redis, key: str, group: str) -> list[ConsumerInfo]:
    """The consumers of one group, most recently active first."""
    try:
        raw: list[dict[str, Any]] = client.xinfo_consumers(key, group)
    except ResponseError:
        return []
    consumers = [
        ConsumerInfo(
            name=text_of(item["name"]), pending=int(item["pending"]), idle_ms=int(item["idle"])
        )
        for item in raw
    ]
    return sorted(consumers, key=lambda consumer: consumer.idle_ms)


def dlq_reasons(client: Redis, keys: Keys, page: int = 1_000) -> Counter[str]:
    """Dead letters counted by reason code (a letter that is not JSON counts as `unreadable`)."""
    reasons: Counter[str] = Counter()
    start = "-"
    while True:
        rows = xrange_rows(client, keys.dlq, start, "+", page)
        for _, fields in rows:
            try:
                reasons[str(orjson.loads(fields[b"payload"]).get("reason") or "unknown")] += 1
            except (KeyError, AttributeError, orjson.JSONDecodeError):
                reasons["unreadable"] += 1
        if len(rows) < page:
            return reasons
        start = f"({rows[-1][0]}"


def alive_workers(client: Redis, keys: Keys) -> list[WorkerInfo]:
    """Workers whose heartbeat key has not expired, by consumer name."""
    workers: list[WorkerInfo] = []
    now = time.time()
    for key in sorted(client.scan_iter(match=f"{keys.heartbeat_prefix}*", count=500)):
        raw = client.get(key)
        if raw is None:  # expired between SCAN and GET
            continue
        consumer = text_of(key)[len(keys.heartbeat_prefix) :]
        try:
            info: dict[str, Any] = orjson.loads(raw)
        except orjson.JSONDecodeError:
            info = {}
        beat = info.get("at")
        workers.append(
            WorkerInfo(
                consumer=consumer,
                host=info.get("host"),
                pid=info.get("pid"),
                only=str(info.get("only", "?")),
                seconds_since_beat=round(now - beat, 1) if isinstance(beat, int | float) else None,
            )
        )
    return workers


def read_checkpoints(engine: Engine) -> dict[str, dict[str, str]]:
    """Per stream key, the last entry id the database has applied and when."""
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT stream, last_entry_id, updated_at FROM stream_checkpoints")
        ).all()
    return {
        str(stream): {"last_entry_id": str(entry_id), "updated_at": str(updated_at)}
        for stream, entry_id, updated_at in rows
    }


def read_waiting(engine: Engine) -> WaitingInfo:
    """How many game events wait, and the oldest one (its age in entry-id time)."""
    with engine.connect() as conn:
        summary = waiting_summary(conn)
    age = None
    if summary.oldest_since is not None:
        age = round(max(0.0, time.time() - summary.oldest_since.timestamp()), 1)
    return WaitingInfo(
        entries=summary.entries,
        oldest_stream=summary.oldest_stream,
        oldest_entry_id=summary.oldest_entry_id,
        oldest_age_s=age,
        oldest_waits_for=summary.oldest_waits_for,
    )


def collect(client: Redis, engine: Engine, keys: Keys, database_url: str) -> Status:
    """Read everything; a database that cannot be read leaves `database_error` set."""
    streams = []
    for name, key in streams_of(keys):
        info = stream_info(client, name, key)
        if info.exists or name != "accounts":
            streams.append(info)
    status = Status(
        prefix=keys.prefix,
        streams=streams,
        dlq_length=int(client.xlen(keys.dlq)),
        dlq_by_reason=dict(sorted(dlq_reasons(client, keys).items())),
        workers=alive_workers(client, keys),
        database=safe_url(database_url),
    )
    try:
        status.checkpoints = read_checkpoints(engine)
        status.waiting = read_waiting(engine)
    except SQLAlchemyError as exc:
        status.database_error = database_unreachable(database_url, exc)
    for stream in status.streams:
        checkpoint = status.checkpoints.get(stream.key)
        stream.checkpoint = checkpoint["last_entry_id"] if checkpoint else None
    return status
