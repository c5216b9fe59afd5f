"""JSON Schemas of every stream payload and reply, for producers in any language.

The schemas are generated from the pydantic models the worker validates with, so they
cannot promise what the worker does not check. A few rules are enforced by code that
pydantic's schema cannot see (the canonical `request_id`, a password's UTF-8 bytes,
players distinct case-insensitively, a completed game's results); `_HAND_CHECKED`
writes them into the schemas so these still state the real limits.

Replies and dead letters are built as plain dicts (`domain.auth.ok_reply` and
`error_reply`, `workers.runtime.streams.dead_letter_payload`, all under `usermgmt.`);
the TypedDicts below describe those dicts, and tests/unit/test_schemas.py checks real
ones against them.

`python -m usermgmt.domain.schemas [DIR]` writes `<name>.json` for each payload to DIR
(default: docs/schemas/ of the repository holding this file) and removes schema files
of payloads that no longer exist. See docs/protocol.md for the protocol around them.
"""

# No `from __future__ import annotations` here: a TypedDict needs its annotations as
# objects to know which keys are `NotRequired` (`__required_keys__`).
import argparse
import copy
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, NotRequired

from pydantic import AwareDatetime, Field, TypeAdapter
from typing_extensions import TypedDict  # pydantic needs this one on Python 3.11

from usermgmt.domain.accounts import PASSWORD_MAX_BYTES, PASSWORD_MIN_BYTES, Username
from usermgmt.domain.auth import REQUEST_ID_PATTERN, AuthRequest
from usermgmt.domain.errors import DeadLetterReason, ErrorCode
from usermgmt.domain.events import MAX_EARNINGS, MAX_META_FIELDS, TerminateEvent, UpdateEvent
from usermgmt.domain.registrations import Registration

DIALECT = "https://json-schema.org/draft/2020-12/schema"
ID_PREFIX = "urn:usermgmt:schema:"

# The only spelling `domain.auth.parse_request` takes: the reply key is built from it.
ENTRY_ID_PATTERN = r"^[0-9]+-[0-9]+$"
# secrets.token_urlsafe(32): 43 characters
TOKEN_PATTERN = r"^[A-Za-z0-9_-]{43,}$"  # noqa: S105 - a pattern, not a secret
RequestIdText = Annotated[str, Field(pattern=REQUEST_ID_PATTERN)]
Count = Annotated[int, Field(ge=0)]


# -- what the worker writes as plain dicts --------------------------------------------


class ReplyUser(TypedDict):
    """The public user record of a successful reply (never a password hash)."""

    id: Annotated[int, Field(ge=1, description="users.id")]
    username: Annotated[Username, Field(description="as first registered (case kept)")]
    wallet: int
    win_count: Count
    loss_count: Count
    earnings: Count
    rank: Annotated[
        int,
        Field(ge=1, description="live competition rank: 1 + players with more earnings"),
    ]


class OkReply(TypedDict):
    """A request that succeeded."""

    request_id: RequestIdText
    ok: Literal[True]
    user: ReplyUser
    token: NotRequired[
        Annotated[
            str,
            Field(
                pattern=TOKEN_PATTERN,
                description="login only: 32 random bytes, URL-safe base64; valid 24 h",
            ),
        ]
    ]


class ReplyError(TypedDict):
    """Why a request failed: a stable code, and a message for people."""

    code: ErrorCode
    message: str


class ErrorReply(TypedDict):
    """A request that failed."""

    request_id: RequestIdText
    ok: Literal[False]
    error: ReplyError


class DeadLetter(TypedDict):
    """An entry the worker gave up on, with why."""

    stream: Annotated[str, Field(description="the key of the stream the entry came from")]
    entry_id: Annotated[str, Field(pattern=ENTRY_ID_PATTERN, description="its id there")]
    payload: Annotated[
        str,
        Field(
            description="the entry's payload field as text ('' when it had none); "
            "an auth request's without its password and token"
        ),
    ]
    reason: DeadLetterReason
    message: str
    deliveries: Annotated[
        int,
        Field(ge=1, description="deliveries so far, each failed attempt to apply it counted"),
    ]
    failed_at: AwareDatetime


# -- the payloads -------------------------------------------------------------------


@dataclass(frozen=True)
class Payload:
    """One schema file: the type it is generated from, and what it is the payload of."""

    type: Any
    title: str
    description: str


PAYLOADS: dict[str, Payload] = {
    "update": Payload(
        UpdateEvent,
        "update event",
        "Published by matchmaking servers on <prefix>:{events}:update (um:{events}:update "
        "by default): a session's whole current roster and status.",
    ),
    "terminate": Payload(
        TerminateEvent,
        "terminate event",
        "Published by game servers on <prefix>:{events}:terminate: a finished or aborted "
        "game and each finishing player's result.",
    ),
    "auth-request": Payload(
        AuthRequest,
        "auth request",
        "Published by auth clients on <prefix>:auth:requests; answered on "
        "<prefix>:auth:reply:<request_id>. Other fields are ignored.",
    ),
    "auth-reply": Payload(
        OkReply | ErrorReply,
        "auth reply",
        "The one JSON value the worker LPUSHes to <prefix>:auth:reply:<request_id>; "
        "the key expires 60 s later.",
    ),
    "dead-letter": Payload(
        DeadLetter,
        "dead letter",
        "Written by the worker on <prefix>:dlq for every entry it could not apply.",
    ),
    "accounts": Payload(
        Registration,
        "registration event",
        "Written by the worker only, on <prefix>:{events}:accounts, for backups and "
        "replay: one per registered account. Producers never publish it.",
    ),
}

EVENT_ID = (
    "The idempotency key, chosen by the producer: unique per event across the event "
    "streams. Publish the canonical lower-case 8-4-4-4-12 form; the worker also takes "
    "other spellings of the same UUID (upper case, no hyphens)."
)
PASSWORD = {
    # JSON Schema counts characters, the worker UTF-8 bytes: exact for ASCII passwords
    # (one byte each), only the implied bounds otherwise (up to 4 bytes a character).
    "minLength": 2,
    "maxLength": PASSWORD_MAX_BYTES,
    "anyOf": [
        {"pattern": rf"^[\u0000-\u007f]{{{PASSWORD_MIN_BYTES},}}$"},
        {"pattern": r"[^\u0000-\u007f]"},
    ],
    "description": f"{PASSWORD_MIN_BYTES}-{PASSWORD_MAX_BYTES} bytes once UTF-8 encoded "
    "(bcrypt's limit). Exact here for ASCII passwords; for others the worker counts the "
    "bytes, and the schema only bounds the characters.",
}
REQUEST_ID = {
    "pattern": REQUEST_ID_PATTERN,
    "description": "A UUID chosen per request, in its hyphenated 8-4-4-4-12 form (lower "
    "case is canonical; upper case is taken too): the reply goes to "
    "<prefix>:auth:reply:<request_id>, that exact text, and echoes it. Any other spelling "
    "is dead-lettered (invalid_request) unanswered.",
}
REQUESTS = ("RegisterRequest", "LoginRequest", "GetUserRequest", "VerifyTokenRequest")

# JSON pointer into a generated schema -> keywords to add there ("" is the root).
_HAND_CHECKED: dict[str, dict[str, dict[str, Any]]] = {
    "update": {
        "/properties/event_id": {"description": EVENT_ID},
        "/properties/session_id": {"description": "1-64 of A-Z a-z 0-9 _ . : -"},
        "/properties/players": {
            "uniqueItems": True,
            "description": "The session's whole roster (a later update replaces it): "
            "registered usernames, distinct compared case-insensitively (checked by the "
            "worker; uniqueItems only catches exact repeats).",
        },
        "/properties/meta": {
            "description": f"A flat object of at most {MAX_META_FIELDS} values: strings "
            "of at most 256 characters, numbers or booleans (no null, no nesting)."
        },
    },
    "terminate": {
        "": {
            "anyOf": [
                {"properties": {"reason": {"const": "aborted"}}, "required": ["reason"]},
                {"properties": {"results": {"minItems": 1}}, "required": ["results"]},
            ],
        },
        "/properties/event_id": {"description": EVENT_ID},
        "/properties/session_id": {"description": "1-64 of A-Z a-z 0-9 _ . : -"},
        "/properties/results": {
            "description": "One item per player who finished, each in the session's roster "
            "and named at most once (compared case-insensitively; checked by the worker). "
            "A completed game (the default reason) needs at least one; an aborted game "
            "may have none."
        },
        "/$defs/Result/properties/earnings": {
            "description": f"A JSON integer from 0 to {MAX_EARNINGS:,}, written without a "
            "fraction or exponent (150.0 and 1e3 are rejected)."
        },
    },
    "auth-request": {
        **{f"/$defs/{name}/properties/request_id": REQUEST_ID for name in REQUESTS},
        "/$defs/RegisterRequest/properties/password": PASSWORD,
        "/$defs/LoginRequest/properties/password": PASSWORD,
    },
}


def payload_schemas() -> dict[str, dict[str, object]]:
    """Every payload's JSON Schema, by file name (without `.json`)."""
    return {name: _schema(name, payload) for name, payload in PAYLOADS.items()}


def _schema(name: str, payload: Payload) -> dict[str, object]:
    generated: dict[str, Any] = TypeAdapter(payload.type).json_schema()
    for pointer, keywords in _HAND_CHECKED.get(name, {}).items():
        _at(generated, pointer, name).update(copy.deepcopy(keywords))
    return {
        "$schema": DIALECT,
        "$id": f"{ID_PREFIX}{name}",
        **generated,
        "title": f"usermgmt {payload.title}",
        "description": payload.description,
    }


def _at(schema: dict[str, Any], pointer: str, name: str) -> dict[str, Any]:
    """The sub-schema at a JSON pointer; a model change that moved it fails loudly."""
    node = schema
    for part in pointer.split("/")[1:]:
        if not isinstance(node, dict) or part not in node:
            raise KeyError(f"schema {name!r} has nothing at {pointer!r}: update _HAND_CHECKED")
        node = node[part]
    return node


def schema_text(schema: dict[str, object]) -> str:
    """A schema as written to its file: sorted keys, 2-space indent, trailing newline."""
    return json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write_schemas(directory: Path) -> list[Path]:
    """Write every schema to `directory` and remove stale `*.json` files there."""
    directory.mkdir(parents=True, exist_ok=True)
    schemas = payload_schemas()
    for stale in directory.glob("*.json"):
        if stale.stem not in schemas:
            stale.unlink()
    written = []
    for name, schema in schemas.items():
        path = directory / f"{name}.json"
        path.write_text(schema_text(schema), encoding="utf-8")
        written.append(path)
    return written


def repository_schemas_dir() -> Path:
    """docs/schemas/ of the source tree this module is in (the one with pyproject.toml).

    Found by walking up, so it does not matter how deep the package sits.
    """
    here = Path(__file__).resolve()
    for folder in here.parents:
        if (folder / "pyproject.toml").is_file():
            return folder / "docs" / "schemas"
    raise FileNotFoundError(f"{here} is not in a source tree; name the output directory")


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m usermgmt.domain.schemas [DIR]`: regenerate the schema files."""
    parser = argparse.ArgumentParser(
        prog="python -m usermgmt.domain.schemas",
        description="Write the JSON Schemas of every payload (default: docs/schemas/ of "
        "the source tree this module is in).",
    )
    parser.add_argument("directory", nargs="?", type=Path, help="where to write them")
    args = parser.parse_args(argv)
    try:
        directory = args.directory or repository_schemas_dir()
    except FileNotFoundError:
        parser.error("this module is installed outside a source tree: name the directory")
    for path in write_schemas(directory):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
