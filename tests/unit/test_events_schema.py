"""Game event schemas: every limit accepts its edge and rejects one past it.

See docs/protocol.md, "Game events".
"""

from __future__ import annotations

import string
import uuid
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from usermgmt.domain.errors import DeadLetterReason, InvalidPayload
from usermgmt.domain.events import (
    EventKind,
    TerminateEvent,
    UpdateEvent,
    entry_id_key,
    entry_order,
    parse_event,
)

SESSION_CHARS = string.ascii_letters + string.digits + "_.:-"


def update(**fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "event_id": str(uuid.uuid4()),
        "session_id": "eu-1-000042",
        "players": ["alice", "bob"],
    }
    body.update(fields)
    return body


def terminate(**fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "event_id": str(uuid.uuid4()),
        "session_id": "eu-1-000042",
        "results": [
            {"username": "alice", "outcome": "win", "earnings": 150},
            {"username": "bob", "outcome": "loss", "earnings": 0},
        ],
    }
    body.update(fields)
    return body


def parse(kind: EventKind, body: Any) -> UpdateEvent | TerminateEvent:
    return parse_event(kind, orjson.dumps(body))


def rejected(kind: EventKind, body: Any) -> InvalidPayload:
    with pytest.raises(InvalidPayload) as caught:
        parse(kind, body)
    return caught.value


# -- payload shape -----------------------------------------------------------------


def test_text_that_is_not_json_is_invalid_json() -> None:
    with pytest.raises(InvalidPayload) as caught:
        parse_event(EventKind.UPDATE, b"{not json")
    assert caught.value.reason is DeadLetterReason.INVALID_JSON
    assert caught.value.message


@pytest.mark.parametrize("number", [b"1e400", b"-1e400"])
def test_a_number_beyond_any_double_is_invalid_event_not_invalid_json(number: bytes) -> None:
    payload = b'{"event_id": "%s", "session_id": "s1", "players": ["alice"], "meta": {"x": %s}}'
    with pytest.raises(InvalidPayload) as caught:
        parse_event(EventKind.UPDATE, payload % (str(uuid.uuid4()).encode(), number))
    assert caught.value.reason is DeadLetterReason.INVALID_EVENT
    assert "out of range" in caught.value.message


def test_a_lone_surrogate_escape_is_invalid_event_and_raw_surrogate_bytes_invalid_json() -> None:
    """An escaped half of a UTF-16 pair is JSON's grammar, but no Unicode text; bytes
    that are not UTF-8 are not JSON text at all."""
    payload = b'{"event_id": "%s", "session_id": "s1", "players": ["al%sice"]}'
    event_id = str(uuid.uuid4()).encode()
    with pytest.raises(InvalidPayload) as caught:
        parse_event(EventKind.UPDATE, payload % (event_id, rb"\ud800"))
    assert caught.value.reason is DeadLetterReason.INVALID_EVENT
    assert "surrogate" in caught.value.message
    with pytest.raises(InvalidPayload) as caught:
        parse_event(EventKind.UPDATE, payload % (event_id, b"\xed\xa0\x80"))
    assert caught.value.reason is DeadLetterReason.INVALID_JSON


def test_a_lone_surrogate_in_json_nested_too_deep_to_read_is_invalid_json() -> None:
    """Python's parser, asked after orjson refused the surrogate, gives up on the depth:
    the payload cannot be read, and is dead-lettered like text that is not JSON."""
    deep = b"[" * 5_000 + b"]" * 5_000
    payload = b'{"event_id": "%s", "session_id": "s1", "players": ["\\ud800"], "x": %s}'
    with pytest.raises(InvalidPayload) as caught:
        parse_event(EventKind.UPDATE, payload % (str(uuid.uuid4()).encode(), deep))
    assert caught.value.reason is DeadLetterReason.INVALID_JSON


@pytest.mark.parametrize("body", [[], "text", 42, None])
def test_json_that_is_not_an_object_is_invalid_event(body: Any) -> None:
    assert rejected(EventKind.TERMINATE, body).reason is DeadLetterReason.INVALID_EVENT


def test_an_entry_without_payload_is_invalid_event() -> None:
    with pytest.raises(InvalidPayload) as caught:
        parse_event(EventKind.UPDATE, None)
    assert caught.value.reason is DeadLetterReason.INVALID_EVENT


@pytest.mark.parametrize("event_id", [None, "", "not-a-uuid", 12345, "8b6f-1"])
def test_event_id_must_be_a_uuid(event_id: Any) -> None:
    error = rejected(EventKind.UPDATE, update(event_id=event_id))
    assert error.reason is DeadLetterReason.INVALID_EVENT
    assert "event_id" in error.message


@given(st.uuids(), st.sampled_from(["canonical", "upper", "hex", "braces", "urn"]))
def test_every_spelling_of_a_uuid_is_the_same_event_id(value: uuid.UUID, spelling: str) -> None:
    """The idempotency key is the canonical text whatever the spelling (the canonical
    form stays text; the others are read as a UUID)."""
    text = {
        "canonical": str(value),
        "upper": str(value).upper(),
        "hex": value.hex,
        "braces": "{" + str(value) + "}",
        "urn": value.urn,
    }[spelling]
    bodies = {
        EventKind.UPDATE: update(event_id=text),
        EventKind.TERMINATE: terminate(event_id=text),
    }
    for kind, body in bodies.items():
        assert str(parse_event(kind, orjson.dumps(body)).event_id) == str(value)


def test_a_bad_event_id_is_one_plain_error() -> None:
    error = rejected(EventKind.UPDATE, update(event_id="8b6f0000-0000-4000-8000-00000000000g"))
    assert error.message == "update event: event_id: Input should be a valid UUID"


def test_event_id_is_required() -> None:
    body = update()
    del body["event_id"]
    assert "event_id" in rejected(EventKind.UPDATE, body).message


# -- update ------------------------------------------------------------------------


def test_minimal_update_gets_the_defaults() -> None:
    event = parse(EventKind.UPDATE, update())
    assert isinstance(event, UpdateEvent)
    assert event.status == "in_progress"
    assert event.meta == {}
    assert event.players == ["alice", "bob"]


@pytest.mark.parametrize(
    "session_id", ["a", "x" * 64, SESSION_CHARS[:64], "eu-1:match.42_b", "0", "A:B"]
)
def test_session_ids_within_the_rules(session_id: str) -> None:
    assert parse(EventKind.UPDATE, update(session_id=session_id)).session_id == session_id


@pytest.mark.parametrize(
    "session_id",
    ["", "x" * 65, "eu 1", "eu/1", "eu{1}", "sessión", "eu-1\n", "\neu-1", "a*", 7, None],
)
def test_session_ids_outside_the_rules(session_id: Any) -> None:
    error = rejected(EventKind.UPDATE, update(session_id=session_id))
    assert error.reason is DeadLetterReason.INVALID_EVENT
    assert "session_id" in error.message
    error = rejected(EventKind.TERMINATE, terminate(session_id=session_id))
    assert error.reason is DeadLetterReason.INVALID_EVENT


@given(st.text(max_size=80))
def test_session_id_accepted_exactly_when_charset_and_length_fit(session_id: str) -> None:
    valid = 1 <= len(session_id) <= 64 and all(c in SESSION_CHARS for c in session_id)
    try:
        event = parse(EventKind.UPDATE, update(session_id=session_id))
    except InvalidPayload as exc:
        assert not valid, exc.message
        assert exc.reason is DeadLetterReason.INVALID_EVENT
    else:
        assert valid
        assert event.session_id == session_id


def test_one_hundred_players_is_the_limit() -> None:
    names = [f"player{i:03d}" for i in range(101)]
    assert len(parse(EventKind.UPDATE, update(players=names[:100])).players) == 100  # type: ignore[union-attr]
    assert "players" in rejected(EventKind.UPDATE, update(players=names)).message


def test_one_player_is_enough_and_none_is_not() -> None:
    assert parse(EventKind.UPDATE, update(players=["solo"])).players == ["solo"]  # type: ignore[union-attr]
    assert "players" in rejected(EventKind.UPDATE, update(players=[])).message


def test_players_is_required() -> None:
    body = update()
    del body["players"]
    assert rejected(EventKind.UPDATE, body).reason is DeadLetterReason.INVALID_EVENT


@pytest.mark.parametrize(
    "players", [["alice", "alice"], ["alice", "Alice"], ["bob", "x_1", "BOB"], ["A.b", "a.B"]]
)
def test_players_must_be_distinct_case_insensitively(players: list[str]) -> None:
    error = rejected(EventKind.UPDATE, update(players=players))
    assert error.reason is DeadLetterReason.INVALID_EVENT
    assert "distinct" in error.message


@pytest.mark.parametrize("name", ["ab", "x" * 33, "with space", "émile", "", 5, None])
def test_players_must_be_valid_usernames(name: Any) -> None:
    assert rejected(EventKind.UPDATE, update(players=["alice", name])).reason == "invalid_event"


def test_players_keep_their_spelling() -> None:
    event = parse(EventKind.UPDATE, update(players=["Alice", "BOB.x"]))
    assert event.players == ["Alice", "BOB.x"]  # type: ignore[union-attr]


@pytest.mark.parametrize("status", ["waiting", "in_progress"])
def test_status_values(status: str) -> None:
    assert parse(EventKind.UPDATE, update(status=status)).status == status  # type: ignore[union-attr]


@pytest.mark.parametrize("status", ["ended", "", "WAITING", "in progress", None, 1])
def test_other_statuses_are_rejected(status: Any) -> None:
    assert "status" in rejected(EventKind.UPDATE, update(status=status)).message


def test_meta_keeps_strings_numbers_and_bools_with_their_types() -> None:
    meta = {"map": "dust", "round": 3, "ratio": 0.5, "ranked": True, "hardcore": False}
    event = parse(EventKind.UPDATE, update(meta=meta))
    assert event.meta == meta  # type: ignore[union-attr]
    assert [type(v) for v in event.meta.values()] == [str, int, float, bool, bool]  # type: ignore[union-attr]


def test_meta_holds_at_most_sixteen_values() -> None:
    sixteen = {f"k{i}": i for i in range(16)}
    assert len(parse(EventKind.UPDATE, update(meta=sixteen)).meta) == 16  # type: ignore[union-attr]
    seventeen = {**sixteen, "k16": 16}
    assert "meta" in rejected(EventKind.UPDATE, update(meta=seventeen)).message


@pytest.mark.parametrize(
    "meta",
    [
        {"nested": {"a": 1}},
        {"list": [1, 2]},
        {"nothing": None},
        ["map", "dust"],
        "map=dust",
        {"long": "x" * 257},
    ],
)
def test_meta_must_be_flat_scalars(meta: Any) -> None:
    error = rejected(EventKind.UPDATE, update(meta=meta))
    assert error.reason is DeadLetterReason.INVALID_EVENT
    assert "meta" in error.message


@given(
    st.dictionaries(
        st.text(min_size=1, max_size=8),
        st.one_of(st.booleans(), st.integers(-(2**53), 2**53), st.text(max_size=20)),
        max_size=24,
    )
)
def test_meta_accepted_exactly_up_to_sixteen_flat_values(meta: dict[str, Any]) -> None:
    try:
        event = parse(EventKind.UPDATE, update(meta=meta))
    except InvalidPayload:
        assert len(meta) > 16
    else:
        assert len(meta) <= 16
        assert event.meta == meta  # type: ignore[union-attr]


# -- terminate ---------------------------------------------------------------------


def test_terminate_defaults_to_completed() -> None:
    event = parse(EventKind.TERMINATE, terminate())
    assert isinstance(event, TerminateEvent)
    assert event.reason == "completed"
    assert [(r.username, r.outcome, r.earnings) for r in event.results] == [
        ("alice", "win", 150),
        ("bob", "loss", 0),
    ]


def test_an_aborted_game_may_have_no_results() -> None:
    event = parse(EventKind.TERMINATE, terminate(results=[], reason="aborted"))
    assert event.results == []  # type: ignore[union-attr]
    body = terminate(reason="aborted")
    del body["results"]
    assert parse(EventKind.TERMINATE, body).reason == "aborted"  # type: ignore[union-attr]


def test_an_aborted_game_may_have_results_too() -> None:
    event = parse(EventKind.TERMINATE, terminate(reason="aborted"))
    assert len(event.results) == 2  # type: ignore[union-attr]


def test_a_completed_game_needs_results() -> None:
    assert rejected(EventKind.TERMINATE, terminate(results=[])).reason == "invalid_event"
    body = terminate()
    del body["results"]
    assert rejected(EventKind.TERMINATE, body).reason == "invalid_event"


@pytest.mark.parametrize("reason", ["cancelled", "", "COMPLETED", None])
def test_other_reasons_are_rejected(reason: Any) -> None:
    assert "reason" in rejected(EventKind.TERMINATE, terminate(reason=reason)).message


@pytest.mark.parametrize("outcome", ["draw", "", "WIN", None, 1])
def test_outcome_is_win_or_loss(outcome: Any) -> None:
    results = [{"username": "alice", "outcome": outcome, "earnings": 1}]
    assert "outcome" in rejected(EventKind.TERMINATE, terminate(results=results)).message


@pytest.mark.parametrize("earnings", [0, 1, 999_999_999, 1_000_000_000])
def test_earnings_within_range(earnings: int) -> None:
    results = [{"username": "alice", "outcome": "win", "earnings": earnings}]
    event = parse(EventKind.TERMINATE, terminate(results=results))
    assert event.results[0].earnings == earnings  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "earnings", [-1, 1_000_000_001, 10**12, 1.5, 150.0, "150", True, None, [1]]
)
def test_earnings_outside_range_or_not_integers(earnings: Any) -> None:
    results = [{"username": "alice", "outcome": "win", "earnings": earnings}]
    error = rejected(EventKind.TERMINATE, terminate(results=results))
    assert error.reason is DeadLetterReason.INVALID_EVENT
    assert "earnings" in error.message


@given(st.integers(min_value=-(2**40), max_value=2**40))
def test_earnings_accepted_exactly_from_zero_to_a_billion(earnings: int) -> None:
    results = [{"username": "alice", "outcome": "loss", "earnings": earnings}]
    try:
        parse(EventKind.TERMINATE, terminate(results=results))
    except InvalidPayload:
        assert not 0 <= earnings <= 1_000_000_000
    else:
        assert 0 <= earnings <= 1_000_000_000


@pytest.mark.parametrize("second", ["alice", "ALICE", "Alice"])
def test_a_player_has_at_most_one_result(second: str) -> None:
    results = [
        {"username": "alice", "outcome": "win", "earnings": 1},
        {"username": second, "outcome": "loss", "earnings": 0},
    ]
    error = rejected(EventKind.TERMINATE, terminate(results=results))
    assert error.reason is DeadLetterReason.INVALID_EVENT
    assert "once" in error.message


def test_result_needs_a_valid_username() -> None:
    results = [{"username": "a b", "outcome": "win", "earnings": 1}]
    assert rejected(EventKind.TERMINATE, terminate(results=results)).reason == "invalid_event"


def test_more_than_a_hundred_results_are_rejected() -> None:
    results = [{"username": f"p{i:03d}", "outcome": "loss", "earnings": 0} for i in range(101)]
    assert len(parse(EventKind.TERMINATE, terminate(results=results[:100])).results) == 100  # type: ignore[union-attr]
    assert "results" in rejected(EventKind.TERMINATE, terminate(results=results)).message


def test_events_are_frozen() -> None:
    event = parse(EventKind.UPDATE, update())
    with pytest.raises(ValueError, match="frozen"):
        event.session_id = "other"  # type: ignore[misc]


def test_error_messages_name_the_kind_of_event() -> None:
    assert rejected(EventKind.UPDATE, update(status="x")).message.startswith("update event")
    assert rejected(EventKind.TERMINATE, terminate(reason="x")).message.startswith(
        "terminate event"
    )


# -- entry ids -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("older", "newer"),
    [("1-9", "1-10"), ("9-99", "10-0"), ("1700000000000-0", "1700000000000-1"), ("5", "5-1")],
)
def test_entry_ids_order_numerically(older: str, newer: str) -> None:
    assert entry_id_key(older) < entry_id_key(newer)


@given(
    st.tuples(st.integers(0, 2**48), st.integers(0, 2**20)),
    st.tuples(st.integers(0, 2**48), st.integers(0, 2**20)),
)
def test_entry_id_key_orders_like_redis(a: tuple[int, int], b: tuple[int, int]) -> None:
    key_a, key_b = entry_id_key(f"{a[0]}-{a[1]}"), entry_id_key(f"{b[0]}-{b[1]}")
    assert (key_a < key_b) == (a < b)


def test_merged_order_puts_updates_before_terminates_within_a_millisecond() -> None:
    # Sequence numbers count per stream: within one millisecond they say nothing
    # about which stream's entry came first.
    assert entry_order("update", "1000-7") < entry_order("terminate", "1000-0")
    assert entry_order("accounts", "1000-9") < entry_order("update", "1000-0")
    assert entry_order("terminate", "999-99") < entry_order("update", "1000-0")
    assert entry_order("update", "1000-1") < entry_order("update", "1000-2")


@given(
    st.lists(
        st.tuples(st.sampled_from(["update", "terminate"]), st.integers(0, 3), st.integers(0, 3)),
        max_size=30,
    )
)
def test_merged_order_keeps_each_streams_own_order(
    entries: list[tuple[str, int, int]],
) -> None:
    merged = sorted(entries, key=lambda e: entry_order(e[0], f"{e[1]}-{e[2]}"))
    for kind in ("update", "terminate"):
        mine = [(ms, seq) for k, ms, seq in merged if k == kind]
        assert mine == sorted(mine)
