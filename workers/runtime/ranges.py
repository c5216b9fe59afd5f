"""Entry ids as `(ms, seq)` keys, and paged XRANGE reads (replay, trim, backups)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from redis import Redis

from usermgmt.domain.events import entry_id_key
from usermgmt.domain.payloads import text_of

EntryKey = tuple[int, int]
FIRST: EntryKey = (0, 0)
LAST: EntryKey = (2**64 - 1, 2**64 - 1)


def format_id(key: EntryKey) -> str:
    """`(ms, seq)` -> `ms-seq`."""
    return f"{key[0]}-{key[1]}"


def successor(entry_id: str) -> EntryKey:
    """The smallest entry id after `entry_id`."""
    ms, seq = entry_id_key(entry_id)
    return ms, seq + 1


def predecessor(key: EntryKey) -> EntryKey | None:
    """The largest entry id before `key` (None before `0-0`)."""
    ms, seq = key
    if seq:
        return ms, seq - 1
    return (ms - 1, LAST[1]) if ms else None


def parse_id(text: str, end: bool = False) -> EntryKey:
    """`1700000000000-3`, or `1700000000000` for a whole millisecond (its first id, or its
    last one when `end`); raises ValueError otherwise."""
    ms, dash, seq = text.strip().partition("-")
    if not ms.isdigit() or (dash and not seq.isdigit()):
        raise ValueError(f"not a stream entry id: {text!r} (expected MS or MS-SEQ)")
    if dash:
        return int(ms), int(seq)
    return int(ms), LAST[1] if end else 0


def xrange_pages(
    client: Redis, stream: str, start: EntryKey, end: EntryKey, page: int = 2_000
) -> Iterator[list[tuple[str, dict[bytes, bytes]]]]:
    """The entries of `stream` in [start, end], oldest first, `page` at a time."""
    cursor = start
    while True:
        raw: Any = client.xrange(stream, min=format_id(cursor), max=format_id(end), count=page)
        batch = [(text_of(entry_id), fields or {}) for entry_id, fields in raw or []]
        if batch:
            yield batch
        if len(batch) < page:
            return
        cursor = successor(batch[-1][0])
