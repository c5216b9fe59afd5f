"""The one field every stream entry carries: `payload`, a JSON object."""

from __future__ import annotations

from typing import Any

import orjson

from usermgmt.domain.errors import DeadLetterReason, InvalidPayload


def load_object(raw: str | bytes | None, reason: DeadLetterReason) -> dict[str, Any]:
    """Decode a payload that must be a JSON object.

    Raises `InvalidPayload`: `invalid_json` when it is not JSON, `reason` when the
    field is missing or holds something other than an object.
    """
    if raw is None:
        raise InvalidPayload(reason, "entry has no payload field")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidPayload(DeadLetterReason.INVALID_JSON, f"payload is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidPayload(reason, f"payload must be a JSON object, got {type(data).__name__}")
    return data
