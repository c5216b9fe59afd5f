"""Publishing game events from Python services, validated with the worker's own schemas.

    from redis import Redis
    from usermgmt import Publisher

    publisher = Publisher(Redis.from_url("redis://localhost:6379/0"))
    publisher.update("eu-1-000042", ["alice", "bob"], meta={"map": "dust"})
    publisher.terminate(
        "eu-1-000042",
        [{"username": "alice", "outcome": "win", "earnings": 150},
         {"username": "bob", "outcome": "loss", "earnings": 0}],
    )
    with publisher.batch() as batch:       # one round trip, all or nothing
        batch.update("eu-1-000043", ["carol", "dave"])
        batch.update("eu-1-000044", ["erin", "frank"])

Every call validates the event first (an `InvalidEvent` names the broken field) and
makes up an `event_id` unless one is given. Pass the same `event_id` to publish the
same event again safely: the worker applies it once.

When Redis refuses a publish, `PublishFailed` (a redis `ResponseError`) says which
events it added (`published`) and which it may have added (`unknown`): a refused
MULTI leaves the XADDs to run one by one, and a transaction whose command fails
when it runs keeps the others.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import orjson
from pydantic import ValidationError
from redis import Redis
from redis.client import Pipeline
from redis.exceptions import ExecAbortError, ResponseError

from usermgmt.domain.auth import describe_validation_error
from usermgmt.domain.events import EventKind, GameEvent, TerminateEvent, UpdateEvent
from usermgmt.domain.ids import new_event_id
from usermgmt.domain.payloads import text_of
from usermgmt.persistence.keys import Keys

_MODELS: dict[EventKind, type[UpdateEvent] | type[TerminateEvent]] = {
    EventKind.UPDATE: UpdateEvent,
    EventKind.TERMINATE: TerminateEvent,
}


class InvalidEvent(ValueError):
    """An event the worker would dead-letter: the message names the field and the rule."""


class PublishFailed(ResponseError):
    """Redis refused a batch or part of it.

    `error` is Redis's refusal; `published` are the events Redis added, `unknown` those
    it may or may not have added; it added none of the others.
    """

    def __init__(
        self,
        error: ResponseError,
        published: Sequence[GameEvent],
        unknown: Sequence[GameEvent],
        total: int,
    ) -> None:
        if unknown:
            outcome = f"{len(unknown)} of {total} event(s) may have been published"
        else:
            outcome = f"{len(published)} of {total} event(s) were published"
        super().__init__(f"{error}; {outcome}")
        self.error = error
        self.published = list(published)
        self.unknown = list(unknown)


def build_event(kind: EventKind | str, data: Mapping[str, Any]) -> GameEvent:
    """Validate `data` as an event of `kind`, adding a fresh `event_id` when it has none."""
    kind = EventKind(kind)
    if not isinstance(data, Mapping):
        raise InvalidEvent(f"{kind} event must be a JSON object, got {type(data).__name__}")
    values = dict(data)
    if values.get("event_id") is None:
        values["event_id"] = str(new_event_id())
    try:
        return _MODELS[kind].model_validate(values)
    except ValidationError as exc:
        raise InvalidEvent(f"{kind} event: {describe_validation_error(exc)}") from None


def payload_of(event: GameEvent) -> bytes:
    """The JSON the worker reads from the `payload` field."""
    return orjson.dumps(event.model_dump(mode="json"))


def _update_data(
    session_id: str,
    players: Sequence[str],
    status: str,
    meta: Mapping[str, Any] | None,
    event_id: str | uuid.UUID | None,
) -> dict[str, Any]:
    return {
        "event_id": str(event_id) if event_id is not None else None,
        "session_id": session_id,
        "players": list(players),
        "status": status,
        "meta": dict(meta or {}),
    }


def _terminate_data(
    session_id: str,
    results: Sequence[Mapping[str, Any]],
    reason: str,
    event_id: str | uuid.UUID | None,
) -> dict[str, Any]:
    return {
        "event_id": str(event_id) if event_id is not None else None,
        "session_id": session_id,
        "results": [dict(result) for result in results],
        "reason": reason,
    }


class Batch:
    """Events queued on one MULTI/EXEC pipeline; published when the `with` block ends."""

    def __init__(self, keys: Keys, pipe: Pipeline) -> None:
        self.keys = keys
        self.pipe = pipe
        self.events: list[GameEvent] = []
        self.entry_ids: list[str] = []  # filled in when the batch is published

    def add(self, kind: EventKind | str, data: Mapping[str, Any]) -> GameEvent:
        """Validate and queue one event given as a mapping (as in a JSON line)."""
        return self.add_event(build_event(kind, data))

    def add_event(self, event: GameEvent) -> GameEvent:
        """Queue one event already validated (by `build_event`)."""
        kind = EventKind.UPDATE if isinstance(event, UpdateEvent) else EventKind.TERMINATE
        self.pipe.xadd(self.keys.event_stream(kind), {"payload": payload_of(event)})
        self.events.append(event)
        return event

    def update(
        self,
        session_id: str,
        players: Sequence[str],
        status: str = "in_progress",
        meta: Mapping[str, Any] | None = None,
        event_id: str | uuid.UUID | None = None,
    ) -> GameEvent:
        """Queue an update: the session's whole roster and its status."""
        data = _update_data(session_id, players, status, meta, event_id)
        return self.add(EventKind.UPDATE, data)

    def terminate(
        self,
        session_id: str,
        results: Sequence[Mapping[str, Any]],
        reason: str = "completed",
        event_id: str | uuid.UUID | None = None,
    ) -> GameEvent:
        """Queue a terminate: each finishing player's outcome and earnings."""
        data = _terminate_data(session_id, results, reason, event_id)
        return self.add(EventKind.TERMINATE, data)


def _execute(pipe: Pipeline, events: Sequence[GameEvent]) -> list[str]:
    """Send the queued XADDs; their entry ids, or `PublishFailed` saying what was added."""
    try:
        results = pipe.execute(raise_on_error=False)
    except ResponseError as exc:
        # redis-py raises a queued command's error (annotated "Command # n", n >= 1)
        # only once EXEC was aborted. When MULTI itself was refused (its error, "Command
        # # 0" on a cluster), the XADDs sent after it ran one by one.
        text = str(exc)
        queued = text.startswith("Command # ") and not text.startswith("Command # 0 ")
        aborted = isinstance(exc, ExecAbortError) or queued
        raise PublishFailed(exc, [], [] if aborted else events, len(events)) from exc
    failed = [result for result in results if isinstance(result, ResponseError)]
    if failed:
        # Redis does not roll a transaction back: the other XADDs were applied.
        added = [e for e, r in zip(events, results, strict=True) if not isinstance(r, Exception)]
        raise PublishFailed(failed[0], added, [], len(events))
    return [text_of(entry_id) for entry_id in results]


class Publisher:
    """Publishes update and terminate events to the streams under one key prefix."""

    def __init__(self, redis: Redis, prefix: str = "um") -> None:
        self.redis = redis
        self.keys = Keys(prefix)

    @contextmanager
    def batch(self) -> Iterator[Batch]:
        """Queue events, then publish them in one round trip (MULTI/EXEC).

        Nothing is sent when the block raises; `PublishFailed` when Redis refuses.
        """
        with self.redis.pipeline(transaction=True) as pipe:
            batch = Batch(self.keys, pipe)
            yield batch
            if batch.events:
                batch.entry_ids = _execute(pipe, batch.events)

    def publish(self, kind: EventKind | str, data: Mapping[str, Any]) -> GameEvent:
        """Validate and publish one event given as a mapping."""
        with self.batch() as batch:
            return batch.add(kind, data)

    def update(
        self,
        session_id: str,
        players: Sequence[str],
        status: str = "in_progress",
        meta: Mapping[str, Any] | None = None,
        event_id: str | uuid.UUID | None = None,
    ) -> GameEvent:
        """Publish an update; returns the event (its `event_id` is the idempotency key)."""
        data = _update_data(session_id, players, status, meta, event_id)
        return self.publish(EventKind.UPDATE, data)

    def terminate(
        self,
        session_id: str,
        results: Sequence[Mapping[str, Any]],
        reason: str = "completed",
        event_id: str | uuid.UUID | None = None,
    ) -> GameEvent:
        """Publish a terminate; returns the event."""
        data = _terminate_data(session_id, results, reason, event_id)
        return self.publish(EventKind.TERMINATE, data)
