"""Dead letters: an entry that will never be applied, written to the dead-letter stream.

See docs/protocol.md, "Dead letters".
"""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
from redis import Redis
from redis.client import Pipeline

from usermgmt.domain.errors import DeadLetterReason
from usermgmt.workers.runtime.entries import Entry


def dead_letter(
    pipe: Pipeline | Redis,
    dlq: str,
    entry: Entry,
    reason: DeadLetterReason | str,
    message: str,
    payload_text: str | None = None,
) -> None:
    """Queue an XADD of a dead letter: the original payload, reason and message."""
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
