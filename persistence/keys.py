"""Every Redis key the project touches, derived from the prefix.

See docs/protocol.md, "Keys and consumer groups".

Keys are built only from validated values: a UUID, a policy-checked username, a
session id, or a hash. Nothing a request sends picks a key by itself.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from usermgmt.domain.accounts import username_key
from usermgmt.domain.events import EventKind

EVENTS_GROUP = "usermgmt-events"
AUTH_GROUP = "usermgmt-auth"


@dataclass(frozen=True)
class Keys:
    """Key names under one prefix (`um` by default)."""

    prefix: str = "um"

    def event_stream(self, kind: EventKind | str) -> str:
        """`um:{events}:<kind>`: the braces are a Cluster hash tag shared by every event stream."""
        return f"{self.prefix}:{{events}}:{kind}"

    @property
    def update_stream(self) -> str:
        return self.event_stream(EventKind.UPDATE)

    @property
    def terminate_stream(self) -> str:
        return self.event_stream(EventKind.TERMINATE)

    @property
    def accounts_stream(self) -> str:
        return self.event_stream("accounts")

    @property
    def auth_requests(self) -> str:
        return f"{self.prefix}:auth:requests"

    @property
    def dlq(self) -> str:
        return f"{self.prefix}:dlq"

    @property
    def dlq_retired(self) -> str:
        """`um:dlq:retired`: what `usermgmt dlq retry` and `purge` took out of `um:dlq`
        (which entry, for what reason), so a replay still decides those entries as the
        live worker did."""
        return f"{self.prefix}:dlq:retired"

    @property
    def dlq_unwritten(self) -> str:
        """`um:dlq:unwritten`: dead letters refused by an `um:dlq` of another type, kept
        (as the XADDs the worker sent) until they can be written, across restarts."""
        return f"{self.prefix}:dlq:unwritten"

    @property
    def events_reader(self) -> str:
        """`um:{events}:reader`: the consumer name of the worker reading new events (a
        lease, `usermgmt.workers.events.lease`); beside the streams, in their slot."""
        return f"{self.prefix}:{{events}}:reader"

    @property
    def accounts_relay(self) -> str:
        """`um:{events}:accounts-relay`: held by the outbox relay that is publishing, so
        two workers never send the same registrations."""
        return f"{self.prefix}:{{events}}:accounts-relay"

    @property
    def ranks_dirty(self) -> str:
        """`um:{events}:ranks-dirty`: set by an event worker that stands by with stats
        changed since its last rank refresh; the reading worker takes it and refreshes."""
        return f"{self.prefix}:{{events}}:ranks-dirty"

    @property
    def deletes_again(self) -> str:
        """`um:{events}:delete-again`: ended sessions' hashes to delete again (a sorted
        set: `<stage> <key>` scored by when, in ms), in case another worker's late write
        made them again; any event worker sends the due ones."""
        return f"{self.prefix}:{{events}}:delete-again"

    def events_handed(self, consumer: str) -> str:
        """`um:{events}:handed:<consumer>`: set, in one transaction with the XCLAIMs, by an
        event worker without the reader lease that handed its entries in hand to that
        consumer (the reader); taken by the reader in its next read, which then takes
        them in hand before deciding anything."""
        return f"{self.prefix}:{{events}}:handed:{consumer}"

    def events_stopped(self, consumer: str) -> str:
        """`um:events:stopped:<consumer>`: set when that event consumer stopped cleanly,
        taken when it starts again (its pending entries then count no delivery)."""
        return f"{self.prefix}:events:stopped:{consumer}"

    @property
    def leaderboard(self) -> str:
        return f"{self.prefix}:leaderboard"

    @property
    def heartbeat_prefix(self) -> str:
        return f"{self.prefix}:worker:heartbeat:"

    def heartbeat(self, consumer: str) -> str:
        return f"{self.heartbeat_prefix}{consumer}"

    def reply(self, request_id: uuid.UUID) -> str:
        """The reply list of one request; only a parsed UUID can name it."""
        if not isinstance(request_id, uuid.UUID):
            raise TypeError("reply keys are derived from a UUID only")
        return f"{self.prefix}:auth:reply:{request_id}"

    def user(self, username: str) -> str:
        return f"{self.prefix}:user:{username_key(username)}"

    def session(self, session_id: str) -> str:
        return f"{self.prefix}:session:{session_id}"

    def token(self, token_digest: str) -> str:
        return f"{self.prefix}:auth:token:{token_digest}"

    def login_failures(self, username: str) -> str:
        return f"{self.prefix}:auth:failures:{username_key(username)}"

    def login_lock(self, username: str) -> str:
        return f"{self.prefix}:auth:locked:{username_key(username)}"
