"""Stream reads on every Redis backend: `read_group` and `read_new` straight off the
connection, the others through redis-py, all parsed by `to_entries`."""

from __future__ import annotations

import pytest
from redis.exceptions import ResponseError

from tests.conftest import Backend
from usermgmt.persistence.keys import EVENTS_GROUP
from usermgmt.workers.runtime.clock import redis_time_ms
from usermgmt.workers.runtime.pending import (
    claim_idle,
    claim_own,
    keep_fresh,
    own_pending,
    pending_elsewhere,
)
from usermgmt.workers.runtime.streams import (
    Entry,
    ensure_group,
    entries_of,
    read_group,
    read_new,
    to_entries,
)


def test_new_entries_of_both_streams_come_back_in_stream_order(backend: Backend) -> None:
    redis, keys = backend.redis, backend.keys
    streams = [keys.update_stream, keys.terminate_stream]
    for stream in streams:
        ensure_group(redis, stream, EVENTS_GROUP)
    first = redis.xadd(keys.update_stream, {"payload": b'{"a": 1}'}).decode()
    other = redis.xadd(keys.update_stream, {"other": b"x", "payload": b'{"b": 2}'}).decode()
    bare = redis.xadd(keys.update_stream, {"data": b"{}"}).decode()
    ended = redis.xadd(keys.terminate_stream, {"payload": b"{}"}).decode()

    before_ms = redis_time_ms(redis)
    read = read_group(redis, EVENTS_GROUP, "c1", streams, 10, None)
    entries = read.entries

    got = [(e.stream, e.entry_id, e.payload, e.deliveries) for e in entries]
    assert got == [
        (keys.update_stream, first, b'{"a": 1}', 1),
        (keys.update_stream, other, b'{"b": 2}', 1),
        (keys.update_stream, bare, None, 1),
        (keys.terminate_stream, ended, b"{}", 1),
    ]
    # The server's clock before the read: every entry id is of that millisecond or earlier.
    assert before_ms <= read.clock_ms <= redis_time_ms(redis)
    assert all(int(e.entry_id.split("-")[0]) <= read.clock_ms for e in entries)
    assert read.others == {keys.update_stream: 0, keys.terminate_stream: 0}
    assert read_group(redis, EVENTS_GROUP, "c1", streams, 10, None).entries == []  # delivered
    pending = redis.xpending(keys.update_stream, EVENTS_GROUP)
    assert pending["pending"] == 3
    # Another consumer sees the entries pending on c1 (and not as its own).
    seen = read_group(redis, EVENTS_GROUP, "c2", streams, 10, None)
    assert seen.others == {keys.update_stream: 3, keys.terminate_stream: 1}
    elsewhere = list(pending_elsewhere(redis, keys.update_stream, EVENTS_GROUP, "c2"))
    assert elsewhere == [first, other, bare]
    assert list(pending_elsewhere(redis, keys.update_stream, EVENTS_GROUP, "c1")) == []
    # Entries up to a checkpoint are skipped (they are decided).
    after = list(pending_elsewhere(redis, keys.update_stream, EVENTS_GROUP, "c2", after=first))
    assert after == [other, bare]


def test_keep_fresh_counts_no_delivery_and_reports_entries_gone(backend: Backend) -> None:
    redis, keys = backend.redis, backend.keys
    ensure_group(redis, keys.update_stream, EVENTS_GROUP)
    kept = redis.xadd(keys.update_stream, {"payload": b"1"}).decode()
    acked = redis.xadd(keys.update_stream, {"payload": b"2"}).decode()
    read_group(redis, EVENTS_GROUP, "c1", [keys.update_stream], 10, None)
    redis.xack(keys.update_stream, EVENTS_GROUP, acked)  # decided by another worker
    gone = keep_fresh(redis, EVENTS_GROUP, "c1", {keys.update_stream: [kept, acked]})
    assert gone == {acked}
    (row,) = redis.xpending_range(keys.update_stream, EVENTS_GROUP, "-", "+", 10)
    assert row["times_delivered"] == 1 and row["time_since_delivered"] < 1_000
    assert own_pending(redis, keys.update_stream, EVENTS_GROUP, "c1") == [kept]
    # Read without a delivery: the payload, the count unchanged.
    (entry,) = entries_of(redis, keys.update_stream, [kept])
    assert entry.payload == b"1"
    (row,) = redis.xpending_range(keys.update_stream, EVENTS_GROUP, "-", "+", 10)
    assert row["times_delivered"] == 1


def test_keep_fresh_lets_go_of_an_entry_another_consumer_took_over(backend: Backend) -> None:
    """c1 stalled (or was stopping) and c2 claimed its idle entry: c1's next refresh must
    not take it back (XCLAIM with no idle time would), or both would decide it."""
    redis, keys = backend.redis, backend.keys
    ensure_group(redis, keys.update_stream, EVENTS_GROUP)
    taken = redis.xadd(keys.update_stream, {"payload": b"1"}).decode()
    kept = redis.xadd(keys.update_stream, {"payload": b"2"}).decode()
    read_group(redis, EVENTS_GROUP, "c1", [keys.update_stream], 10, None)
    redis.xclaim(keys.update_stream, EVENTS_GROUP, "c2", 0, [taken])
    gone = keep_fresh(redis, EVENTS_GROUP, "c1", {keys.update_stream: [taken, kept]})
    assert gone == {taken}
    assert own_pending(redis, keys.update_stream, EVENTS_GROUP, "c2") == [taken]
    assert own_pending(redis, keys.update_stream, EVENTS_GROUP, "c1") == [kept]


def test_count_is_per_stream_and_a_block_returns_empty(backend: Backend) -> None:
    redis, keys = backend.redis, backend.keys
    ensure_group(redis, keys.update_stream, EVENTS_GROUP)
    for n in range(5):
        redis.xadd(keys.update_stream, {"payload": b"%d" % n})
    entries = read_group(redis, EVENTS_GROUP, "c1", [keys.update_stream], 2, None).entries
    assert [e.payload for e in entries] == [b"0", b"1"]
    read_group(redis, EVENTS_GROUP, "c1", [keys.update_stream], 10, None)
    assert read_group(redis, EVENTS_GROUP, "c1", [keys.update_stream], 10, 10).entries == []
    # No stream to read: the clock and the pending view only.
    only = read_group(redis, EVENTS_GROUP, "c1", [], 10, None, [keys.update_stream])
    assert only.entries == [] and only.clock_ms > 0
    assert only.others == {keys.update_stream: 0}


def test_a_missing_group_is_redis_error(backend: Backend) -> None:
    redis, keys = backend.redis, backend.keys
    redis.xadd(keys.update_stream, {"payload": b"{}"})
    with pytest.raises(ResponseError, match="NOGROUP"):
        read_group(redis, EVENTS_GROUP, "c1", [keys.update_stream], 10, None)
    assert redis.ping()  # the connection went back to the pool in a usable state


def test_pending_lists_are_read_page_by_page(backend: Backend) -> None:
    """More pending entries than one XPENDING page: every id comes back once, in order."""
    redis, keys = backend.redis, backend.keys
    ensure_group(redis, keys.update_stream, EVENTS_GROUP)
    pipe = redis.pipeline(transaction=False)
    for number in range(1_234):
        pipe.xadd(keys.update_stream, {"payload": str(number).encode()})
    ids = [raw.decode() for raw in pipe.execute()]
    redis.xreadgroup(EVENTS_GROUP, "c1", {keys.update_stream: ">"}, count=2_000)
    assert own_pending(redis, keys.update_stream, EVENTS_GROUP, "c1") == ids
    assert list(pending_elsewhere(redis, keys.update_stream, EVENTS_GROUP, "c2")) == ids
    tail = pending_elsewhere(redis, keys.update_stream, EVENTS_GROUP, "c2", after=ids[99])
    assert list(tail) == ids[100:]


def test_every_reader_reads_the_same_entries(backend: Backend) -> None:
    """Raw replies (read off the socket) and redis-py's (fields as dicts) parse alike."""
    redis, keys = backend.redis, backend.keys
    stream = keys.update_stream
    ensure_group(redis, stream, EVENTS_GROUP)
    added = [
        redis.xadd(stream, {"payload": b'{"a": 1}'}).decode(),
        redis.xadd(stream, {"other": b"x", "payload": b'{"b": 2}'}).decode(),
        redis.xadd(stream, {"data": b"{}"}).decode(),  # no payload field
    ]
    expected = [(stream, added[0], b'{"a": 1}'), (stream, added[1], b'{"b": 2}')]
    expected.append((stream, added[2], None))

    def seen(entries: list[Entry]) -> list[tuple[str, str, bytes | None]]:
        return [(e.stream, e.entry_id, e.payload) for e in entries]

    assert seen(read_new(redis, EVENTS_GROUP, "raw", [stream], 10, None)) == expected
    assert seen(claim_own(redis, stream, EVENTS_GROUP, "raw", added)) == expected
    assert seen(entries_of(redis, stream, added)) == expected
    taken = claim_idle(redis, stream, EVENTS_GROUP, "idle", 0, 10)
    assert seen(taken) == expected
    assert [e.deliveries for e in taken] == [3, 3, 3]  # read, claimed, taken over
    more = redis.xadd(stream, {"payload": b"{}"}).decode()
    parsed = redis.xreadgroup(EVENTS_GROUP, "parsed", {stream: ">"}, count=10)
    assert seen(to_entries(parsed)) == [(stream, more, b"{}")]
    assert read_new(redis, EVENTS_GROUP, "raw", [stream], 10, 10) == []


def test_an_entry_deleted_while_pending_has_no_payload(backend: Backend) -> None:
    redis, keys = backend.redis, backend.keys
    stream = keys.update_stream
    ensure_group(redis, stream, EVENTS_GROUP)
    kept = redis.xadd(stream, {"payload": b"1"}).decode()
    deleted = redis.xadd(stream, {"payload": b"2"}).decode()
    read_new(redis, EVENTS_GROUP, "c1", [stream], 10, None)
    redis.xdel(stream, deleted)
    # Claimed again, a deleted entry is left out and acked: nothing is left to apply.
    claimed = claim_own(redis, stream, EVENTS_GROUP, "c1", [kept, deleted])
    assert [e.entry_id for e in claimed] == [kept]
    assert own_pending(redis, stream, EVENTS_GROUP, "c1") == [kept]
