"""Error codes for auth replies and reason codes for dead letters.

See docs/protocol.md, "Replies" and "Dead letters".
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    """The `error.code` of a failed auth reply."""

    INVALID_REQUEST = "invalid_request"
    USERNAME_TAKEN = "username_taken"
    INVALID_CREDENTIALS = "invalid_credentials"
    LOCKED = "locked"
    NOT_FOUND = "not_found"
    INVALID_TOKEN = "invalid_token"  # noqa: S105 - an error code, not a secret
    INTERNAL = "internal"


class DeadLetterReason(StrEnum):
    """Why an entry was moved to the dead-letter stream."""

    INVALID_JSON = "invalid_json"
    INVALID_EVENT = "invalid_event"
    INVALID_REQUEST = "invalid_request"
    UNKNOWN_USER = "unknown_user"
    NOT_IN_ROSTER = "not_in_roster"
    SESSION_ENDED = "session_ended"
    WAIT_TIMEOUT = "wait_timeout"
    MAX_DELIVERIES = "max_deliveries"


class InvalidPayload(ValueError):
    """A stream payload that can never be applied: carries the dead-letter reason."""

    def __init__(self, reason: DeadLetterReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
