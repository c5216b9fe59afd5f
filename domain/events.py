"""Game event schemas: `update` from matchmaking, `terminate` from game servers.

See docs/protocol.md, "Game events".
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from enum import StrEnum
from functools import lru_cache
from typing import Annotated, Any, Generic, Literal, TypeVar, overload

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationError,
    model_validator,
)
from pydantic.dataclasses import dataclass as pydantic_dataclass
from pydantic_core import CoreSchema, core_schema

from usermgmt.domain.accounts import Username, username_key
from usermgmt.domain.auth import describe_validation_error
from usermgmt.domain.errors import DeadLetterReason, InvalidPayload
from usermgmt.domain.payloads import load_object

SESSION_ID_PATTERN = r"^[A-Za-z0-9_.:\-]{1,64}$"
MAX_PLAYERS = 100
MAX_META_FIELDS = 16
MAX_EARNINGS = 1_000_000_000

SessionId = Annotated[str, Field(pattern=SESSION_ID_PATTERN)]
CANONICAL_UUID_PATTERN = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"


class _UuidText:
    """A UUID kept as the text nearly every producer sends, its canonical lower-case
    8-4-4-4-12 form: making a `uuid.UUID` of it and printing it again cost about 0.8 us
    an event. Any other spelling of a UUID (capitals, no hyphens, braces, `urn:uuid:`)
    is read as a `uuid.UUID`; `str()` of either is the canonical text. One error, and
    the JSON Schema of a UUID, as before."""

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> CoreSchema:
        return core_schema.union_schema(
            [core_schema.str_schema(pattern=CANONICAL_UUID_PATTERN), core_schema.uuid_schema()],
            custom_error_type="uuid",
            custom_error_message="Input should be a valid UUID",
        )

    @classmethod
    def __get_pydantic_json_schema__(cls, schema: CoreSchema, handler: Any) -> dict[str, Any]:
        return {"type": "string", "format": "uuid"}


EventId = Annotated[str | uuid.UUID, _UuidText]

_T = TypeVar("_T")


class computed_once(Generic[_T]):  # noqa: N801 - used like `functools.cached_property`
    """`functools.cached_property` without Python 3.11's per-instance lock (as in 3.12).

    Each event's username keys are asked for several times on the worker's hot path.
    """

    def __init__(self, compute: Callable[[Any], _T]) -> None:
        self.compute = compute
        self.name = compute.__name__
        self.__doc__ = compute.__doc__

    @overload
    def __get__(self, instance: None, owner: type) -> computed_once[_T]: ...
    @overload
    def __get__(self, instance: object, owner: type) -> _T: ...
    def __get__(self, instance: object | None, owner: type) -> computed_once[_T] | _T:
        if instance is None:
            return self
        value = self.compute(instance)
        instance.__dict__[self.name] = value  # found before this descriptor from now on
        return value


MetaValue = StrictBool | StrictInt | float | Annotated[str, Field(max_length=256)]


class EventKind(StrEnum):
    """The event streams, by the last part of their key (`um:{events}:<kind>`)."""

    UPDATE = "update"
    TERMINATE = "terminate"


class _Event(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore", ignored_types=(computed_once,))

    event_id: EventId
    session_id: SessionId


class UpdateEvent(_Event):
    """A session's whole current roster and status."""

    players: Annotated[list[Username], Field(min_length=1, max_length=MAX_PLAYERS)]
    status: Literal["waiting", "in_progress"] = "in_progress"
    meta: Annotated[dict[str, MetaValue], Field(max_length=MAX_META_FIELDS)] = Field(
        default_factory=dict
    )

    @model_validator(mode="after")
    def _distinct_players(self) -> UpdateEvent:
        if len(set(self.player_keys)) != len(self.players):
            raise ValueError("players must be distinct (compared case-insensitively)")
        return self

    @computed_once
    def player_keys(self) -> tuple[str, ...]:
        """`username_key` of each player, in roster order (computed once)."""
        return tuple(username_key(name) for name in self.players)


# A slotted dataclass, not a model: a batch validates four of these per terminate, and
# a model's dict and fields-set cost twice the time to make and to free (measured 9.2 ->
# 7.5 us a terminate validated, 1.45 -> 0.7 us freed). Its JSON Schema is the model's.
@pydantic_dataclass(frozen=True, slots=True, config=ConfigDict(extra="ignore"))
class Result:
    """One finished player's outcome."""

    username: Username
    outcome: Literal["win", "loss"]
    earnings: Annotated[StrictInt, Field(ge=0, le=MAX_EARNINGS)]


class TerminateEvent(_Event):
    """A finished or aborted game and each finishing player's result."""

    results: Annotated[list[Result], Field(max_length=MAX_PLAYERS)] = Field(default_factory=list)
    reason: Literal["completed", "aborted"] = "completed"

    @model_validator(mode="after")
    def _one_result_per_player(self) -> TerminateEvent:
        if len(set(self.result_keys)) != len(self.results):
            raise ValueError("results must name each player at most once")
        if self.reason == "completed" and not self.results:
            raise ValueError("a completed game needs at least one result")
        return self

    @property
    def result_usernames(self) -> list[str]:
        return [result.username for result in self.results]

    @computed_once
    def result_keys(self) -> tuple[str, ...]:
        """`username_key` of each result's player, in order (computed once)."""
        return tuple(username_key(result.username) for result in self.results)


GameEvent = UpdateEvent | TerminateEvent
_MODELS: dict[EventKind, type[UpdateEvent] | type[TerminateEvent]] = {
    EventKind.UPDATE: UpdateEvent,
    EventKind.TERMINATE: TerminateEvent,
}


def parse_event(kind: EventKind, raw: str | bytes | None) -> GameEvent:
    """Validate one stream payload; raises `InvalidPayload` with the dead-letter reason."""
    data = load_object(raw, DeadLetterReason.INVALID_EVENT)
    try:
        return _MODELS[kind].model_validate(data)
    except ValidationError as exc:
        raise InvalidPayload(
            DeadLetterReason.INVALID_EVENT, f"{kind} event: {describe_validation_error(exc)}"
        ) from None


def entry_id_key(entry_id: str) -> tuple[int, int]:
    """`1700000000000-3` → (1700000000000, 3): the entries of one stream order by this."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


# Sequence numbers count per stream, so within one millisecond the ids of two streams
# do not tell which entry Redis accepted first. Ties go to accounts, then updates, then
# terminates: an update is never applied after a terminate published after it (a
# terminate that comes too early waits for its update; the reverse would be lost).
_STREAM_RANK = {"accounts": 0, EventKind.UPDATE: 1, EventKind.TERMINATE: 2}


@lru_cache(maxsize=16_384)  # asked several times per entry while a batch is sorted and planned
def entry_order(kind: str, entry_id: str) -> tuple[int, int, int]:
    """The order of entries merged across the event streams (docs/protocol.md, "Order")."""
    ms, seq = entry_id_key(entry_id)
    return ms, _STREAM_RANK.get(kind, len(_STREAM_RANK)), seq
