"""Stream plumbing shared by the consumers: groups, reading, claiming, dead letters."""

from __future__ import annotations

import time
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from redis import Redis
from redis.client import Pipeline
from redis.exceptions import ResponseError

from usermgmt.domain.errors import DeadLetterReason
from usermgmt.domain.events import entry_id_key

PAYLOAD = b"payload"
PENDING_PAGE = 500  # XPENDING rows per call, at most
FIRST_PAGE = 16  # when the first row is usually all that is needed


@dataclass(slots=True)
class Entry:
    """One stream entry as delivered to this consumer."""

    stream: str
    entry_id: str
    payload: bytes | None
    deliveries: int = 1

    @property
    def sort_key(self) -> tuple[int, int]:
        """Entry ids order by (milliseconds, sequence), across streams too."""
        return entry_id_key(self.entry_id)

    @property
    def timestamp_ms(self) -> int:
        return self.sort_key[0]


def ensure_group(client: Redis, stream: str, group: str) -> None:
    """Create the consumer group at id 0 (with the stream) unless it exists."""
    try:
        client.xgroup_create(stream, group, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def is_missing_group(exc: ResponseError) -> bool:
    """Whether Redis lost the stream or group (a restart without persistence)."""
    return "NOGROUP" in str(exc)


def to_entries(response: Any, deliveries: int = 1) -> list[Entry]:
    """Flatten an XREADGROUP reply (`[[stream, [(id, fields), ...]], ...]`)."""
    entries: list[Entry] = []
    if not response:
        return entries
    items = response.items() if isinstance(response, dict) else response
    for stream, messages in items:
        name = stream.decode() if isinstance(stream, bytes) else stream
        if isinstance(messages, list) and messages and isinstance(messages[0], list):
            messages = messages[0]  # RESP3 shape
        for entry_id, fields in messages:
            if fields is None:  # deleted while pending
                fields = {}
            entries.append(
                Entry(
                    stream=name,
                    entry_id=entry_id.decode() if isinstance(entry_id, bytes) else entry_id,
                    payload=fields.get(PAYLOAD),
                    deliveries=deliveries,
                )
            )
    return entries


@dataclass
class GroupRead:
    """One read of new entries, with what the caller needs to know what else exists.

    `clock_ms`: the server's clock just before the read. Entry ids take that clock,
    so every entry of an earlier millisecond was in its stream then and was either
    delivered by this read, pending on some consumer, or acked.
    `others`: per stream, how many entries are pending on other consumers.
    """

    entries: list[Entry]
    clock_ms: int
    others: dict[str, int]


def read_group(
    client: Redis,
    group: str,
    consumer: str,
    streams: Sequence[str],
    count: int,
    block_ms: int | None,
    watched: Sequence[str] | None = None,
) -> GroupRead:
    """TIME, XREADGROUP of new entries (`>`) of `streams` (none: no read), then XPENDING
    of each `watched` stream (default: `streams`): one round trip.

    Read straight off a connection: redis-py's reply callback builds a dict per entry,
    which cost as much as the read itself on the event path; the raw reply (nested
    lists, parsed by hiredis) is turned into entries here instead.
    """
    watched = streams if watched is None else watched
    commands: list[tuple[Any, ...]] = [("TIME",)]
    if streams:
        args: list[str | int] = ["XREADGROUP", "GROUP", group, consumer, "COUNT", count]
        if block_ms is not None:
            args += ["BLOCK", block_ms]
        args += ["STREAMS", *streams, *(">" for _ in streams)]
        commands.append(tuple(args))
    commands += [("XPENDING", stream, group) for stream in watched]
    pool = client.connection_pool
    conn = pool.get_connection()
    try:
        conn.send_packed_command(conn.pack_commands(commands))  # type: ignore[no-untyped-call]
        clock = conn.read_response(disable_decoding=True)
        reply = conn.read_response(disable_decoding=True) if streams else None
        summaries = [conn.read_response(disable_decoding=True) for _ in watched]
    except BaseException:
        conn.disconnect()  # type: ignore[no-untyped-call]
        raise
    finally:
        pool.release(conn)
    others = {
        stream: _pending_elsewhere(summary, consumer)
        for stream, summary in zip(watched, summaries, strict=True)
    }
    clock_ms = int(clock[0]) * 1000 + int(clock[1]) // 1000
    return GroupRead(_entries_of(reply), clock_ms, others)


def _pending_elsewhere(summary: Any, consumer: str) -> int:
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
            yield _text(row["message_id"])


def entries_of(client: Redis, stream: str, ids: Sequence[str]) -> list[Entry]:
    """The entries of `stream` with these ids, read without delivering them (XRANGE)."""
    pipe = client.pipeline(transaction=False)
    for entry_id in ids:
        pipe.xrange(stream, entry_id, entry_id)
    entries: list[Entry] = []
    for found in pipe.execute() if ids else []:
        for entry_id, fields in found:
            entries.append(Entry(stream, _text(entry_id), fields.get(PAYLOAD)))
    return entries


def keep_fresh(client: Redis, group: str, consumer: str, held: dict[str, list[str]]) -> set[str]:
    """Reset the idle time of entries in hand (XCLAIM JUSTID: no delivery is counted).

    `held`: entry ids by stream. Returns the ids that are no longer pending (another
    worker decided and acked them, or they were trimmed).
    """
    pipe = client.pipeline(transaction=False)
    asked = [(stream, ids) for stream, ids in held.items() if ids]
    for stream, ids in asked:
        pipe.xclaim(stream, group, consumer, 0, list[Any](ids), justid=True)
    gone: set[str] = set()
    for (_, ids), claimed in zip(asked, pipe.execute(), strict=True):
        still = {_text(entry_id) for entry_id in claimed}
        gone.update(entry_id for entry_id in ids if entry_id not in still)
    return gone


def _raw(value: object) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _entries_of(reply: Any) -> list[Entry]:
    """Entries of a raw XREADGROUP reply: `[[stream, [[id, [field, value, ...]], ...]], ...]`."""
    entries: list[Entry] = []
    if not reply:
        return entries
    for stream, messages in reply.items() if isinstance(reply, dict) else reply:
        name = stream.decode()
        for entry_id, pairs in messages:
            payload = None
            if pairs:  # None or empty: deleted while pending
                if pairs[0] == PAYLOAD:
                    payload = pairs[1]
                else:
                    payload = dict(zip(pairs[::2], pairs[1::2], strict=True)).get(PAYLOAD)
            entries.append(Entry(name, entry_id.decode(), payload))
    return entries


def read_history(
    client: Redis, streams: Sequence[str], group: str, consumer: str, count: int = 1000
) -> list[Entry]:
    """All of this consumer's own pending entries (left by a crash), oldest first.

    Reading them again counts as a delivery in Redis; the counts are fetched so the
    delivery limit is judged on Redis's numbers, not on memory.
    """
    entries: list[Entry] = []
    start = dict.fromkeys(streams, "0")
    while start:
        response = client.xreadgroup(group, consumer, start, count=count)  # type: ignore[arg-type]
        batch = to_entries(response)
        entries += batch
        for stream in list(start):
            mine = [entry for entry in batch if entry.stream == stream]
            if len(mine) < count:
                del start[stream]
            else:
                start[stream] = mine[-1].entry_id
    fill_deliveries(client, group, entries)
    entries.sort(key=lambda entry: entry.sort_key)
    return entries


def own_pending(client: Redis, stream: str, group: str, consumer: str) -> list[str]:
    """Ids of this consumer's pending entries of `stream`, oldest first (nothing delivered)."""
    return [_text(row["message_id"]) for row in _pending(client, stream, group, None, consumer)]


def _pending(
    client: Redis,
    stream: str,
    group: str,
    after: str | None,
    consumer: str | None = None,
    page: int = PENDING_PAGE,
) -> Iterator[dict[str, Any]]:
    """XPENDING rows of `stream` (of one consumer, or all) after `after`, oldest first.

    Pages start at `page` rows and grow to `PENDING_PAGE`.
    """
    start = "-" if after is None else _next_id(after)
    while True:
        rows = client.xpending_range(
            stream, group, min=start, max="+", count=page, consumername=consumer
        )
        yield from rows
        if len(rows) < page:
            return
        start = _next_id(_text(rows[-1]["message_id"]))
        page = min(page * 4, PENDING_PAGE)


def _next_id(entry_id: str) -> str:
    """The smallest entry id after `entry_id` (XPENDING ranges are inclusive)."""
    ms, seq = entry_id_key(entry_id)
    return f"{ms}-{seq + 1}"


def claim_own(client: Redis, stream: str, group: str, consumer: str, ids: list[str]) -> list[Entry]:
    """Deliver this consumer's own pending entries again (a retry counts as a delivery)."""
    if not ids:
        return []
    messages = client.xclaim(stream, group, consumer, 0, list[Any](ids))
    entries = to_entries([(stream, [m for m in messages if m is not None and m[1] is not None])])
    fill_deliveries(client, group, entries)
    gone = set(ids) - {entry.entry_id for entry in entries}
    if gone:  # trimmed or deleted meanwhile: nothing left to apply
        client.xack(stream, group, *gone)
    return entries


def claim_idle(
    client: Redis,
    stream: str,
    group: str,
    consumer: str,
    min_idle_ms: int,
    count: int,
    keep: Collection[str] = (),
) -> list[Entry]:
    """Take over entries another consumer left pending for longer than `min_idle_ms`.

    XAUTOCLAIM also takes this consumer's own idle entries. Those in `keep` (already
    in hand: scheduled for a retry, or buffered) are claimed with JUSTID, which does
    not count as a delivery, and are not returned; the rest are delivered with XCLAIM.
    """
    if keep:
        claimed = client.xautoclaim(
            stream, group, consumer, min_idle_ms, "0-0", count=count, justid=True
        )
        ids = [i.decode() if isinstance(i, bytes) else str(i) for i in claimed]
        return claim_own(client, stream, group, consumer, [i for i in ids if i not in keep])
    reply = client.xautoclaim(stream, group, consumer, min_idle_ms, "0-0", count=count)
    messages = reply[1]
    deleted = reply[2] if len(reply) > 2 else []
    if deleted:
        client.xack(stream, group, *deleted)
    entries = to_entries([(stream, [m for m in messages if m is not None])])
    fill_deliveries(client, group, entries)
    return entries


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
        raw = consumer["name"]
        name = raw.decode() if isinstance(raw, bytes) else str(raw)
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


def dead_letter(
    pipe: Pipeline | Redis,
    dlq: str,
    entry: Entry,
    reason: DeadLetterReason | str,
    message: str,
    payload_text: str | None = None,
) -> None:
    """Queue an XADD of a dead letter: the original payload, reason and message.

    See docs/protocol.md, "Dead letters".
    """
    pipe.xadd(dlq, {"payload": dead_letter_payload(entry, reason, message, payload_text)})


def dead_letter_payload(
    entry: Entry,
    reason: DeadLetterReason | str,
    message: str,
    payload_text: str | None = None,
) -> bytes:
    """The JSON `payload` of a dead letter: the original payload, reason and message."""
    if payload_text is None:
        payload_text = entry.payload.decode("utf-8", "replace") if entry.payload is not None else ""
    letter = {
        "stream": entry.stream,
        "entry_id": entry.entry_id,
        "payload": payload_text,
        "reason": str(reason),
        "message": message,
        "deliveries": entry.deliveries,
        "failed_at": datetime.now(UTC).isoformat(),
    }
    return orjson.dumps(letter)


def redis_time_ms(client: Redis) -> int:
    """The Redis server's clock, which also stamps entry ids."""
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


class RedisClock:
    """`redis_time_ms` without a round trip each time: the offset between the Redis
    server's clock and this host's, asked again every `refresh_s` seconds."""

    def __init__(self, client: Redis, refresh_s: float = 10.0) -> None:
        self.client, self.refresh_s = client, refresh_s
        self.offset_ms = 0.0
        self.asked = -refresh_s

    def now_ms(self) -> int:
        if time.monotonic() - self.asked >= self.refresh_s:
            self.offset_ms = redis_time_ms(self.client) - time.time() * 1000
            self.asked = time.monotonic()
        return int(time.time() * 1000 + self.offset_ms)


class Backoff:
    """Exponential backoff for reconnects: 0.2 s doubling to a cap, reset on success."""

    def __init__(self, first: float = 0.2, cap: float = 10.0) -> None:
        self.first, self.cap = first, cap
        self.delay = 0.0
        self.since: float | None = None

    def next_delay(self) -> float:
        if self.since is None:
            self.since = time.monotonic()
        self.delay = self.first if self.delay == 0 else min(self.cap, self.delay * 2)
        return self.delay

    def reset(self) -> None:
        self.delay, self.since = 0.0, None
