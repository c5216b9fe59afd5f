"""Auth request parsing, reply shapes and redaction (docs/protocol.md, "Accounts"): pure, no I/O."""

from __future__ import annotations

import json
import uuid
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from usermgmt.domain.auth import (
    WITHHELD,
    GetUserRequest,
    InvalidRequest,
    LoginRequest,
    RegisterRequest,
    UserView,
    VerifyTokenRequest,
    error_reply,
    ok_reply,
    parse_request,
    redact,
)
from usermgmt.domain.errors import DeadLetterReason, ErrorCode, InvalidPayload
from usermgmt.persistence.auth_store import Attempts
from usermgmt.persistence.keys import Keys
from usermgmt.workers.auth.replies import redacted_text

RID = "6f1c2a4e-8b1d-4c3e-9a7f-0d2b5e6c7a81"
SECRET = "Sup3r-S3cret-Passw0rd"  # distinctive, so finding it in a message means a leak


def payload(**fields: Any) -> bytes:
    return orjson.dumps({"request_id": RID, **fields})


# -- every op -----------------------------------------------------------------------------


def test_register_parses() -> None:
    request = parse_request(payload(op="register", username="Alice", password=SECRET))
    assert isinstance(request, RegisterRequest)
    assert request.request_id == uuid.UUID(RID)
    assert (request.op, request.username, request.password) == ("register", "Alice", SECRET)


def test_login_parses() -> None:
    request = parse_request(payload(op="login", username="alice", password=SECRET))
    assert isinstance(request, LoginRequest)
    assert (request.username, request.password) == ("alice", SECRET)


def test_get_user_parses_without_a_password() -> None:
    request = parse_request(payload(op="get_user", username="bob.smith"))
    assert isinstance(request, GetUserRequest)
    assert request.username == "bob.smith"


def test_verify_token_parses() -> None:
    request = parse_request(payload(op="verify_token", token="abc_DEF-123"))
    assert isinstance(request, VerifyTokenRequest)
    assert request.token == "abc_DEF-123"


def test_str_and_bytes_payloads_parse_alike() -> None:
    raw = payload(op="get_user", username="alice")
    assert parse_request(raw) == parse_request(raw.decode())


def test_unknown_fields_are_ignored() -> None:
    request = parse_request(payload(op="get_user", username="alice", extra={"x": 1}))
    assert isinstance(request, GetUserRequest)


def test_secrets_do_not_show_in_repr() -> None:
    login = parse_request(payload(op="login", username="alice", password=SECRET))
    token = parse_request(payload(op="verify_token", token=SECRET))
    assert SECRET not in repr(login)
    assert SECRET not in str(login)
    assert SECRET not in repr(token)


# -- junk that cannot be answered: InvalidPayload (dead letter) ------------------------------


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (None, DeadLetterReason.INVALID_REQUEST),  # no payload field
        (b"", DeadLetterReason.INVALID_JSON),
        (b"not json", DeadLetterReason.INVALID_JSON),
        (b"{'single': 'quotes'}", DeadLetterReason.INVALID_JSON),
        (b'{"request_id": "' + RID.encode() + b'"', DeadLetterReason.INVALID_JSON),  # truncated
        (b"\xff\xfe\x00", DeadLetterReason.INVALID_JSON),  # not UTF-8
        (b"[]", DeadLetterReason.INVALID_REQUEST),
        (orjson.dumps([{"request_id": RID, "op": "get_user"}]), DeadLetterReason.INVALID_REQUEST),
        (b'"a string"', DeadLetterReason.INVALID_REQUEST),
        (b"42", DeadLetterReason.INVALID_REQUEST),
        (b"null", DeadLetterReason.INVALID_REQUEST),
        (b"true", DeadLetterReason.INVALID_REQUEST),
        (b"{}", DeadLetterReason.INVALID_REQUEST),
        (orjson.dumps({"op": "get_user", "username": "alice"}), DeadLetterReason.INVALID_REQUEST),
    ],
    ids=lambda value: repr(value)[:40],
)
def test_junk_without_an_answerable_request_id_is_invalid_payload(
    raw: bytes | None, reason: DeadLetterReason
) -> None:
    with pytest.raises(InvalidPayload) as caught:
        parse_request(raw)
    assert caught.value.reason == reason
    assert caught.value.message
    assert "\n" not in caught.value.message


@pytest.mark.parametrize(
    "request_id",
    [
        None,
        "",
        "not-a-uuid",
        "6f1c2a4e-8b1d-4c3e-9a7f",  # truncated
        RID + "0",
        "../../um:leaderboard",  # must never choose a key
        "*",
        12345,
        1.5,
        True,
        [RID],
        {"id": RID},
    ],
    ids=repr,
)
def test_a_request_id_that_is_not_a_uuid_string_is_invalid_payload(request_id: object) -> None:
    raw = orjson.dumps({"request_id": request_id, "op": "login", "username": "alice"})
    with pytest.raises(InvalidPayload) as caught:
        parse_request(raw)
    assert caught.value.reason == DeadLetterReason.INVALID_REQUEST
    assert "request_id" in caught.value.message


@pytest.mark.parametrize(
    "request_id",
    [
        uuid.UUID(RID).hex,  # no hyphens
        "{" + RID + "}",
        "urn:uuid:" + RID,
        " " + RID,
        RID + "\n",
    ],
    ids=repr,
)
def test_only_the_hyphenated_uuid_form_names_a_reply_key(request_id: str) -> None:
    """The reply key is the text the client sent: other spellings of a UUID are refused."""
    raw = orjson.dumps({"request_id": request_id, "op": "get_user", "username": "alice"})
    with pytest.raises(InvalidPayload) as caught:
        parse_request(raw)
    assert "hyphenated form" in caught.value.message


@given(st.uuids())
def test_an_upper_case_uuid_is_taken_and_its_reply_key_is_that_text(value: uuid.UUID) -> None:
    """Some stacks write UUIDs in upper case (Swift's `uuidString`): the client waits on
    the key made of the text it sent, and the reply echoes that text."""
    text = str(value).upper()
    request = parse_request(orjson.dumps({"request_id": text, "op": "get_user", "username": "a1b"}))
    assert request.request_id == value
    assert str(request.request_id) == text
    assert Keys("um").reply(request.request_id) == f"um:auth:reply:{text}"
    assert ok_reply(request.request_id, USER)["request_id"] == text


@given(st.uuids())
def test_any_canonical_uuid_is_echoed_exactly(value: uuid.UUID) -> None:
    request = parse_request(
        orjson.dumps({"request_id": str(value), "op": "get_user", "username": "alice"})
    )
    assert str(request.request_id) == str(value)
    assert ok_reply(request.request_id, USER)["request_id"] == str(value)


def test_a_bad_request_id_wins_over_a_bad_body() -> None:
    """No UUID means no reply key, so even a broken body cannot be answered."""
    with pytest.raises(InvalidPayload):
        parse_request(orjson.dumps({"request_id": "nope", "op": "fly"}))


# -- bad bodies with a good request_id: InvalidRequest (answered) -------------------------------


@pytest.mark.parametrize("escape", [rb"\ud800", rb"\udc00", rb"\ud800\ud800", rb"\ud800\u0041"])
def test_a_lone_surrogate_escape_is_answered_as_invalid_request(escape: bytes) -> None:
    """JSON's grammar allows it (a JavaScript client's `JSON.stringify` writes one for a
    broken string); orjson refuses it, but the client still gets its one reply."""
    raw = b'{"request_id": "%s", "op": "login", "username": "alice", "password": "%s%s"}'
    with pytest.raises(InvalidRequest) as caught:
        parse_request(raw % (RID.encode(), SECRET.encode(), escape))
    assert caught.value.request_id == uuid.UUID(RID)
    assert "surrogate" in caught.value.message
    assert SECRET not in caught.value.message


@pytest.mark.parametrize(
    "raw",
    [
        rb'{"request_id": "\ud800", "op": "get_user", "username": "alice"}',  # no reply key
        rb'{"request_id": "%s", "op": "get_user", "username": "\ud800", "n": NaN}',  # not JSON
        rb'["\ud800"]',
    ],
)
def test_a_lone_surrogate_without_an_answerable_object_is_invalid_payload(raw: bytes) -> None:
    with pytest.raises(InvalidPayload):
        parse_request(raw.replace(b"%s", RID.encode()))


@pytest.mark.parametrize(
    "fields",
    [
        {},  # no op
        {"op": None},
        {"op": "delete_user", "username": "alice"},
        {"op": "LOGIN", "username": "alice", "password": SECRET},  # ops are exact
        {"op": 7},
        {"op": "register", "username": "alice"},  # no password
        {"op": "register", "password": SECRET},  # no username
        {"op": "register", "username": "al", "password": SECRET},
        {"op": "register", "username": "a" * 33, "password": SECRET},
        {"op": "register", "username": "bad name", "password": SECRET},
        {"op": "register", "username": "alice", "password": "short"},
        {"op": "register", "username": "alice", "password": "x" * 73},
        {"op": "register", "username": ["alice"], "password": SECRET},
        {"op": "login", "username": "alice"},
        {"op": "login", "username": "alice", "password": 12345678},
        {"op": "login", "username": None, "password": SECRET},
        {"op": "get_user"},
        {"op": "get_user", "username": "x"},
        {"op": "get_user", "username": 42},
        {"op": "verify_token"},
        {"op": "verify_token", "token": ""},
        {"op": "verify_token", "token": "t" * 513},
        {"op": "verify_token", "token": 42},
    ],
    ids=lambda fields: orjson.dumps(fields).decode()[:60],
)
def test_a_bad_body_with_a_good_request_id_is_invalid_request(fields: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_request(payload(**fields))
    assert caught.value.request_id == uuid.UUID(RID)
    assert caught.value.message
    assert "\n" not in caught.value.message


@pytest.mark.parametrize(
    "fields",
    [
        {"op": "register", "username": "bad name", "password": SECRET},
        {"op": "register", "username": "alice", "password": SECRET * 4},  # too long
        {"op": "login", "username": "!", "password": SECRET},
        {"op": "login", "username": "alice", "password": SECRET[:7]},  # too short
        {"op": "register", "username": "alice", "password": [SECRET]},
        {"op": "login", "username": "alice", "password": {"value": SECRET}},
        {"op": "verify_token", "token": SECRET * 30},
        {"op": "verify_token", "token": [SECRET]},
        {"op": "nope", "password": SECRET, "token": SECRET},
    ],
    ids=lambda fields: str(fields["op"]),
)
def test_validation_messages_never_contain_the_secret(fields: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_request(payload(**fields))
    for text in (caught.value.message, str(caught.value), repr(caught.value)):
        assert SECRET not in text
        assert SECRET[:7] not in text


@given(
    st.dictionaries(
        st.sampled_from(["op", "username", "password", "token", "other"]),
        st.one_of(
            st.text(max_size=80),
            st.integers(),
            st.none(),
            st.lists(st.text(max_size=5), max_size=3),
        ),
    )
)
def test_any_object_with_a_good_request_id_parses_or_is_answerable(fields: dict[str, Any]) -> None:
    """Nothing with a UUID request_id escapes as another exception or loses its id."""
    raw = json.dumps({"request_id": RID, **fields})  # any size of integer, as other languages send
    try:
        request = parse_request(raw)
    except InvalidRequest as exc:
        assert exc.request_id == uuid.UUID(RID)
        for secret in (fields.get("password"), fields.get("token")):
            if isinstance(secret, str) and len(secret) >= 12:
                assert secret not in exc.message
    else:
        assert request.request_id == uuid.UUID(RID)


# -- redaction ------------------------------------------------------------------------------


def test_redact_removes_password_and_token_everywhere() -> None:
    data = {
        "request_id": RID,
        "op": "login",
        "username": "alice",
        "password": SECRET,
        "token": SECRET,
        "nested": {"password": SECRET, "keep": 1},
        "items": [{"token": SECRET, "keep": 2}, "plain"],
    }
    cleaned = redact(data)
    assert cleaned == {
        "request_id": RID,
        "op": "login",
        "username": "alice",
        "nested": {"keep": 1},
        "items": [{"keep": 2}, WITHHELD],
    }
    assert SECRET not in orjson.dumps(cleaned).decode()
    assert data["password"] == SECRET  # a copy: the input is left alone


def test_redact_handles_lists_and_scalars() -> None:
    assert redact([{"password": SECRET}, {"token": SECRET, "a": 1}]) == [{}, {"a": 1}]
    assert redact(None) is None and redact(7) == 7 and redact(True) is True


@pytest.mark.parametrize(
    "payload",
    [
        ["login", "bob", SECRET],  # a request sent as a list
        SECRET,  # as a bare string
        {"op": "login", "username": "bob", "pass": SECRET},  # under another name
        {"op": "login", "username": "bob", "credentials": {"secret": SECRET}},
        {"op": "login", "username": "bob", "password": [SECRET]},
    ],
)
def test_a_dead_letter_keeps_no_text_that_may_be_a_password(payload: Any) -> None:
    text = redacted_text(orjson.dumps(payload))
    assert SECRET not in text
    kept = orjson.loads(text)
    if isinstance(payload, dict):
        assert (kept["op"], kept["username"]) == ("login", "bob")


@pytest.mark.parametrize("payload", [b"op=login&pw=" + SECRET.encode(), b"\xff" + SECRET.encode()])
def test_a_dead_letter_of_text_that_is_not_json_withholds_it(payload: bytes) -> None:
    text = redacted_text(payload)
    assert SECRET not in text
    assert text == f"[not JSON, {len(payload)} bytes; withheld because it may contain a secret]"


# -- replies --------------------------------------------------------------------------------

USER = UserView(id=7, username="Alice", wallet=10, win_count=1, loss_count=2, earnings=150, rank=3)


def test_ok_reply_has_exactly_the_spec_shape() -> None:
    reply = ok_reply(uuid.UUID(RID), USER.model_copy(update={"session": "eu-1"}))
    assert reply == {
        "request_id": RID,
        "ok": True,
        "user": {
            "id": 7,
            "username": "Alice",
            "wallet": 10,
            "win_count": 1,
            "loss_count": 2,
            "earnings": 150,
            "rank": 3,
        },
    }
    assert "token" not in reply


def test_ok_reply_carries_the_token_only_when_given() -> None:
    reply = ok_reply(uuid.UUID(RID), USER, token="tok")
    assert reply["token"] == "tok"
    assert set(reply) == {"request_id", "ok", "user", "token"}


def test_error_reply_has_exactly_the_spec_shape() -> None:
    reply = error_reply(uuid.UUID(RID), ErrorCode.USERNAME_TAKEN, "taken")
    assert reply == {
        "request_id": RID,
        "ok": False,
        "error": {"code": "username_taken", "message": "taken"},
    }
    assert orjson.loads(orjson.dumps(reply)) == reply


def test_error_codes_are_the_spec_list() -> None:
    assert {str(code) for code in ErrorCode} == {
        "invalid_request",
        "username_taken",
        "invalid_credentials",
        "locked",
        "not_found",
        "invalid_token",
        "internal",
    }


def test_the_lockout_counts_each_request_once_whatever_its_state() -> None:
    """A request served again after a reclaim adds its check a second time (or after
    its failure): it is still one guess."""
    members = [b"c:r1", b"f:r1", b"c:r2", b"c:r2", b"f:r3", b"f:r4"]
    attempts = Attempts.of(members)
    assert (attempts.checking, attempts.failed) == (1, 3)
    assert not attempts.locks and not attempts.too_many_at_once
    five = Attempts.of([f"f:r{n}".encode() for n in range(5)])
    assert five.locks and not five.too_many_at_once
    crowded = Attempts.of([*(f"f:r{n}" for n in range(3)), *(f"c:s{n}" for n in range(3))])
    assert crowded.too_many_at_once and not crowded.locks
