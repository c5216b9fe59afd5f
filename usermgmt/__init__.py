"""usermgmt: user management for online games, Redis Streams consumers over SQL.

The client library for game services is importable from here:

    from redis import Redis
    from usermgmt import AuthClient, AuthError, Publisher

    publisher = Publisher(Redis.from_url("redis://localhost:6379/0"))
    client = AuthClient(Redis.from_url("redis://localhost:6379/0"), timeout=10)

These names load on first use, from `usermgmt.workers.client`, which depends only on
`usermgmt.domain` and the key layout: importing them never loads SQLAlchemy, Alembic,
bcrypt or a database driver. The worker itself lives in the subpackages: `domain`
(pure rules), `persistence` (SQL and the Redis caches), `workers` (consumers, server,
command line) and `migrations`.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from usermgmt.workers.client.auth import AuthClient as AuthClient
    from usermgmt.workers.client.auth import AuthError as AuthError
    from usermgmt.workers.client.auth import AuthTimeout as AuthTimeout
    from usermgmt.workers.client.publisher import Batch as Batch
    from usermgmt.workers.client.publisher import InvalidEvent as InvalidEvent
    from usermgmt.workers.client.publisher import Publisher as Publisher
    from usermgmt.workers.client.publisher import PublishFailed as PublishFailed

_CLIENT = {
    "AuthClient": "usermgmt.workers.client.auth",
    "AuthError": "usermgmt.workers.client.auth",
    "AuthTimeout": "usermgmt.workers.client.auth",
    "Batch": "usermgmt.workers.client.publisher",
    "InvalidEvent": "usermgmt.workers.client.publisher",
    "Publisher": "usermgmt.workers.client.publisher",
    "PublishFailed": "usermgmt.workers.client.publisher",
}

__all__ = [
    "AuthClient",
    "AuthError",
    "AuthTimeout",
    "Batch",
    "InvalidEvent",
    "PublishFailed",
    "Publisher",
]


def __getattr__(name: str) -> Any:
    """Import a client name on first use (PEP 562)."""
    module = _CLIENT.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
