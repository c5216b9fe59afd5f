"""Username and password policy (docs/protocol.md, "Accounts"): pure rules, no I/O."""

from __future__ import annotations

import string
import uuid

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

from usermgmt.domain.accounts import (
    LOCKOUT_DURATION_S,
    LOCKOUT_MAX_FAILURES,
    LOCKOUT_WINDOW_S,
    PASSWORD_MAX_BYTES,
    PASSWORD_MIN_BYTES,
    TOKEN_BYTES,
    TOKEN_TTL_S,
    Password,
    Username,
    is_valid_username,
    username_key,
)
from usermgmt.domain.auth import InvalidRequest, RegisterRequest, parse_request

USERNAME_ALPHABET = string.ascii_letters + string.digits + "_.-"
usernames = st.text(alphabet=USERNAME_ALPHABET, min_size=3, max_size=32)

_username = TypeAdapter(Username)
_password = TypeAdapter(Password)


def _register(username: object, password: object) -> bytes:
    return orjson.dumps(
        {
            "request_id": str(uuid.uuid4()),
            "op": "register",
            "username": username,
            "password": password,
        }
    )


# -- usernames -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["abc", "a" * 32, "Alice", "bob_42", "x.y-z", "___", "...", "---", "A1.b2-C3_d4"],
)
def test_valid_usernames_are_accepted(name: str) -> None:
    assert is_valid_username(name)
    assert _username.validate_python(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "ab",  # too short
        "a" * 33,  # too long
        "al ice",  # space
        "alice!",
        "al/ice",
        "al:ice",  # would break key structure
        "al*ice",  # a SCAN pattern character
        "alice\n",  # trailing newline must not slip past `$`
        "\nalice",
        "ali\tce",
        "al\u00efce",  # non-ASCII letter
        "\uff41\uff4c\uff49\uff43\uff45",  # full-width letters
        "ali\u0000ce",
        "\u0661\u0662\u0663",  # Arabic-Indic digits: \d would take these, the policy must not
    ],
)
def test_invalid_usernames_are_rejected(name: str) -> None:
    assert not is_valid_username(name)
    with pytest.raises(ValidationError):
        _username.validate_python(name)
    with pytest.raises(InvalidRequest):
        parse_request(_register(name, "long-enough-password"))


@given(usernames)
def test_any_policy_username_round_trips_through_a_request(name: str) -> None:
    request = parse_request(_register(name, "long-enough-password"))
    assert isinstance(request, RegisterRequest)
    assert request.username == name  # kept as first written
    assert is_valid_username(name)


@given(st.text(max_size=40))
def test_the_two_username_checks_agree(name: str) -> None:
    try:
        _username.validate_python(name)
        by_schema = True
    except ValidationError:
        by_schema = False
    assert by_schema == is_valid_username(name)
    if by_schema:
        assert 3 <= len(name) <= 32
        assert set(name) <= set(USERNAME_ALPHABET)


@given(usernames)
def test_username_key_is_case_insensitive(name: str) -> None:
    assert username_key(name) == username_key(name.upper()) == username_key(name.lower())
    assert username_key(name) == name.lower()


# -- passwords -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "password",
    [
        "a" * 8,
        "a" * 72,
        "é" * 4,  # 4 characters, 8 bytes
        "€" * 24,  # 24 characters, 72 bytes
        "🎲🎲",  # 2 characters, 8 bytes
        "pass word",
        "p\u0000ssword",
    ],
)
def test_passwords_of_8_to_72_utf8_bytes_are_accepted(password: str) -> None:
    assert _password.validate_python(password) == password
    request = parse_request(_register("alice", password))
    assert isinstance(request, RegisterRequest)
    assert request.password == password


@pytest.mark.parametrize(
    "password",
    [
        "",
        "a" * 7,
        "a" * 73,
        "é" * 3 + "a",  # 4 characters but only 7 bytes
        "€" * 24 + "a",  # 25 characters, 73 bytes: counted in bytes, not characters
        "🎲" * 18 + "a",  # 19 characters, 73 bytes
        "a" * 1000,
    ],
)
def test_passwords_outside_8_to_72_utf8_bytes_are_rejected(password: str) -> None:
    with pytest.raises(ValidationError):
        _password.validate_python(password)
    with pytest.raises(InvalidRequest) as caught:
        parse_request(_register("alice", password))
    assert caught.value.message.startswith("register.password:")
    assert f"got {len(password.encode())}" in caught.value.message


@pytest.mark.parametrize("password", [12345678, None, ["abcdefgh"], {"p": "abcdefgh"}, True])
def test_a_password_that_is_not_a_string_is_rejected(password: object) -> None:
    with pytest.raises(InvalidRequest):
        parse_request(_register("alice", password))


@given(
    st.text(min_size=1).filter(
        lambda p: PASSWORD_MIN_BYTES <= len(p.encode("utf-8")) <= PASSWORD_MAX_BYTES
    )
)
def test_any_password_of_8_to_72_bytes_is_accepted(password: str) -> None:
    assert _password.validate_python(password) == password


@given(st.text())
def test_password_acceptance_is_decided_by_the_utf8_byte_length(password: str) -> None:
    size = len(password.encode("utf-8"))
    try:
        _password.validate_python(password)
        accepted = True
    except ValidationError:
        accepted = False
    assert accepted == (PASSWORD_MIN_BYTES <= size <= PASSWORD_MAX_BYTES)


# -- constants the rest of the system relies on ------------------------------------------


def test_lockout_and_token_constants_follow_the_spec() -> None:
    assert LOCKOUT_MAX_FAILURES == 5
    assert LOCKOUT_WINDOW_S == 15 * 60
    assert LOCKOUT_DURATION_S == 15 * 60
    assert TOKEN_BYTES >= 32
    assert TOKEN_TTL_S == 24 * 60 * 60
    assert (PASSWORD_MIN_BYTES, PASSWORD_MAX_BYTES) == (8, 72)
