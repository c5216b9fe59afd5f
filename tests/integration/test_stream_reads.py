"""`read_group`: XREADGROUP read straight off the connection, on every Redis backend."""

from __future__ import annotations

import pytest
from redis.exceptions import ResponseError

from persistence.keys import EVENTS_GROUP
from tests.conftest import Backend
from workers.streams import ensure_group, read_group


def test_new_entries_of_both_streams_come_back_in_stream_order(backend: Backend) -> None:
    redis, keys = backend.redis, backend.keys
    streams = [keys.update_stream, keys.terminate_stream]
    for stream in streams:
        ensure_group(redis, stream, EVENTS_GROUP)
    first = redis.xadd(keys.update_stream, {"payload": b'{"a": 1}'}).decode()
    other = redis.xadd(keys.update_stream, {"other": b"x", "payload": b'{"b": 2}'}).decode()
    bare = redis.xadd(keys.update_stream, {"data": b"{}"}).decode()
    ended = redis.xadd(keys.terminate_stream, {"payload": b"{}"}).decode()

    entries = read_group(redis, EVENTS_GROUP, "c1", streams, 10, None)

    got = [(e.stream, e.entry_id, e.payload, e.deliveries) for e in entries]
    assert got == [
        (keys.update_stream, first, b'{"a": 1}', 1),
        (keys.update_stream, other, b'{"b": 2}', 1),
        (keys.update_stream, bare, None, 1),
        (keys.terminate_stream, ended, b"{}", 1),
    ]
    assert read_group(redis, EVENTS_GROUP, "c1", streams, 10, None) == []  # all delivered
    pending = redis.xpending(keys.update_stream, EVENTS_GROUP)
    assert pending["pending"] == 3


def test_count_is_per_stream_and_a_block_returns_empty(backend: Backend) -> None:
    redis, keys = backend.redis, backend.keys
    ensure_group(redis, keys.update_stream, EVENTS_GROUP)
    for n in range(5):
        redis.xadd(keys.update_stream, {"payload": b"%d" % n})
    entries = read_group(redis, EVENTS_GROUP, "c1", [keys.update_stream], 2, None)
    assert [e.payload for e in entries] == [b"0", b"1"]
    read_group(redis, EVENTS_GROUP, "c1", [keys.update_stream], 10, None)
    assert read_group(redis, EVENTS_GROUP, "c1", [keys.update_stream], 10, 10) == []


def test_a_missing_group_is_redis_error(backend: Backend) -> None:
    redis, keys = backend.redis, backend.keys
    redis.xadd(keys.update_stream, {"payload": b"{}"})
    with pytest.raises(ResponseError, match="NOGROUP"):
        read_group(redis, EVENTS_GROUP, "c1", [keys.update_stream], 10, None)
    assert redis.ping()  # the connection went back to the pool in a usable state
