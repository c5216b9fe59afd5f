"""Pending entries: who holds what, taking entries over, keeping them in hand.

An entry a consumer read stays pending on it until acked. These read the pending
lists (XPENDING), deliver pending entries again (XCLAIM, XAUTOCLAIM), reset their
idle time, and drop consumers that hold nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from typing import Any

from redis import Redis
from redis.exceptions import ResponseError

from usermgmt.domain.events import entry_id_key
from usermgmt.domain.payloads import text_of
from usermgmt.workers.runtime.entries import Entry, stream_entries

PENDING_PAGE = 500  # XPENDING rows per call, at most
FIRST_PAGE = 16  # when the first row is usually all that is needed


def pending_on_others(summary: Any, consumer: str) -> int:
    """Entries pending on consumers other than `consumer`, from an XPENDING summary."""
    if isinstance(summary, ResponseError):
        raise summary
    if not summary or not summary[3]:
        return 0
    mine = consumer.encode()
    return sum(int(count) for name, count in summary[3] if name != mine)


def pending_elsewhere(
    client: Redis, stream: str, group: str, consumer: str, after: str | None = None
) -> Iterator[str]:
    """Ids of the entries of `stream` pending on other consumers (after `after`), oldest
    first, read a page at a time: callers usually stop at the first."""
    name = consumer.encode()
    for row in _pending(client, stream, group, after, page=FIRST_PAGE):
        if _raw(row["consumer"]) != name:
            yield text_of(row["message_id"])


def own_pending(client: Redis, stream: str, group: str, consumer: str) -> list[str]:
    """Ids of this consumer's pending entries of `stream`, oldest first (nothing delivered)."""
    return [text_of(row["message_id"]) for row in _pending(client, stream, group, None, consumer)]


def keep_fresh(client: Redis, group: str, consumer: str, held: dict[str, list[str]]) -> set[str]:
    """Reset the idle time of entries in hand (XCLAIM JUSTID: no delivery is counted).

    `held`: entry ids by stream. Only entries still pending on this consumer are touched:
    one that another consumer took over (it sat idle while this one was stalled or
    stopping) stays theirs; XCLAIM alone would take it back, and both would hold it.
    Returns the ids to let go: no longer pending here (taken over, or decided and acked
    by another worker, or trimmed).
    """
    pipe = client.pipeline(transaction=False)
    asked: list[list[str]] = []
    gone: set[str] = set()
    for stream, ids in held.items():
        ours = set(own_pending(client, stream, group, consumer)) if ids else set()
        mine = [entry_id for entry_id in ids if entry_id in ours]
        gone.update(entry_id for entry_id in ids if entry_id not in ours)
        if mine:
            pipe.xclaim(stream, group, consumer, 0, list[Any](mine), justid=True)
            asked.append(mine)
    for ids, claimed in zip(asked, pipe.execute() if asked else [], strict=True):
        still = {text_of(entry_id) for entry_id in claimed}
        gone.update(entry_id for entry_id in ids if entry_id not in still)
    return gone


def claim_own(
    client: Redis, stream: str, group: str, consumer: str, ids: list[str], delivery: bool = True
) -> list[Entry]:
    """This consumer's own pending entries, in hand again.

    `delivery`: a retry after a crash counts as one (XCLAIM). Taking back what a lost
    reply left pending does not: the read that delivered it counted once, and the acks
    of entries already applied may have been lost over and over while Redis restarted
    (XCLAIM JUSTID, then the entries read with XRANGE).
    """
    if not ids:
        return []
    if delivery:
        messages = client.xclaim(stream, group, consumer, 0, list[Any](ids))
        found = [m for m in messages if m is not None and m[1] is not None]
        entries = stream_entries(stream, found)
    else:
        client.xclaim(stream, group, consumer, 0, list[Any](ids), justid=True)
        entries = entries_of(client, stream, ids)
    fill_deliveries(client, group, entries)
    gone = set(ids) - {entry.entry_id for entry in entries}
    if gone:  # trimmed or deleted meanwhile: nothing left to apply
        client.xack(stream, group, *gone)
    return entries


def entries_of(client: Redis, stream: str, ids: Sequence[str]) -> list[Entry]:
    """The entries of `stream` with these ids, read without delivering them (XRANGE)."""
    pipe = client.pipeline(transaction=False)
    for entry_id in ids:
        pipe.xrange(stream, entry_id, entry_id)
    entries: list[Entry] = []
    for found in pipe.execute() if ids else []:
        entries += stream_entries(stream, found)
    return entries


def claim_idle(
    client: Redis,
    stream: str,
    group: str,
    consumer: str,
    min_idle_ms: int,
    count: int,
    keep: Collection[str] = (),
    stopped_mark: Callable[[str], str] | None = None,
) -> list[Entry]:
    """Take over up to `count` entries left pending for longer than `min_idle_ms`.

    The pending list is searched oldest first for idle entries only (XPENDING IDLE), so
    entries kept fresh never hide idle ones behind them: XAUTOCLAIM looks at no more
    than ten times COUNT entries per call, and a consumer holding that many waiting
    entries at the front of the list made every entry behind them unreachable. This
    consumer's own idle entries in `keep` (already in hand) are claimed with JUSTID,
    which counts no delivery, and not returned; the rest are delivered with XCLAIM,
    which takes each only if it is still idle (another consumer may have been first).
    Entries of a consumer that stopped cleanly (its `stopped_mark` key exists: it was
    not handed them to crash) are claimed with JUSTID too and read with XRANGE.
    """
    kept: list[str] = []
    wanted: list[tuple[str, str]] = []  # (entry id, the consumer holding it)
    for row in _pending(client, stream, group, None, idle_ms=min_idle_ms or None):
        entry_id = text_of(row["message_id"])
        if entry_id in keep:
            kept.append(entry_id)
        else:
            wanted.append((entry_id, text_of(row["consumer"])))
        if len(wanted) >= count:
            break
    if kept:
        client.xclaim(stream, group, consumer, min_idle_ms, list[Any](kept), justid=True)
    if not wanted:
        return []
    stopped = _stopped_cleanly(client, {holder for _, holder in wanted}, stopped_mark)
    counted = [entry_id for entry_id, holder in wanted if holder not in stopped]
    uncounted = [entry_id for entry_id, holder in wanted if holder in stopped]
    entries: list[Entry] = []
    deleted: list[str] = []  # deleted while pending: nothing left to apply
    if counted:
        messages = client.xclaim(stream, group, consumer, min_idle_ms, list[Any](counted))
        deleted += [text_of(m[0]) for m in messages if m is not None and m[1] is None]
        entries += stream_entries(
            stream, [m for m in messages if m is not None and m[1] is not None]
        )
    if uncounted:
        ids = client.xclaim(stream, group, consumer, min_idle_ms, list[Any](uncounted), justid=True)
        taken = [text_of(entry_id) for entry_id in ids]
        found = entries_of(client, stream, taken)
        deleted += sorted(set(taken) - {entry.entry_id for entry in found})
        entries = sorted([*entries, *found], key=lambda entry: entry_id_key(entry.entry_id))
    if deleted:
        client.xack(stream, group, *deleted)
    fill_deliveries(client, group, entries)
    return entries


def _stopped_cleanly(
    client: Redis, consumers: Collection[str], stopped_mark: Callable[[str], str] | None
) -> set[str]:
    """The consumers among these whose clean-stop mark exists (one round trip)."""
    if stopped_mark is None or not consumers:
        return set()
    names = sorted(consumers)
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.exists(stopped_mark(name))
    return {name for name, found in zip(names, pipe.execute(), strict=True) if found}


def remove_idle_consumers(
    client: Redis, stream: str, group: str, idle_ms: int, keep: Collection[str] = ()
) -> list[str]:
    """Delete consumers idle for more than `idle_ms` with nothing pending; returns their names.

    A consumer with pending entries is never deleted (that would drop its entries from
    the group), nor one named in `keep` (the caller and workers with a live heartbeat:
    on Redis 7.0 an idle time only counts deliveries, so a quiet live worker looks idle).
    """
    try:
        consumers: list[dict[str, Any]] = client.xinfo_consumers(stream, group)
    except ResponseError:  # the stream or the group does not exist (yet)
        return []
    removed: list[str] = []
    for consumer in consumers:
        name = text_of(consumer["name"])
        if name in keep or int(consumer["pending"]) > 0 or int(consumer["idle"]) <= idle_ms:
            continue
        client.xgroup_delconsumer(stream, group, name)
        removed.append(name)
    return removed


def fill_deliveries(client: Redis, group: str, entries: Iterable[Entry]) -> None:
    """Set each entry's delivery count from XPENDING (one round trip)."""
    entries = list(entries)
    if not entries:
        return
    pipe = client.pipeline(transaction=False)
    for entry in entries:
        pipe.xpending_range(entry.stream, group, min=entry.entry_id, max=entry.entry_id, count=1)
    for entry, rows in zip(entries, pipe.execute(), strict=True):
        if rows:
            entry.deliveries = int(rows[0]["times_delivered"])


def _pending(
    client: Redis,
    stream: str,
    group: str,
    after: str | None,
    consumer: str | None = None,
    page: int = PENDING_PAGE,
    idle_ms: int | None = None,
) -> Iterator[dict[str, Any]]:
    """XPENDING rows of `stream` (of one consumer, or all; idle for `idle_ms` at least)
    after `after`, oldest first.

    Pages start at `page` rows and grow to `PENDING_PAGE`.
    """
    start = "-" if after is None else _next_id(after)
    while True:
        rows = client.xpending_range(
            stream, group, min=start, max="+", count=page, consumername=consumer, idle=idle_ms
        )
        yield from rows
        if len(rows) < page:
            return
        start = _next_id(text_of(rows[-1]["message_id"]))
        page = min(page * 4, PENDING_PAGE)


def _next_id(entry_id: str) -> str:
    """The smallest entry id after `entry_id` (XPENDING ranges are inclusive)."""
    ms, seq = entry_id_key(entry_id)
    return f"{ms}-{seq + 1}"


def _raw(value: object) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()
