"""Read-only views of Redis that several tools share: XRANGE rows, the project's
streams, consumer groups with their lag, and the live workers' heartbeats.

`usermgmt status` shows them, the metrics sample them, the runner and the demo
consult them, and the dead-letter tools read entries with them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, cast

import orjson
from redis import Redis
from redis.exceptions import RedisError, ResponseError

from usermgmt.domain.payloads import text_of
from usermgmt.persistence.keys import Keys

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
class WorkerInfo:
    """A live worker, from its heartbeat key."""

    consumer: str
    host: str | None
    pid: int | None
    only: str
    seconds_since_beat: float | None
    # The last minute's end-to-end lag of applied entries: count, p50_ms, p99_ms, max_ms.
    event_lag: dict[str, float] | None = None
    # Batches retried since the worker started because another transaction won, by kind.
    conflicts: dict[str, int] | None = None
    standing_by: bool = False  # another worker holds the reader lease


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


def beat_of(raw: object) -> dict[str, Any]:
    """A heartbeat's fields; {} for none or one that is not a JSON object."""
    try:
        beat = orjson.loads(raw) if isinstance(raw, bytes | str) and raw else {}
    except orjson.JSONDecodeError:
        return {}
    return beat if isinstance(beat, dict) else {}


def alive_workers(client: Redis, keys: Keys) -> list[WorkerInfo]:
    """Workers whose heartbeat key has not expired, by consumer name."""
    workers: list[WorkerInfo] = []
    now = time.time()
    for key in sorted(client.scan_iter(match=f"{keys.heartbeat_prefix}*", count=500)):
        try:
            raw = client.get(key)
        except ResponseError:  # another type of value, written by hand
            continue
        if raw is None:  # expired between SCAN and GET
            continue
        consumer = text_of(key)[len(keys.heartbeat_prefix) :]
        info = beat_of(raw)
        beat = info.get("at")
        lag = info.get("event_lag")
        conflicts = info.get("conflicts")
        workers.append(
            WorkerInfo(
                consumer=consumer,
                host=info.get("host"),
                pid=info.get("pid"),
                only=str(info.get("only", "?")),
                seconds_since_beat=round(now - beat, 1) if isinstance(beat, int | float) else None,
                event_lag=lag if isinstance(lag, dict) else None,
                conflicts=conflicts if isinstance(conflicts, dict) else None,
                standing_by=info.get("standing_by") is True,
            )
        )
    return workers


def evicting_policy(client: Redis) -> str | None:
    """The `maxmemory-policy` when Redis may evict keys at its memory limit (a limit is
    set and the policy is not `noeviction`): it may then evict a stream, its groups or a
    waiting entry's data, and events are lost with them. None when nothing is evicted,
    or when Redis does not say (`INFO` not allowed, a server that lacks it).
    """
    try:
        info: Any = client.info("memory")
    except (RedisError, OSError):
        return None
    nodes = [info] if "maxmemory_policy" in info else list(info.values())  # a cluster: per node
    for node in nodes:
        if not isinstance(node, dict):
            continue
        policy = text_of(node.get("maxmemory_policy")) or "noeviction"
        if int(node.get("maxmemory") or 0) > 0 and policy != "noeviction":
            return policy
    return None


def eviction_warning(policy: str) -> str:
    """What to tell an operator whose Redis evicts (`evicting_policy`)."""
    return (
        f"Redis evicts keys at its memory limit (maxmemory-policy {policy}): event streams, "
        "consumer groups and replies can be lost; set maxmemory-policy noeviction"
    )
