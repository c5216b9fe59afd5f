"""Ending a request: push its reply or dead-letter it, then ack and delete the entry.

The entry is deleted as well as acked so no password stays in Redis; a dead letter
keeps the payload only with every password and token redacted.
"""

from __future__ import annotations

from typing import Any

import orjson
from redis import Redis
from redis.client import Pipeline

from usermgmt.domain.auth import REPLY_TTL_S, REQUEST_MAX_AGE_S, redact
from usermgmt.persistence import nodes
from usermgmt.persistence.keys import AUTH_GROUP, Keys
from usermgmt.workers.runtime.clock import redis_time_ms
from usermgmt.workers.runtime.streams import Entry, dead_letter


def finish(
    redis: Redis,
    keys: Keys,
    entry: Entry,
    reply: tuple[Any, dict[str, Any]] | None,
    dead: tuple[str, str] | None = None,
    pipe: Pipeline | None = None,
) -> None:
    """Reply (or dead-letter), then ack and delete the entry, in one round trip.

    `reply` is `(request_id, body)`; `dead` is `(reason, message)`. `pipe` may already
    hold commands that must run before the reply is pushed.

    On one server this is a transaction (`finishing`). On a Redis Cluster these keys
    live on different nodes, and a pipeline runs on each node independently: the order
    is kept by waiting for each step's replies (the handler's commands, then the reply
    or dead letter, then the ack): three round trips.
    """
    cluster = nodes.is_cluster(redis)
    if pipe is None:
        pipe = finishing(redis)
    elif cluster and len(pipe):
        pipe.execute()  # a login's token exists before its reply can be read
    if reply is not None:
        request_id, body = reply
        key = keys.reply(request_id)
        pipe.lpush(key, orjson.dumps(body))
        pipe.expire(key, REPLY_TTL_S)
    if dead is not None:
        reason, message = dead
        dead_letter(
            pipe,
            keys.dlq,
            entry,
            reason,
            message,
            payload_text=redacted_text(entry.payload),
        )
    if cluster:
        pipe.execute()
    pipe.xack(entry.stream, AUTH_GROUP, entry.entry_id)
    pipe.xdel(entry.stream, entry.entry_id)
    pipe.execute()


def finishing(redis: Redis) -> Pipeline:
    """The pipeline `finish` sends: on one server a transaction, so the ack and delete
    run only with the reply (a Redis at its memory limit refuses the reply: then
    nothing runs, and the request stays pending, to be answered once it takes writes).
    A cluster's keys live on several nodes: `finish` orders the steps there instead."""
    return redis.pipeline(transaction=not nodes.is_cluster(redis))


def redacted_text(payload: bytes | None) -> str:
    """The payload without any password or token, for a dead letter."""
    if payload is None:
        return ""
    try:
        return orjson.dumps(redact(orjson.loads(payload))).decode()
    except orjson.JSONDecodeError:
        return f"[not JSON, {len(payload)} bytes; withheld because it may contain a secret]"


def drop_stale_requests(redis: Redis, keys: Keys) -> int:
    """Delete the requests older than `REQUEST_MAX_AGE_S` that nobody has read (no auth
    consumer runs, or none keeps up); returns how many.

    An auth consumer would drop them unanswered when it read them, and they hold
    passwords: every worker (events-only ones too) trims them away as it beats, so no
    password outlives its request by more than a heartbeat. Entry ids carry the Redis
    server's clock, so the cut is taken on it. One a consumer is serving was read
    already; one left pending comes back without its fields, and is dropped as stale.
    """
    cut_ms = redis_time_ms(redis) - REQUEST_MAX_AGE_S * 1000
    return int(redis.xtrim(keys.auth_requests, minid=f"{cut_ms}-0", approximate=False))
