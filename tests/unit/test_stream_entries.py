"""One parser for every stream reply: raw (RESP2 lists, RESP3 maps) and redis-py's."""

from __future__ import annotations

from usermgmt.domain.payloads import text_of
from usermgmt.workers.runtime.entries import Entry, stream_entries, to_entries

RAW_MESSAGES = [
    [b"1-0", [b"payload", b"{}"]],
    [b"1-1", [b"other", b"x", b"payload", b"[1]"]],
    [b"2-0", [b"data", b"{}"]],  # no payload field
    [b"3-0", None],  # deleted while pending
    [b"3-1", []],
]
EXPECTED = [
    Entry("s", "1-0", b"{}", 2),
    Entry("s", "1-1", b"[1]", 2),
    Entry("s", "2-0", None, 2),
    Entry("s", "3-0", None, 2),
    Entry("s", "3-1", None, 2),
]


def test_raw_replies_of_both_protocols_and_redis_pys_read_alike() -> None:
    resp2 = [[b"s", RAW_MESSAGES]]
    resp3 = {b"s": RAW_MESSAGES}
    as_dicts = [(i, dict(zip(f[::2], f[1::2], strict=True)) if f else f) for i, f in RAW_MESSAGES]
    redis_py = [[b"s", as_dicts]]  # reply callbacks turn fields into a dict
    decoded = [["s", [("1-0", {b"payload": b"{}"})]]]  # a decoding client's names
    for reply in (resp2, resp3, redis_py):
        assert to_entries(reply, deliveries=2) == EXPECTED
    assert to_entries(decoded) == [Entry("s", "1-0", b"{}")]
    assert to_entries(None) == to_entries([]) == to_entries({}) == []


def test_claimed_messages_skip_the_missing_ones() -> None:
    """XCLAIM on some servers answers None for an entry deleted meanwhile."""
    assert stream_entries("s", [None, [b"1-0", [b"payload", b"x"]]]) == [Entry("s", "1-0", b"x")]


def test_text_of_reads_reply_values() -> None:
    assert text_of(b"1-0") == "1-0"
    assert text_of("name") == "name"
    assert text_of(None) == ""
    assert text_of(12) == "12"
    assert text_of(b"\xff") == "\ufffd"  # shown, not raised
