"""Auth requests and replies on the request/reply stream (docs/protocol.md, "Accounts")."""

from __future__ import annotations

import re
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from usermgmt.domain.accounts import Password, Username
from usermgmt.domain.errors import DeadLetterReason, ErrorCode, InvalidPayload
from usermgmt.domain.payloads import LoneSurrogate, load_object

REQUEST_MAX_AGE_S = 30
# A UUID in its hyphenated 8-4-4-4-12 form, in either case: the reply key is built from it.
_HEX = "[0-9a-fA-F]"
REQUEST_ID_PATTERN = rf"^{_HEX}{{8}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{12}}$"
_REQUEST_ID = re.compile(REQUEST_ID_PATTERN)
REPLY_TTL_S = 60


class _Request(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    request_id: uuid.UUID


class RegisterRequest(_Request):
    op: Literal["register"]
    username: Username
    password: Password = Field(repr=False)


class LoginRequest(_Request):
    op: Literal["login"]
    username: Username
    password: Password = Field(repr=False)


class GetUserRequest(_Request):
    op: Literal["get_user"]
    username: Username


class VerifyTokenRequest(_Request):
    op: Literal["verify_token"]
    token: Annotated[str, Field(min_length=1, max_length=512, repr=False)]


AuthRequest = Annotated[
    RegisterRequest | LoginRequest | GetUserRequest | VerifyTokenRequest,
    Field(discriminator="op"),
]
_REQUEST_ADAPTER: TypeAdapter[AuthRequest] = TypeAdapter(AuthRequest)

SECRET_FIELDS = frozenset({"password", "token"})
# The only text a dead letter keeps of an auth request (`redact`).
PLAIN_TEXT_FIELDS = frozenset({"request_id", "op", "username"})
WITHHELD = "[withheld: may be a secret]"


class InvalidRequest(ValueError):
    """A request with a valid `request_id` whose body breaks the rules: answered, not applied."""

    def __init__(self, request_id: uuid.UUID, message: str) -> None:
        super().__init__(message)
        self.request_id = request_id
        self.message = message


def parse_request(raw: str | bytes | None) -> AuthRequest:
    """Validate one stream payload.

    Raises `InvalidPayload` when no reply can be sent (no JSON object or no UUID
    `request_id`), `InvalidRequest` when the request can be answered with an error.
    """
    try:
        data = load_object(raw, DeadLetterReason.INVALID_REQUEST)
    except LoneSurrogate as exc:  # JSON all the same: answered, if it names its request
        raise InvalidRequest(_request_id(exc.data.get("request_id")), exc.message) from None
    request_id = data["request_id"] = _request_id(data.get("request_id"))
    try:
        return _REQUEST_ADAPTER.validate_python(data)  # keeps the `RequestId` as it is
    except ValidationError as exc:
        raise InvalidRequest(request_id, describe_validation_error(exc)) from None


class RequestId(uuid.UUID):
    """A request's UUID that reads as the client wrote it (`str`): the reply key is
    `<prefix>:auth:reply:` plus that text, the key the client waits on."""

    __slots__ = ("text",)
    text: str

    def __init__(self, text: str) -> None:
        super().__init__(text)
        object.__setattr__(self, "text", text)

    def __str__(self) -> str:
        return self.text


def _request_id(value: Any) -> uuid.UUID:
    # Only the hyphenated form (either case): `uuid.UUID` would also take braces, `urn:uuid:`
    # or bare hex, which are not worth a reply key of their own.
    if isinstance(value, str) and _REQUEST_ID.fullmatch(value):
        return RequestId(value)
    raise InvalidPayload(
        DeadLetterReason.INVALID_REQUEST,
        "request_id must be a UUID string in its hyphenated form (8-4-4-4-12 hex digits)",
    )


def describe_validation_error(exc: ValidationError) -> str:
    """One readable line from a pydantic error, never echoing the input (it may be a password)."""
    parts = []
    for error in exc.errors(include_input=False, include_url=False)[:5]:
        location = ".".join(str(part) for part in error["loc"]) or "payload"
        message = error["msg"]
        if error["type"] == "union_tag_invalid":  # pydantic's message echoes the input
            location, message = "op", f"must be one of {error['ctx']['expected_tags']}"
        parts.append(f"{location}: {message}")
    return "; ".join(parts)


def redact(data: Any, field: str | None = None) -> Any:
    """A copy of a request without anything that may be a secret, fit for a dead letter.

    `password` and `token` go; so does any other text but a `request_id`, `op` or
    `username` (a client may have put the password under another name, or sent a list):
    it is replaced by `WITHHELD`. Numbers, booleans and nulls stay.
    """
    if isinstance(data, dict):
        return {key: redact(value, key) for key, value in data.items() if key not in SECRET_FIELDS}
    if isinstance(data, list):
        return [redact(item) for item in data]
    if isinstance(data, str) and field not in PLAIN_TEXT_FIELDS:
        return WITHHELD
    return data


class UserView(BaseModel):
    """The public user record sent in replies and kept in the user cache."""

    model_config = ConfigDict(frozen=True)

    id: int
    username: str
    wallet: int
    win_count: int
    loss_count: int
    earnings: int
    rank: int
    session: str | None = None


def ok_reply(request_id: uuid.UUID, user: UserView, token: str | None = None) -> dict[str, Any]:
    """A successful reply (docs/protocol.md, "Replies"); `token` only on login."""
    reply: dict[str, Any] = {
        "request_id": str(request_id),
        "ok": True,
        "user": user.model_dump(exclude={"session"}),
    }
    if token is not None:
        reply["token"] = token
    return reply


def error_reply(request_id: uuid.UUID, code: ErrorCode, message: str) -> dict[str, Any]:
    """A failed reply (docs/protocol.md, "Replies")."""
    return {
        "request_id": str(request_id),
        "ok": False,
        "error": {"code": str(code), "message": message},
    }
