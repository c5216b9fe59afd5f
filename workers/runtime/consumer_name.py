"""One live worker per consumer name.

Two workers under one `--consumer` name would share one pending list in each group:
each takes the other's waiting entries for its own, and acks or dead-letters what
the other still holds. So a worker takes its name before it reads anything, through
its heartbeat key (`<prefix>:worker:heartbeat:<consumer>`):

- no heartbeat under the name: the name is free;
- a heartbeat left by this process, or by a process of this host that is gone: the
  worker that crashed under the name is not coming back, so it is taken over at once;
- any other heartbeat: it is watched for up to `CONFIRM_S`. A live worker beats in
  that time, and this one refuses to start (`NameTaken`); a heartbeat that stays still
  (its worker crashed on another host, or in another container) is taken over.

While it runs, each beat replaces the key with `SET … GET`: a beat that replaces
another worker's heartbeat is logged as an error, once for each such worker.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import orjson
from redis import Redis
from structlog.typing import FilteringBoundLogger

from usermgmt.workers.runtime.backoff import Backoff
from usermgmt.workers.runtime.connections import REDIS_ERRORS, redis_unreachable
from usermgmt.workers.runtime.redis_info import beat_of

HEARTBEAT_EVERY_S = 5
HEARTBEAT_TTL_S = 15
CONFIRM_S = HEARTBEAT_EVERY_S * 1.5  # a live worker beats within this
WATCH_EVERY_S = 0.25


class NameTaken(Exception):
    """A live worker already runs under this consumer name."""


def left_by_the_dead(beat: dict[str, Any]) -> bool:
    """The heartbeat was written by this process, or by one of this host that is gone."""
    pid = beat.get("pid")
    if beat.get("host") != socket.gethostname() or not isinstance(pid, int):
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, but another user's
        return False
    return False


class NameClaim:
    """Takes a consumer name at start (`take`) and keeps its heartbeat (`beat`)."""

    def __init__(
        self,
        redis: Redis,
        key: str,
        consumer: str,
        stop: threading.Event,
        log: FilteringBoundLogger,
    ) -> None:
        self.redis, self.key, self.consumer = redis, key, consumer
        self.stop, self.log = stop, log
        self.instance = os.urandom(8).hex()
        self.others_seen: set[str] = set()

    def take(self, describe: Callable[[], dict[str, Any]], redis_url: str) -> None:
        """Write the first heartbeat, waiting out a Redis that is away; `NameTaken` when a
        live worker holds the name."""
        backoff = Backoff(first=0.5)
        while not self.stop.is_set():
            try:
                self._take(describe)
            except REDIS_ERRORS as exc:
                self.stop.wait(backoff.retry(self.log, redis_unreachable(redis_url, exc)))
                continue
            backoff.recovered(self.log, "Redis")
            return

    def _take(self, describe: Callable[[], dict[str, Any]]) -> None:
        if self.redis.set(self.key, self._dump(describe()), nx=True, ex=HEARTBEAT_TTL_S):
            return
        first = beat_of(self.redis.get(self.key))
        if first and not left_by_the_dead(first):
            self._refuse_if_it_beats(first)
        if not self.stop.is_set():
            self.redis.set(self.key, self._dump(describe()), ex=HEARTBEAT_TTL_S)
            self.log.info(
                "took over the consumer name of a stopped worker",
                host=first.get("host"),
                pid=first.get("pid"),
            )

    def _refuse_if_it_beats(self, first: dict[str, Any]) -> None:
        """Watch the heartbeat for `CONFIRM_S`: `NameTaken` if it is written again."""
        self.log.info(
            "another worker's heartbeat holds the consumer name; waiting to see whether it "
            "is alive",
            seconds=CONFIRM_S,
            host=first.get("host"),
            pid=first.get("pid"),
        )
        deadline = time.monotonic() + CONFIRM_S
        while time.monotonic() < deadline and not self.stop.wait(WATCH_EVERY_S):
            now = beat_of(self.redis.get(self.key))
            if not now:
                return  # expired: its worker is gone
            if now != first:
                raise NameTaken(
                    f"another worker is running as consumer {self.consumer!r} "
                    f"(pid {now.get('pid')} on {now.get('host')}); "
                    "give this one another --consumer name"
                )

    def beat(self, info: dict[str, Any]) -> None:
        """Refresh the heartbeat; say so if it replaced another live worker's."""
        old = beat_of(self.redis.set(self.key, self._dump(info), ex=HEARTBEAT_TTL_S, get=True))
        other = old.get("instance")
        if old and other != self.instance and str(other) not in self.others_seen:
            self.others_seen.add(str(other))
            self.log.error(
                "another worker is also running as this consumer; stop one of them",
                other_host=old.get("host"),
                other_pid=old.get("pid"),
            )

    def release(self) -> None:
        """Delete the heartbeat if it is still this worker's."""
        if beat_of(self.redis.get(self.key)).get("instance") == self.instance:
            self.redis.delete(self.key)

    def _dump(self, info: dict[str, Any]) -> bytes:
        return orjson.dumps({**info, "instance": self.instance})
