"""Registration events on `um:{events}:accounts`: what a replay needs to recreate a user.

A registration is recorded with the user's id and password hash (never the password)
so a replay into an empty database gives every account back under the same id.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StrictInt, ValidationError

from usermgmt.domain.accounts import Username
from usermgmt.domain.auth import describe_validation_error
from usermgmt.domain.errors import DeadLetterReason, InvalidPayload
from usermgmt.domain.ids import new_event_id
from usermgmt.domain.payloads import load_object

ACCOUNTS = "accounts"  # the stream kind: `um:{events}:accounts`


class Registration(BaseModel):
    """One account as it was created (the username still follows the policy)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    event_id: uuid.UUID
    user_id: Annotated[StrictInt, Field(ge=1)]
    username: Username
    password_hash: Annotated[str, Field(min_length=1, max_length=72)]
    wallet: Annotated[StrictInt, Field(ge=0)]
    created_at: AwareDatetime

    def to_json(self) -> str:
        """The stream payload."""
        return self.model_dump_json()


def registration(
    user_id: int, username: str, password_hash: str, wallet: int, created_at: datetime
) -> Registration:
    """A new registration event with a fresh event id."""
    return Registration(
        event_id=new_event_id(),
        user_id=user_id,
        username=username,
        password_hash=password_hash,
        wallet=wallet,
        created_at=created_at,
    )


def parse_registration(raw: str | bytes | None) -> Registration:
    """Validate one accounts-stream payload; raises `InvalidPayload` with a reason."""
    data = load_object(raw, DeadLetterReason.INVALID_EVENT)
    try:
        return Registration.model_validate(data)
    except ValidationError as exc:
        raise InvalidPayload(
            DeadLetterReason.INVALID_EVENT, f"accounts event: {describe_validation_error(exc)}"
        ) from None
