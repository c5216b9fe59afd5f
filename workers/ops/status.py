"""What `usermgmt status` and `usermgmt health` read: streams, groups, dead letters, checkpoints.

Everything here only reads: XINFO, XRANGE, SCAN over heartbeat keys and a few SELECTs.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson
from redis import Redis
from redis.exceptions import ResponseError
from sqlalchemy import Engine, text
from sqlalchemy.exc import SQLAlchemyError

from usermgmt.domain.events import entry_id_key
from usermgmt.domain.payloads import text_of
from usermgmt.persistence.keys import Keys
from usermgmt.persistence.waiting import waiting_summary
from usermgmt.workers.runtime.clock import redis_time_ms
from usermgmt.workers.runtime.connections import database_unreachable, safe_url
from usermgmt.workers.runtime.redis_info import (
    GroupInfo,
    WorkerInfo,
    alive_workers,
    evicting_policy,
    group_infos,
    streams_of,
    xrange_rows,
)

AHEAD_LIMIT_MS = 60_000  # an entry id further ahead of Redis's clock was chosen by hand


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
    last_generated_id: str | None = None  # may outlive its entry (deleted, trimmed)


@dataclass
class WaitingInfo:
    """Game events waiting for what they depend on (the `waiting_events` table)."""

    entries: int
    oldest_stream: str | None = None
    oldest_entry_id: str | None = None
    oldest_age_s: float | None = None  # since its entry id's time
    oldest_waits_for: str | None = None


@dataclass
class IdAhead:
    """A stream's last id, more than `AHEAD_LIMIT_MS` ahead of Redis's clock."""

    last_id: str
    ahead_s: float


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
    redis_evicts: str | None = None  # Redis's maxmemory-policy, when it evicts keys
    ids_ahead: dict[str, IdAhead] = field(default_factory=dict)  # by stream key

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


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
        last_generated_id=text_of(raw.get("last-generated-id")) or None,
    )


def ids_ahead(streams: list[StreamInfo], now_ms: int) -> dict[str, IdAhead]:
    """Streams whose last id lies more than `AHEAD_LIMIT_MS` past `now_ms` (Redis's clock).

    Only an XADD with an explicit id puts one there, and ACLs cannot forbid it: later
    entries get ids after it, which defeats staleness checks, and at the largest id
    every `XADD *` fails.
    """
    ahead: dict[str, IdAhead] = {}
    for stream in streams:
        ids = [entry_id_key(i) for i in (stream.last_id, stream.last_generated_id) if i]
        if ids and max(ids)[0] > now_ms + AHEAD_LIMIT_MS:
            ms, seq = max(ids)
            ahead[stream.key] = IdAhead(f"{ms}-{seq}", round((ms - now_ms) / 1000, 1))
    return ahead


def ahead_warning(key: str, ahead: IdAhead) -> str:
    """What to tell an operator about a stream in `Status.ids_ahead`."""
    return (
        f"stream {key} has the entry id {ahead.last_id}, {_span(ahead.ahead_s)} ahead of "
        "Redis's clock: a producer chose it (XADD with an explicit id), so later events "
        "there escape the staleness checks, and at the largest id none can be published. "
        "Switch off the user that wrote it, XDEL the entries ahead, then XSETID the stream "
        'and XGROUP SETID its groups back to the last good id (docs/operations.md, "Access '
        'control")'
    )


def _span(seconds: float) -> str:
    for unit, size in (("years", 365 * 86_400), ("days", 86_400), ("h", 3_600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:,.0f} {unit}"
    return f"{seconds:.0f} s"


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
        redis_evicts=evicting_policy(client),
    )
    try:
        status.ids_ahead = ids_ahead(streams, redis_time_ms(client))
    except ResponseError:  # TIME not allowed to this user: nothing to compare with
        pass
    try:
        status.checkpoints = read_checkpoints(engine)
        status.waiting = read_waiting(engine)
    except SQLAlchemyError as exc:
        status.database_error = database_unreachable(database_url, exc)
    for stream in status.streams:
        checkpoint = status.checkpoints.get(stream.key)
        stream.checkpoint = checkpoint["last_entry_id"] if checkpoint else None
    return status
