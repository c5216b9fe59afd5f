"""JSON Schemas of the payloads (usermgmt.domain.schemas, docs/schemas/): the files match the
models, and the schemas judge real payloads as the worker does.

`jsonschema` is not a dependency, so payloads are checked with `conforms`, a validator
of the few keywords these schemas use; `test_schemas_use_only_checked_keywords` keeps
it from silently ignoring one.
"""

from __future__ import annotations

import json
import re
import secrets
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from pydantic import BaseModel, TypeAdapter

from usermgmt.domain import schemas as schemas_module
from usermgmt.domain.accounts import TOKEN_BYTES
from usermgmt.domain.auth import (
    GetUserRequest,
    InvalidRequest,
    LoginRequest,
    RegisterRequest,
    UserView,
    VerifyTokenRequest,
    error_reply,
    ok_reply,
    parse_request,
)
from usermgmt.domain.errors import DeadLetterReason, ErrorCode, InvalidPayload
from usermgmt.domain.events import EventKind, Result, TerminateEvent, UpdateEvent, parse_event
from usermgmt.domain.registrations import Registration, registration
from usermgmt.domain.schemas import (
    DeadLetter,
    ErrorReply,
    OkReply,
    ReplyError,
    ReplyUser,
    main,
    payload_schemas,
    repository_schemas_dir,
    schema_text,
)
from usermgmt.workers.runtime.streams import Entry, dead_letter_payload

SCHEMAS = payload_schemas()
SCHEMA_DIR = Path(__file__).resolve().parents[2] / "docs" / "schemas"
EID = "0b8f2a52-5d1e-4a43-9a38-1c1f3e0e6f11"
RID = "3d9b3c0e-0f7e-4d61-9d3e-8d4b1f1e2a10"


# -- the files ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_schema_file_matches_the_models(name: str) -> None:
    path = SCHEMA_DIR / f"{name}.json"
    assert path.exists(), f"{path} is missing: run `.venv/bin/python -m usermgmt.domain.schemas`"
    assert path.read_text(encoding="utf-8") == schema_text(SCHEMAS[name]), (
        f"{path} is stale: run `.venv/bin/python -m usermgmt.domain.schemas` and commit the result"
    )


def test_no_schema_file_without_a_payload() -> None:
    files = {path.name for path in SCHEMA_DIR.iterdir()}
    assert files == {f"{name}.json" for name in SCHEMAS}


def test_main_writes_to_this_repository_by_default() -> None:
    assert repository_schemas_dir() == SCHEMA_DIR


def test_main_writes_every_schema_and_removes_stale_ones(tmp_path: Path) -> None:
    (tmp_path / "renamed-away.json").write_text("{}\n", encoding="utf-8")
    assert main([str(tmp_path)]) == 0
    assert {path.stem for path in tmp_path.iterdir()} == set(SCHEMAS)
    for name, schema in SCHEMAS.items():
        assert (tmp_path / f"{name}.json").read_text(encoding="utf-8") == schema_text(schema)


def test_main_is_a_command_with_help_and_usage_errors(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as helped:
        main(["--help"])
    assert helped.value.code == 0 and "directory" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []  # no folder named --help

    def outside() -> Path:
        raise FileNotFoundError("not in a source tree")

    monkeypatch.setattr(schemas_module, "repository_schemas_dir", outside)
    with pytest.raises(SystemExit) as refused:
        main([])
    assert refused.value.code == 2
    assert "outside a source tree: name the directory" in capsys.readouterr().err


def test_every_schema_names_its_payload() -> None:
    for name, schema in SCHEMAS.items():
        assert schema["$id"] == f"urn:usermgmt:schema:{name}"
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        assert str(schema["title"]).startswith("usermgmt ")


# -- structure: the schemas have the models' fields ---------------------------------------


def definition(name: str, title: str | None = None) -> dict[str, Any]:
    """A payload's root schema, or one of its `$defs`."""
    schema: dict[str, Any] = SCHEMAS[name]
    return schema if title is None else schema["$defs"][title]


MODELS: list[tuple[str, str | None, type[Any]]] = [
    ("update", None, UpdateEvent),
    ("terminate", None, TerminateEvent),
    ("terminate", "Result", Result),
    ("accounts", None, Registration),
    ("auth-request", "RegisterRequest", RegisterRequest),
    ("auth-request", "LoginRequest", LoginRequest),
    ("auth-request", "GetUserRequest", GetUserRequest),
    ("auth-request", "VerifyTokenRequest", VerifyTokenRequest),
]


@pytest.mark.parametrize(("name", "title", "model"), MODELS)
def test_properties_and_required_are_the_model_fields(
    name: str, title: str | None, model: type[Any]
) -> None:
    """Models, and the pydantic dataclass `Result` (its fields: `__pydantic_fields__`)."""
    schema = definition(name, title)
    fields = model.model_fields if issubclass(model, BaseModel) else model.__pydantic_fields__
    assert set(schema["properties"]) == set(fields)
    assert set(schema["required"]) == {key for key, info in fields.items() if info.is_required()}


DICTS: list[tuple[str, str | None, Any]] = [
    ("auth-reply", "OkReply", OkReply),
    ("auth-reply", "ErrorReply", ErrorReply),
    ("auth-reply", "ReplyError", ReplyError),
    ("auth-reply", "ReplyUser", ReplyUser),
    ("dead-letter", None, DeadLetter),
]


@pytest.mark.parametrize(("name", "title", "shape"), DICTS)
def test_properties_and_required_are_the_typed_dict_keys(
    name: str, title: str | None, shape: Any
) -> None:
    schema = definition(name, title)
    assert set(schema["properties"]) == set(shape.__annotations__)
    assert set(schema["required"]) == set(shape.__required_keys__)


def test_every_request_op_and_code_is_in_the_schemas() -> None:
    ops = definition("auth-request")["discriminator"]["mapping"]
    assert set(ops) == {"register", "login", "get_user", "verify_token"}
    assert definition("auth-reply", "ErrorCode")["enum"] == [str(code) for code in ErrorCode]
    reasons = definition("dead-letter", "DeadLetterReason")["enum"]
    assert reasons == [str(reason) for reason in DeadLetterReason]


# -- real replies, registrations and dead letters -----------------------------------------

USER = UserView(id=7, username="Alice", wallet=150, win_count=1, loss_count=0, earnings=150, rank=1)


def real_replies() -> list[dict[str, Any]]:
    """Replies exactly as the worker builds them: every shape, every error code."""
    request_id = uuid.UUID(RID)
    token = secrets.token_urlsafe(TOKEN_BYTES)  # as persistence.auth_store issues them
    replies = [
        ok_reply(request_id, USER),
        ok_reply(request_id, USER.model_copy(update={"session": "eu-1-000042"})),
        ok_reply(request_id, USER, token=token),
    ]
    replies += [error_reply(request_id, code, f"{code} happened") for code in ErrorCode]
    return [orjson.loads(orjson.dumps(reply)) for reply in replies]


@pytest.mark.parametrize(
    "reply", real_replies(), ids=lambda reply: reply["error"]["code"] if "error" in reply else "ok"
)
def test_real_replies_conform(reply: dict[str, Any]) -> None:
    assert conforms(SCHEMAS["auth-reply"], reply)
    TypeAdapter(OkReply | ErrorReply).validate_python(reply)
    shape = OkReply if reply["ok"] else ErrorReply
    assert set(reply) <= set(shape.__annotations__)
    if reply["ok"]:
        assert set(reply["user"]) == set(ReplyUser.__annotations__)


@pytest.mark.parametrize(
    "reply",
    [
        {"request_id": RID, "ok": True},
        {"request_id": RID, "ok": False, "error": {"code": "oops", "message": "?"}},
        {"request_id": f"{{{RID}}}", "ok": False, "error": {"code": "locked", "message": "?"}},
        {**real_replies()[0], "ok": False},
        {**real_replies()[0], "token": "short"},
    ],
)
def test_broken_replies_do_not_conform(reply: dict[str, Any]) -> None:
    assert not conforms(SCHEMAS["auth-reply"], reply)


@pytest.mark.parametrize("reason", list(DeadLetterReason))
def test_real_dead_letters_conform(reason: DeadLetterReason) -> None:
    entry = Entry("um:{events}:update", "1700000000000-3", b'{"not": "an event"}', deliveries=2)
    letter = orjson.loads(dead_letter_payload(entry, reason, "why it failed"))
    assert conforms(SCHEMAS["dead-letter"], letter)
    assert set(letter) == set(DeadLetter.__annotations__)
    assert not conforms(SCHEMAS["dead-letter"], {**letter, "reason": "lost"})


def test_a_dead_letter_of_an_entry_without_payload_conforms() -> None:
    entry = Entry("um:{events}:terminate", "1700000000000-0", None)
    letter = orjson.loads(dead_letter_payload(entry, DeadLetterReason.INVALID_EVENT, "empty"))
    assert letter["payload"] == ""
    assert conforms(SCHEMAS["dead-letter"], letter)


def test_a_real_registration_conforms() -> None:
    made = registration(42, "Alice", "$2b$12$" + "x" * 53, 0, datetime.now(UTC))
    assert conforms(SCHEMAS["accounts"], orjson.loads(made.to_json()))
    assert not conforms(SCHEMAS["accounts"], {**orjson.loads(made.to_json()), "user_id": 0})


# -- payloads: the schema and the worker agree --------------------------------------------


def update(**fields: Any) -> dict[str, Any]:
    return {"event_id": EID, "session_id": "eu-1-000042", "players": ["alice", "bob"], **fields}


def terminate(**fields: Any) -> dict[str, Any]:
    results = [
        {"username": "alice", "outcome": "win", "earnings": 150},
        {"username": "bob", "outcome": "loss", "earnings": 0},
    ]
    return {"event_id": EID, "session_id": "eu-1-000042", "results": results, **fields}


def result(**fields: Any) -> dict[str, Any]:
    return terminate(results=[{"username": "alice", "outcome": "win", "earnings": 1, **fields}])


def request(op: str, **fields: Any) -> dict[str, Any]:
    return {"request_id": RID, "op": op, **fields}


def password(op: str, value: str) -> dict[str, Any]:
    return request(op, username="bob", password=value)


def request_id(value: str) -> dict[str, Any]:
    return {**request("login", **LOGIN), "request_id": value}


def without(body: dict[str, Any], key: str) -> dict[str, Any]:
    return {name: value for name, value in body.items() if name != key}


NAMES = [f"player{index:03d}" for index in range(101)]
META = {f"k{index}": value for index, value in enumerate([1, 2.5, True, "x" * 256] * 4)}
LOGIN = {"username": "alice", "password": "s3cret-pass"}

# (schema, label, payload, accepted by the worker and by the schema)
AGREED: list[tuple[str, str, Any, bool]] = [
    ("update", "the README example", update(status="in_progress", meta={"map": "dust"}), True),
    ("update", "only required fields", update(), True),
    ("update", "waiting", update(status="waiting"), True),
    ("update", "100 players", update(players=NAMES[:100]), True),
    ("update", "16 meta values of every kind", update(meta=META), True),
    ("update", "longest session id", update(session_id="A-z_0.9:" * 8), True),
    ("update", "unknown fields ignored", update(source="mm-7"), True),
    ("update", "no event_id", without(update(), "event_id"), False),
    ("update", "event_id not a UUID", update(event_id="42"), False),
    ("update", "no players", without(update(), "players"), False),
    ("update", "empty roster", update(players=[]), False),
    ("update", "101 players", update(players=NAMES), False),
    ("update", "same player twice", update(players=["alice", "alice"]), False),
    ("update", "username too short", update(players=["al"]), False),
    ("update", "username too long", update(players=["a" * 33]), False),
    ("update", "username with a space", update(players=["al ice"]), False),
    ("update", "players not a list", update(players="alice"), False),
    ("update", "empty session id", update(session_id=""), False),
    ("update", "session id too long", update(session_id="s" * 65), False),
    ("update", "session id with a slash", update(session_id="eu/1"), False),
    ("update", "status ended", update(status="ended"), False),
    ("update", "17 meta values", update(meta={**META, "one": 1}), False),
    ("update", "meta string too long", update(meta={"map": "x" * 257}), False),
    ("update", "nested meta", update(meta={"map": {"name": "dust"}}), False),
    ("update", "null meta value", update(meta={"map": None}), False),
    ("update", "a list, not an object", [update()], False),
    ("terminate", "the README example", terminate(reason="completed"), True),
    ("terminate", "aborted without results", without(terminate(reason="aborted"), "results"), True),
    ("terminate", "aborted with no results", terminate(reason="aborted", results=[]), True),
    ("terminate", "earnings at the maximum", result(earnings=1_000_000_000), True),
    ("terminate", "completed without results", without(terminate(), "results"), False),
    ("terminate", "completed with no results", terminate(results=[]), False),
    ("terminate", "reason expired", terminate(reason="expired"), False),
    ("terminate", "negative earnings", result(earnings=-1), False),
    ("terminate", "earnings past the maximum", result(earnings=1_000_000_001), False),
    ("terminate", "earnings with a fraction", result(earnings=150.0), False),
    ("terminate", "earnings as text", result(earnings="150"), False),
    ("terminate", "outcome draw", result(outcome="draw"), False),
    ("terminate", "result without earnings", terminate(results=[{"username": "alice"}]), False),
    (
        "terminate",
        "101 results",
        terminate(results=[{"username": n, "outcome": "win", "earnings": 0} for n in NAMES]),
        False,
    ),
    ("auth-request", "register", request("register", **LOGIN), True),
    ("auth-request", "login", request("login", **LOGIN), True),
    ("auth-request", "get_user", request("get_user", username="alice"), True),
    ("auth-request", "verify_token", request("verify_token", token="t" * 43), True),
    ("auth-request", "unknown fields ignored", request("get_user", username="bob", x=1), True),
    ("auth-request", "8-byte password", password("login", "8bytes!!"), True),
    ("auth-request", "72-byte password", password("register", "p" * 72), True),
    ("auth-request", "2 four-byte characters", password("login", "😀😀"), True),
    ("auth-request", "7-byte password", password("register", "7bytes!"), False),
    ("auth-request", "73-byte password", password("register", "p" * 73), False),
    ("auth-request", "one-character password", password("login", "é"), False),
    ("auth-request", "unknown op", request("delete", username="alice"), False),
    ("auth-request", "no op", without(request("login", **LOGIN), "op"), False),
    ("auth-request", "login without password", request("login", username="alice"), False),
    ("auth-request", "username too short", request("get_user", username="al"), False),
    ("auth-request", "empty token", request("verify_token", token=""), False),
    ("auth-request", "token too long", request("verify_token", token="t" * 513), False),
    ("auth-request", "no request_id", without(request("login", **LOGIN), "request_id"), False),
    ("auth-request", "upper-case request_id", request_id(RID.upper()), True),
    ("auth-request", "request_id in braces", request_id(f"{{{RID}}}"), False),
    ("auth-request", "request_id without hyphens", request_id(RID.replace("-", "")), False),
]  # fmt: skip

# What JSON Schema cannot say, so the worker alone refuses it (the schema descriptions
# say so), or what the schema asks for more strictly than the worker needs.
GAPS: list[tuple[str, str, Any, bool]] = [
    ("update", "same player in two cases", update(players=["alice", "Alice"]), False),
    ("terminate", "one player's result twice", terminate(results=[
        {"username": "alice", "outcome": "win", "earnings": 1},
        {"username": "ALICE", "outcome": "loss", "earnings": 0},
    ]), False),
    ("auth-request", "3 characters, 6 bytes", password("login", "äää"), False),
    ("auth-request", "37 characters, 74 bytes", password("login", "ä" * 37), False),
    ("update", "event_id without hyphens", update(event_id=EID.replace("-", "")), True),
]  # fmt: skip


def worker_accepts(name: str, body: Any) -> bool:
    """Whether the worker's own parser takes this payload."""
    raw = orjson.dumps(body)
    try:
        if name == "auth-request":
            parse_request(raw)
        else:
            parse_event(EventKind(name), raw)
    except (InvalidPayload, InvalidRequest):
        return False
    return True


@pytest.mark.parametrize(
    ("name", "body", "valid"),
    [(name, body, valid) for name, _, body, valid in AGREED],
    ids=[f"{name}: {label}" for name, label, _, _ in AGREED],
)
def test_schema_and_worker_agree(name: str, body: Any, valid: bool) -> None:
    assert worker_accepts(name, body) is valid
    assert conforms(SCHEMAS[name], json.loads(orjson.dumps(body))) is valid


@pytest.mark.parametrize(
    ("name", "body", "worker_valid"),
    [(name, body, valid) for name, _, body, valid in GAPS],
    ids=[f"{name}: {label}" for name, label, _, _ in GAPS],
)
def test_known_gaps_between_schema_and_worker(name: str, body: Any, worker_valid: bool) -> None:
    assert worker_accepts(name, body) is worker_valid
    assert conforms(SCHEMAS[name], json.loads(orjson.dumps(body))) is not worker_valid


# -- a validator of the keywords these schemas use ----------------------------------------

ANNOTATIONS = {"$schema", "$id", "$defs", "title", "description", "default", "discriminator"}


def conforms(schema: dict[str, Any], value: Any, root: dict[str, Any] | None = None) -> bool:
    """Whether `value` is valid against `schema` (JSON Schema 2020-12, `CHECKS` only)."""
    root = schema if root is None else root
    return all(CHECKS[keyword](schema, value, root) for keyword in schema if keyword in CHECKS)


def _ref(schema: dict[str, Any], value: Any, root: dict[str, Any]) -> bool:
    target: Any = root
    for part in schema["$ref"].removeprefix("#/").split("/"):
        target = target[part]
    return conforms(target, value, root)


def _type(schema: dict[str, Any], value: Any, root: dict[str, Any]) -> bool:
    kinds = {
        "object": lambda v: isinstance(v, dict),
        "array": lambda v: isinstance(v, list),
        "string": lambda v: isinstance(v, str),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
        "boolean": lambda v: isinstance(v, bool),
        "null": lambda v: v is None,
    }
    return kinds[schema["type"]](value)


def _properties(schema: dict[str, Any], value: Any, root: dict[str, Any]) -> bool:
    if not isinstance(value, dict):
        return True
    props = schema["properties"]
    return all(conforms(props[key], value[key], root) for key in props if key in value)


def _additional(schema: dict[str, Any], value: Any, root: dict[str, Any]) -> bool:
    if not isinstance(value, dict):
        return True
    extra = [key for key in value if key not in schema.get("properties", {})]
    rule = schema["additionalProperties"]
    if rule is False:
        return not extra
    return all(conforms(rule, value[key], root) for key in extra)


def _format(schema: dict[str, Any], value: Any, root: dict[str, Any]) -> bool:
    if not isinstance(value, str):
        return True
    if schema["format"] == "uuid":  # RFC 4122's text form, as `jsonschema` checks it
        hyphens = all(len(value) == 36 and value[at] == "-" for at in (8, 13, 18, 23))
        return hyphens and _parses(uuid.UUID, value)
    assert schema["format"] == "date-time", schema["format"]
    return (
        _parses(datetime.fromisoformat, value) and datetime.fromisoformat(value).tzinfo is not None
    )


def _parses(parse: Any, text: str) -> bool:
    try:
        parse(text)
    except ValueError:
        return False
    return True


def _same(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _when(kind: type | tuple[type, ...], test: Any) -> Any:
    """A keyword check that applies to values of one JSON type only."""

    def check(schema: dict[str, Any], value: Any, root: dict[str, Any]) -> bool:
        if not isinstance(value, kind) or isinstance(value, bool):
            return True
        return bool(test(schema, value, root))

    return check


CHECKS: dict[str, Any] = {
    "$ref": _ref,
    "type": _type,
    "properties": _properties,
    "additionalProperties": _additional,
    "format": _format,
    "required": _when(dict, lambda s, v, r: all(key in v for key in s["required"])),
    "maxProperties": _when(dict, lambda s, v, r: len(v) <= s["maxProperties"]),
    "items": _when(list, lambda s, v, r: all(conforms(s["items"], item, r) for item in v)),
    "minItems": _when(list, lambda s, v, r: len(v) >= s["minItems"]),
    "maxItems": _when(list, lambda s, v, r: len(v) <= s["maxItems"]),
    "uniqueItems": _when(
        list, lambda s, v, r: not s["uniqueItems"] or len({json.dumps(i) for i in v}) == len(v)
    ),
    "minLength": _when(str, lambda s, v, r: len(v) >= s["minLength"]),
    "maxLength": _when(str, lambda s, v, r: len(v) <= s["maxLength"]),
    "pattern": _when(str, lambda s, v, r: re.search(s["pattern"], v)),
    "minimum": _when((int, float), lambda s, v, r: v >= s["minimum"]),
    "maximum": _when((int, float), lambda s, v, r: v <= s["maximum"]),
    "enum": lambda s, v, r: any(_same(v, option) for option in s["enum"]),
    "const": lambda s, v, r: _same(v, s["const"]),
    "anyOf": lambda s, v, r: any(conforms(sub, v, r) for sub in s["anyOf"]),
    "oneOf": lambda s, v, r: sum(conforms(sub, v, r) for sub in s["oneOf"]) == 1,
}


def keywords(schema: dict[str, Any]) -> set[str]:
    """Every keyword used anywhere in `schema` (subschemas included)."""
    found = set(schema)
    children: list[Any] = [*schema.get("properties", {}).values()]
    children += [*schema.get("$defs", {}).values(), *schema.get("anyOf", [])]
    children += [*schema.get("oneOf", []), schema.get("items"), schema.get("additionalProperties")]
    for child in children:
        if isinstance(child, dict):
            found |= keywords(child)
    return found


def test_schemas_use_only_checked_keywords() -> None:
    for name, schema in SCHEMAS.items():
        unchecked = keywords(schema) - set(CHECKS) - ANNOTATIONS
        assert not unchecked, f"{name}: teach `conforms` {sorted(unchecked)}"
