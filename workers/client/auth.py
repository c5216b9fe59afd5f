"""A small client for game services: account calls over the request/reply stream.

from redis import Redis
from usermgmt import AuthClient, AuthError

client = AuthClient(Redis.from_url("redis://localhost:6379/0"))
client.register("alice", "s3cret-pass")
user, token = client.login("alice", "s3cret-pass")
"""

from __future__ import annotations

import uuid
from typing import Any

import orjson
from redis import Redis
from redis.exceptions import TimeoutError as RedisTimeoutError

from usermgmt.persistence.keys import Keys


class AuthError(Exception):
    """The worker answered `ok: false`; `code` is an error code (docs/protocol.md, "Replies")."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class AuthTimeout(AuthError):
    """No reply within the timeout (no worker running, or it is overloaded)."""

    def __init__(self, request_id: str, timeout: float) -> None:
        super().__init__("timeout", f"no reply to request {request_id} within {timeout:g} s")


class AuthClient:
    """Publishes one request per call and waits for its reply with BLPOP."""

    def __init__(self, redis: Redis, prefix: str = "um", timeout: float = 10.0) -> None:
        self.redis = redis
        self.keys = Keys(prefix)
        self.timeout = timeout

    def call(self, op: str, timeout: float | None = None, **fields: Any) -> dict[str, Any]:
        """Send `op` with `fields`; return the reply, or raise `AuthError`."""
        request_id = uuid.uuid4()
        payload = orjson.dumps({"request_id": str(request_id), "op": op, **fields})
        self.redis.xadd(self.keys.auth_requests, {"payload": payload})
        wait = self.timeout if timeout is None else timeout
        try:
            popped = self.redis.blpop([self.keys.reply(request_id)], timeout=wait)
        except RedisTimeoutError:
            popped = None
        if popped is None:
            raise AuthTimeout(str(request_id), wait)
        reply: dict[str, Any] = orjson.loads(popped[1])
        if not reply.get("ok"):
            error = reply.get("error") or {}
            raise AuthError(error.get("code", "internal"), error.get("message", ""))
        return reply

    def register(self, username: str, password: str) -> dict[str, Any]:
        """Create an account; returns the public user record."""
        user: dict[str, Any] = self.call("register", username=username, password=password)["user"]
        return user

    def login(self, username: str, password: str) -> tuple[dict[str, Any], str]:
        """Check a password; returns the user record and a 24-hour token."""
        reply = self.call("login", username=username, password=password)
        return reply["user"], reply["token"]

    def get_user(self, username: str) -> dict[str, Any]:
        """The public record of a user (with the current rank)."""
        user: dict[str, Any] = self.call("get_user", username=username)["user"]
        return user

    def verify_token(self, token: str) -> dict[str, Any]:
        """The user a login token belongs to; raises `AuthError("invalid_token")` otherwise."""
        user: dict[str, Any] = self.call("verify_token", token=token)["user"]
        return user
