"""Helpers for integration tests: publish events, drain the consumer, read tables."""

from __future__ import annotations

import threading
import uuid
from typing import Any

import orjson
import sqlalchemy as sa
from redis import Redis

from persistence.keys import Keys
from workers.bootstrap import Services
from workers.event_consumer import EventConsumer


def publish(redis: Redis, keys: Keys, kind: str, **payload: Any) -> str:
    """XADD one event (an event id is made up unless given); returns the entry id."""
    payload.setdefault("event_id", str(uuid.uuid4()))
    entry_id = redis.xadd(keys.event_stream(kind), {"payload": orjson.dumps(payload)})
    return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)


def drain(services: Services, consumer: str = "test-consumer") -> EventConsumer:
    """Run the event consumer in burst mode until both streams are drained."""
    worker = EventConsumer(services, consumer, threading.Event(), burst=True)
    worker.run()
    return worker


def rows(services: Services, sql: str, **params: Any) -> list[tuple[Any, ...]]:
    """Run a query and return plain tuples."""
    with services.engine.connect() as conn:
        return [tuple(row) for row in conn.execute(sa.text(sql), params)]


def dead_letters(redis: Redis, keys: Keys) -> list[dict[str, Any]]:
    """Decoded payloads of the dead-letter stream, oldest first."""
    return [orjson.loads(fields[b"payload"]) for _, fields in redis.xrange(keys.dlq)]
