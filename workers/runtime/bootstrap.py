"""The composition root: settings in, connected services out."""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass

from redis import Redis
from sqlalchemy import Engine

from usermgmt.persistence.keys import Keys
from usermgmt.workers.runtime.connections import make_engine, make_redis
from usermgmt.workers.runtime.settings import Settings


@dataclass(frozen=True)
class Services:
    """What the consumers and commands share: built once per process."""

    settings: Settings
    redis: Redis
    engine: Engine
    keys: Keys

    def close(self) -> None:
        self.redis.close()
        self.engine.dispose()


def bootstrap(settings: Settings, background_checkpoints: bool = False) -> Services:
    """Build the clients (the database lazily; Redis is asked whether it is a cluster).

    `background_checkpoints`: SQLite's WAL is checkpointed by the caller's own thread
    (the worker's), never by a commit (`usermgmt.persistence.db.make_engine`).
    """
    return Services(
        settings=settings,
        redis=make_redis(settings.redis_url, settings.redis_cluster),
        engine=make_engine(
            settings.database_url,
            background_checkpoints=background_checkpoints,
            existing_only=True,  # only `migrate` makes a new SQLite file
        ),
        keys=Keys(settings.key_prefix),
    )


def default_consumer_name() -> str:
    """`<host>-<pid>-<random>`: unique per process, recognisable in `XINFO CONSUMERS`."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
