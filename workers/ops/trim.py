"""Stream retention: XTRIM MINID, never past an entry that is not yet applied.

For each event stream the cut (MINID: entries below it are removed) is the lowest of
- now - retention (by the Redis clock, which also stamps entry ids);
- for every consumer group on the stream: its oldest pending entry, and the entry
  right after its last-delivered id (nothing undelivered goes);
- the entry right after the database's checkpoint for the stream (nothing whose
  effect is not committed goes, even if Redis and the database disagree).
The accounts stream has no consumer group: its cut is also held at the relay's last
recorded entry. A stream with no group or no checkpoint yet is left alone.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import structlog
from redis import Redis
from redis.exceptions import ResponseError

from usermgmt.domain.events import entry_id_key
from usermgmt.domain.payloads import text_of
from usermgmt.persistence.keys import Keys
from usermgmt.persistence.replay import load_checkpoints
from usermgmt.workers.runtime.bootstrap import Services
from usermgmt.workers.runtime.clock import redis_time_ms
from usermgmt.workers.runtime.connections import (
    DATABASE_ERRORS,
    REDIS_ERRORS,
    database_unreachable,
    redis_unreachable,
)
from usermgmt.workers.runtime.ranges import (
    EntryKey,
    format_id,
    predecessor,
    successor,
    xrange_pages,
)

log = structlog.get_logger("usermgmt.trim")


@dataclass(frozen=True)
class Floor:
    """The lowest entry id that must stay, and what holds it there."""

    key: EntryKey
    reason: str


def group_floors(client: Redis, stream: str, only: str | None = None) -> list[Floor] | None:
    """Per consumer group (or just `only`): its oldest pending entry and its first
    undelivered one. None when the stream or the group does not exist.
    """
    try:
        groups: Any = client.xinfo_groups(stream)
    except ResponseError as exc:
        if "no such key" in str(exc).lower():
            return None
        raise
    floors: list[Floor] = []
    for group in groups:
        name = text_of(group["name"])
        if only is not None and name != only:
            continue
        last = text_of(group["last-delivered-id"])
        floors.append(Floor(successor(last), f"undelivered entries of group {name}"))
        if int(group["pending"]):
            summary: Any = client.xpending(stream, name)
            if summary.get("min"):
                oldest = entry_id_key(text_of(summary["min"]))
                floors.append(Floor(oldest, f"pending entries of group {name}"))
    return floors or None


@dataclass
class TrimResult:
    """What happened (or would happen) to one stream."""

    stream: str
    length: int
    minid: str | None  # None: left alone
    reason: str  # what decided the cut, or why the stream is left alone
    removed: int = 0


def plan_trim(
    client: Redis, keys: Keys, checkpoints: dict[str, str], retention_s: float
) -> list[TrimResult]:
    """The cut of every replayable stream, without trimming anything."""
    now_ms = redis_time_ms(client)
    retention = Floor((max(0, now_ms - int(retention_s * 1000)), 0), "retention")
    plans: list[TrimResult] = []
    for stream in (keys.accounts_stream, keys.update_stream, keys.terminate_stream):
        length = int(client.xlen(stream))
        checkpoint = checkpoints.get(stream)
        if checkpoint is None:
            plans.append(TrimResult(stream, length, None, "no checkpoint in the database yet"))
            continue
        floors = [retention, Floor(successor(checkpoint), "database checkpoint")]
        if stream != keys.accounts_stream:
            groups = group_floors(client, stream)
            if groups is None:
                plans.append(TrimResult(stream, length, None, "no consumer group yet"))
                continue
            floors += groups
        lowest = min(floors, key=lambda floor: floor.key)
        plans.append(TrimResult(stream, length, format_id(lowest.key), lowest.reason))
    return plans


def trim_streams(services: Services, retention_s: float, dry_run: bool = False) -> list[TrimResult]:
    """Trim the accounts, update and terminate streams (or count what would go)."""
    client = services.redis
    plans = plan_trim(client, services.keys, load_checkpoints(services.engine), retention_s)
    for plan in plans:
        if plan.minid is None or plan.length == 0:
            continue
        if dry_run:
            plan.removed = count_below(client, plan.stream, plan.minid)
        else:
            plan.removed = int(client.xtrim(plan.stream, minid=plan.minid, approximate=False))
    return plans


def count_below(client: Redis, stream: str, minid: str) -> int:
    """How many entries have an id below `minid` (what XTRIM MINID would remove)."""
    last = predecessor(entry_id_key(minid))
    if last is None:
        return 0
    return sum(len(page) for page in xrange_pages(client, stream, (0, 0), last, 10_000))


class Trimmer:
    """Trims the streams every `interval_s` seconds in the worker."""

    def __init__(
        self, services: Services, stop: threading.Event, interval_s: float, retention_s: float
    ) -> None:
        self.services = services
        self.stop = stop
        self.interval_s = interval_s
        self.retention_s = retention_s

    def run(self) -> None:
        log.info("stream trimmer started", interval_s=self.interval_s, retention_s=self.retention_s)
        while not self.stop.wait(self.interval_s):
            self.trim_once()
        log.info("stream trimmer stopped")

    def trim_once(self) -> list[TrimResult]:
        """One pass; an outage is logged and waits for the next pass."""
        settings = self.services.settings
        try:
            results = trim_streams(self.services, self.retention_s)
        except REDIS_ERRORS as exc:
            log.warning(redis_unreachable(settings.redis_url, exc))
            return []
        except DATABASE_ERRORS as exc:
            log.warning(database_unreachable(settings.database_url, exc))
            return []
        except ResponseError as exc:  # housekeeping never stops the worker
            log.warning("stream trim refused by Redis", error=str(exc))
            return []
        for result in results:
            if result.removed:
                log.info(
                    "stream trimmed",
                    stream=result.stream,
                    removed=result.removed,
                    minid=result.minid,
                    held_by=result.reason,
                )
        return results
