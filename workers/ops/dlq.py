"""The dead-letter stream: list, show, retry and purge letters (`usermgmt dlq`).

A retry re-publishes the letter's original payload to the event stream it came from
and deletes the letter, in one MULTI/EXEC guarded by WATCH, so a letter is
re-published at most once even when two operators retry it at the same moment.
Event ids make a repeated publish harmless anyway.

A letter taken out of `um:dlq` (retried or purged) leaves a record in
`um:dlq:retired`: which entry was dead-lettered, and why. Some decisions cannot be
made again from the streams (`unknown_user`: the player registered later;
`max_deliveries`), and a replay takes them from the letters; without the record it
would apply the retried entry at its old place too.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from redis import Redis
from redis.exceptions import WatchError
from redis.typing import EncodableT, FieldT

from usermgmt.domain.errors import InvalidPayload
from usermgmt.domain.events import EventKind, parse_event
from usermgmt.domain.payloads import text_of
from usermgmt.persistence import nodes
from usermgmt.persistence.keys import Keys
from usermgmt.workers.runtime.redis_info import xrange_rows

PAGE = 1_000
WATCH_ATTEMPTS = 100


class NotRetryable(Exception):
    """A dead letter that cannot be re-published; the message says why and what to do."""


class LetterNotFound(Exception):
    """No dead letter has this id."""


@dataclass(frozen=True)
class Letter:
    """One dead letter (docs/protocol.md, "Dead letters"), with its own id in the DLQ stream."""

    id: str
    stream: str
    entry_id: str
    payload: str
    reason: str
    message: str
    deliveries: int | None
    failed_at: str

    @classmethod
    def from_fields(cls, letter_id: str, fields: dict[bytes, bytes]) -> Letter:
        """Decode a DLQ entry; a letter that is not readable JSON keeps its raw text."""
        raw = fields.get(b"payload", b"")
        try:
            data: dict[str, Any] = orjson.loads(raw)
            if not isinstance(data, dict):
                raise TypeError
        except (orjson.JSONDecodeError, TypeError):
            return cls(letter_id, "", "", text_of(raw), "unreadable", "not a dead letter", None, "")
        deliveries = data.get("deliveries")
        return cls(
            id=letter_id,
            stream=str(data.get("stream", "")),
            entry_id=str(data.get("entry_id", "")),
            payload=str(data.get("payload", "")),
            reason=str(data.get("reason", "unknown")),
            message=str(data.get("message", "")),
            deliveries=deliveries if isinstance(deliveries, int) else None,
            failed_at=str(data.get("failed_at", "")),
        )

    def to_json(self, parse_payload: bool = False) -> dict[str, Any]:
        """A dict for `--json`; the payload parsed when asked and when it is JSON."""
        data: dict[str, Any] = {
            "id": self.id,
            "stream": self.stream,
            "entry_id": self.entry_id,
            "reason": self.reason,
            "message": self.message,
            "deliveries": self.deliveries,
            "failed_at": self.failed_at,
            "payload": self.payload,
        }
        if parse_payload:
            try:
                data["payload"] = orjson.loads(self.payload)
            except orjson.JSONDecodeError:
                pass
        return data


def letters(client: Redis, keys: Keys, reason: str | None = None) -> Iterator[Letter]:
    """Every dead letter, oldest first (optionally only those with `reason`), page by page."""
    start = "-"
    while True:
        rows = xrange_rows(client, keys.dlq, start, "+", PAGE)
        for letter_id, fields in rows:
            letter = Letter.from_fields(letter_id, fields)
            if reason is None or letter.reason == reason:
                yield letter
        if len(rows) < PAGE:
            return
        start = f"({rows[-1][0]}"


def get_letter(client: Redis, keys: Keys, letter_id: str) -> Letter:
    """One dead letter by its DLQ entry id."""
    rows = xrange_rows(client, keys.dlq, letter_id, letter_id, 1)
    if not rows:
        raise LetterNotFound(f"no dead letter {letter_id} in {keys.dlq}")
    return Letter.from_fields(*rows[0])


def retry_target(keys: Keys, letter: Letter) -> str:
    """The stream a letter may go back to; raises `NotRetryable` with the reason otherwise."""
    if letter.stream == keys.auth_requests:
        raise NotRetryable(
            f"{letter.id}: an auth request cannot be retried: its password was removed "
            "when it was dead-lettered; the client must send the request again"
        )
    kinds = {keys.event_stream(kind): kind for kind in (*EventKind, "accounts")}
    if letter.stream not in kinds:
        raise NotRetryable(
            f"{letter.id}: stream {letter.stream!r} is not one of this deployment's event "
            f"streams ({', '.join(sorted(kinds))}); not re-publishing it"
        )
    kind = kinds[letter.stream]
    if isinstance(kind, EventKind):
        try:
            parse_event(kind, letter.payload)
        except InvalidPayload as exc:
            raise NotRetryable(
                f"{letter.id}: the payload can never apply ({exc.message}); fix the producer "
                "and publish a corrected event, then purge this letter"
            ) from None
    return letter.stream


def retry(client: Redis, keys: Keys, letter_id: str) -> str:
    """Re-publish one letter's original payload to its stream and delete the letter.

    Returns the new entry id. Raises `LetterNotFound` when the letter is gone (already
    retried or purged) and `NotRetryable` when it may not be re-published.

    On a single server both happen in one transaction. On a cluster the letter and the
    event streams live on different slots: the payload is published first, then the
    letter deleted, so a crash in between can publish it twice, which its `event_id`
    makes harmless.
    """
    if nodes.is_cluster(client):
        return _retry_across_slots(client, keys, letter_id)
    with client.pipeline(transaction=True) as pipe:
        for _ in range(WATCH_ATTEMPTS):
            try:
                pipe.watch(keys.dlq, keys.dlq_retired)  # type: ignore[no-untyped-call]
                check_retired(pipe, keys)
                rows = xrange_rows(pipe, keys.dlq, letter_id, letter_id, 1)
                if not rows:
                    raise LetterNotFound(f"no dead letter {letter_id} in {keys.dlq}")
                letter = Letter.from_fields(*rows[0])
                stream = retry_target(keys, letter)
                pipe.multi()
                pipe.xadd(stream, {"payload": letter.payload.encode("utf-8")})
                pipe.xadd(keys.dlq_retired, retired_record(letter, "retried"))
                pipe.xdel(keys.dlq, letter_id)
                entry_id, _, _ = pipe.execute()
                return text_of(entry_id)
            except WatchError:
                continue  # a letter was added meanwhile: read again
    raise NotRetryable(
        f"{letter_id}: the dead-letter stream kept changing during {WATCH_ATTEMPTS} attempts; "
        "try again"
    )


def _retry_across_slots(client: Redis, keys: Keys, letter_id: str) -> str:
    check_retired(client, keys)
    rows = xrange_rows(client, keys.dlq, letter_id, letter_id, 1)
    if not rows:
        raise LetterNotFound(f"no dead letter {letter_id} in {keys.dlq}")
    letter = Letter.from_fields(*rows[0])
    entry_id = client.xadd(retry_target(keys, letter), {"payload": letter.payload.encode()})
    client.xadd(keys.dlq_retired, retired_record(letter, "retried"))
    client.xdel(keys.dlq, letter_id)
    return text_of(entry_id)


def purge(client: Redis, keys: Keys, reason: str | None = None) -> int:
    """Delete every letter (or those with `reason`), each leaving its record in
    `um:dlq:retired`; returns how many were deleted.

    On one server each page's records and deletions are one transaction; on a cluster
    (two slots) the records go first, so a crash between leaves a letter in both,
    which a replay reads alike.
    """
    check_retired(client, keys)
    found = list(letters(client, keys, reason))
    for start in range(0, len(found), PAGE):
        page = found[start : start + PAGE]
        with client.pipeline(transaction=not nodes.is_cluster(client)) as pipe:
            for letter in page:
                pipe.xadd(keys.dlq_retired, retired_record(letter, "purged"))
            if nodes.is_cluster(client):
                pipe.execute()
            pipe.xdel(keys.dlq, *[letter.id for letter in page])
            pipe.execute()
    return len(found)


def check_retired(client: Redis, keys: Keys) -> None:
    """`NotRetryable` when `um:dlq:retired` holds another type of value than a stream: in
    a transaction Redis would still run the rest (the letter deleted, its record not
    written), and a replay would then apply its entry where the live worker did not."""
    kind = text_of(client.type(keys.dlq_retired))
    if kind not in ("none", "stream"):
        raise NotRetryable(
            f"Redis key {keys.dlq_retired} holds a {kind}, not the stream of retired "
            "letters; rename or delete it, then try again"
        )


def retired_record(letter: Letter, how: str) -> dict[FieldT, EncodableT]:
    """The `um:dlq:retired` entry of a letter taken out of `um:dlq`: its fields but the
    payload (the event itself stays in its stream), how it went, and when."""
    record = {**letter.to_json(), "letter_id": letter.id, "retired": how}
    record["retired_at"] = datetime.now(UTC).isoformat()
    del record["payload"], record["id"]
    return {"payload": orjson.dumps(record)}
