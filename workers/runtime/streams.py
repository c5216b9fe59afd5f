"""Consumer groups and reading them: new entries, a consumer's own history, by id.

The rest of the stream plumbing lives beside this module, and its names are
importable from here too: entries and their parser (`entries`), pending entries and
claims (`pending`), dead letters (`dead_letters`), the server's clock (`clock`) and
`Backoff` (`backoff`).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis import Redis
from redis.exceptions import ResponseError

from usermgmt.persistence import nodes
from usermgmt.persistence.command_batch import MAX_REDIRECTS
from usermgmt.workers.runtime.backoff import Backoff
from usermgmt.workers.runtime.clock import RedisClock, redis_time_ms
from usermgmt.workers.runtime.dead_letters import dead_letter, dead_letter_payload
from usermgmt.workers.runtime.entries import PAYLOAD, Entry, stream_entries, to_entries
from usermgmt.workers.runtime.pending import (
    FIRST_PAGE,
    PENDING_PAGE,
    claim_idle,
    claim_own,
    entries_of,
    fill_deliveries,
    keep_fresh,
    own_pending,
    pending_elsewhere,
    pending_on_others,
    remove_idle_consumers,
)


def ensure_group(client: Redis, stream: str, group: str) -> None:
    """Create the consumer group at id 0 (with the stream) unless it exists."""
    try:
        client.xgroup_create(stream, group, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def is_missing_group(exc: ResponseError) -> bool:
    """Whether the stream or group is gone: Redis restarted without persistence, or
    someone deleted the stream (`UNBLOCKED …` when a read was waiting on it; fakeredis
    says the key must exist)."""
    message = str(exc)
    return (
        "NOGROUP" in message
        or message.startswith("UNBLOCKED")
        or "requires the key to exist" in message
    )


@dataclass
class GroupRead:
    """One read of new entries, with what the caller needs to know what else exists.

    `clock_ms`: the server's clock just before the read. Entry ids take that clock,
    so every entry of an earlier millisecond was in its stream then and was either
    delivered by this read, pending on some consumer, or acked.
    `others`: per stream, how many entries are pending on other consumers.
    `signalled`: the read's `signal` key existed (and was taken).
    """

    entries: list[Entry]
    clock_ms: int
    others: dict[str, int]
    signalled: bool = False


def read_group(
    client: Redis,
    group: str,
    consumer: str,
    streams: Sequence[str],
    count: int,
    block_ms: int | None,
    watched: Sequence[str] | None = None,
    signal: str | None = None,
) -> GroupRead:
    """TIME, XREADGROUP of new entries (`>`) of `streams` (none: no read), XPENDING of
    each `watched` stream (default: `streams`), then GETDEL of `signal` (a key in the
    streams' slot): one round trip."""
    watched = streams if watched is None else watched
    commands: list[tuple[Any, ...]] = [("TIME",)]
    if streams:
        commands.append(_xreadgroup(group, consumer, streams, count, block_ms))
    commands += [("XPENDING", stream, group) for stream in watched]
    if signal is not None:
        commands.append(("GETDEL", signal))
    clock, *replies = _round_trip(client, watched[0] if watched else streams[0], commands)
    reply = replies.pop(0) if streams else None
    signalled = replies.pop() is not None if signal is not None else False
    others = {
        stream: pending_on_others(summary, consumer)
        for stream, summary in zip(watched, replies, strict=True)
    }
    clock_ms = int(clock[0]) * 1000 + int(clock[1]) // 1000
    return GroupRead(to_entries(reply), clock_ms, others, signalled)


def read_new(
    client: Redis,
    group: str,
    consumer: str,
    streams: Sequence[str],
    count: int,
    block_ms: int | None,
) -> list[Entry]:
    """XREADGROUP of new entries (`>`) of `streams`, read as `read_group` reads them."""
    command = _xreadgroup(group, consumer, streams, count, block_ms)
    (reply,) = _round_trip(client, streams[0], [command])
    return to_entries(reply)


def _xreadgroup(
    group: str, consumer: str, streams: Sequence[str], count: int, block_ms: int | None
) -> tuple[Any, ...]:
    args: list[str | int] = ["XREADGROUP", "GROUP", group, consumer, "COUNT", count]
    if block_ms is not None:
        args += ["BLOCK", block_ms]
    return (*args, "STREAMS", *streams, *(">" for _ in streams))


def _round_trip(client: Redis, key: str, commands: list[tuple[Any, ...]]) -> list[Any]:
    """Send `commands` (all on `key`'s server) in one write and read their replies raw;
    an error reply is raised.

    Straight off a connection: redis-py's reply callback builds a dict per entry,
    which cost as much as the read itself on the event path; the raw reply (nested
    lists, parsed by hiredis) is turned into entries by `to_entries` instead. On a
    cluster, a MOVED or ASK reply (the slot moving) refreshes the slot map and the
    commands go again: a redirected command did not run.
    """
    for attempt in itertools.count():
        pool = nodes.pool_for(client, key)
        conn = pool.get_connection()
        try:
            conn.send_packed_command(conn.pack_commands(commands))
            return [conn.read_response(disable_decoding=True) for _ in commands]
        except ResponseError as exc:
            conn.disconnect()  # later replies may be left unread
            if nodes.redirect_of(exc) is None or attempt >= MAX_REDIRECTS:
                raise
            nodes.refresh(client, force=True)
            time.sleep(min(0.05 * attempt, 0.5))  # ASK: the slot's migration to end
        except BaseException:
            conn.disconnect()
            nodes.refresh(client)
            raise
        finally:
            pool.release(conn)
    raise AssertionError("unreachable")


__all__ = [
    "FIRST_PAGE",
    "PAYLOAD",
    "PENDING_PAGE",
    "Backoff",
    "Entry",
    "GroupRead",
    "RedisClock",
    "claim_idle",
    "claim_own",
    "dead_letter",
    "dead_letter_payload",
    "ensure_group",
    "entries_of",
    "fill_deliveries",
    "is_missing_group",
    "keep_fresh",
    "own_pending",
    "pending_elsewhere",
    "read_group",
    "read_new",
    "redis_time_ms",
    "remove_idle_consumers",
    "stream_entries",
    "to_entries",
]
