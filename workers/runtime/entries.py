"""Stream entries as the consumers hold them, and the one parser of Redis's replies."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from usermgmt.domain.events import entry_id_key
from usermgmt.domain.payloads import text_of

PAYLOAD = b"payload"


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


def to_entries(reply: Any, deliveries: int = 1) -> list[Entry]:
    """Entries of an XREADGROUP reply: `[[stream, messages], ...]`, or a map of stream
    to messages (RESP3), each as `stream_entries` reads them."""
    entries: list[Entry] = []
    if not reply:
        return entries
    for stream, messages in reply.items() if isinstance(reply, dict) else reply:
        entries += stream_entries(text_of(stream), messages, deliveries)
    return entries


def stream_entries(stream: str, messages: Iterable[Any], deliveries: int = 1) -> list[Entry]:
    """Entries of one stream's messages (XREADGROUP, XCLAIM, XAUTOCLAIM, XRANGE replies).

    Each message is `[id, fields]`, the fields as Redis sends them (`[name, value, ...]`,
    read straight off a connection on the hot path) or as redis-py's reply callbacks
    turn them (a dict). No fields: deleted while pending (the entry has no payload).
    A None message (XCLAIM of a deleted entry on some servers) is left out.
    """
    entries: list[Entry] = []
    append = entries.append
    for message in messages:
        if message is None:
            continue
        entry_id, fields = message
        payload = None
        if fields:
            if type(fields) is list and fields[0] == PAYLOAD:  # the one field written here
                payload = fields[1]
            elif isinstance(fields, dict):
                payload = fields.get(PAYLOAD)
            else:
                payload = dict(zip(fields[::2], fields[1::2], strict=True)).get(PAYLOAD)
        # Inlined `text_of`: this loop runs for every entry the event worker reads.
        name = entry_id.decode() if type(entry_id) is bytes else text_of(entry_id)
        append(Entry(stream, name, payload, deliveries))
    return entries
