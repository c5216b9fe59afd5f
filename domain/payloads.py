"""What Redis hands back, read as data: the `payload` field every stream entry carries
(a JSON object), and reply values (entry ids, names, hash fields) as text.

Pure functions of bytes, so the worker, the tools and the client library share them.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

from usermgmt.domain.errors import DeadLetterReason, InvalidPayload


def load_object(raw: str | bytes | None, reason: DeadLetterReason) -> dict[str, Any]:
    """Decode a payload that must be a JSON object.

    Raises `InvalidPayload`: `invalid_json` when it is not JSON, `reason` when the
    field is missing, holds something other than an object, or a number beyond any
    double (`1e400`: JSON's grammar allows it); `LoneSurrogate` (a `reason`) when a
    string escapes half of a UTF-16 pair (`"\\ud800"`, also JSON), with the object read.
    """
    if raw is None:
        raise InvalidPayload(reason, "entry has no payload field")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if str(exc).startswith("number is infinity"):  # JSON, but no value can hold it
            raise InvalidPayload(reason, f"a number is out of range: {exc}") from None
        data = _with_lone_surrogates(raw, exc)
        if isinstance(data, dict):
            raise LoneSurrogate(reason, data) from None
    if not isinstance(data, dict):
        raise InvalidPayload(reason, f"payload must be a JSON object, got {type(data).__name__}")
    return data


class LoneSurrogate(InvalidPayload):
    """A JSON object with a string that is not Unicode: `data` is the object read, so
    a request can still be answered on its reply key."""

    def __init__(self, reason: DeadLetterReason, data: dict[str, Any]) -> None:
        super().__init__(
            reason,
            "a string holds a lone UTF-16 surrogate (an escape from \\ud800 to \\udfff "
            "that is not half of a pair); strings must be valid Unicode",
        )
        self.data = data


def _with_lone_surrogates(raw: str | bytes, exc: orjson.JSONDecodeError) -> Any:
    """What Python's own parser reads where orjson refused an escaped surrogate (JSON's
    grammar allows one); raises `invalid_json` for anything else orjson refused."""
    if "surrogate in string" in str(exc):  # an escape, not bytes that are not UTF-8
        try:
            return json.loads(raw, parse_constant=_refuse_constant)
        except (ValueError, RecursionError):  # JSONDecodeError too; nested past its limit
            pass
    raise InvalidPayload(DeadLetterReason.INVALID_JSON, f"payload is not JSON: {exc}") from None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def text_of(value: object) -> str:
    """A Redis reply value as text: bytes decoded, None as "", anything else by `str`.

    Bytes that are not UTF-8 are shown with replacement characters rather than
    raising: the values read this way (entry ids, key and consumer names, cached
    fields) are written by this project, and a tool must still show a stray one.
    """
    if value is None:
        return ""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
