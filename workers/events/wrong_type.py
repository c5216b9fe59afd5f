"""A key of the worker's that holds another type of value (someone wrote it by hand).

Redis runs the rest of a batch's writes and refuses the ones to that key with
WRONGTYPE (`usermgmt.persistence.command_batch.WrongType`). User and session hashes are
written whole, so the command batch replaces them itself; what reaches the consumer is
a key it must not delete that way:
- `um:leaderboard` is replaced, in one transaction, by a set rebuilt from the database;
- any other key (the dead-letter stream) is never deleted: the worker waits until an
  operator moves it away, then sends what was refused again when the rest of its batch
  ran (one server, in an EXEC: the acks too), keeping refused dead letters meanwhile in
  `um:dlq:unwritten` so a worker killed while it waits loses none. On a cluster the
  acks were not sent, and the entries come back to be decided again.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import cast

from redis import Redis
from redis.exceptions import ResponseError
from sqlalchemy import Engine
from structlog.typing import FilteringBoundLogger

from usermgmt.persistence import cache
from usermgmt.persistence.command_batch import WrongType
from usermgmt.persistence.keys import Keys
from usermgmt.persistence.ranking import rebuild_leaderboard_cache
from usermgmt.workers.runtime.connections import DATABASE_ERRORS, REDIS_ERRORS

Wait = Callable[[str], None]  # waits with backoff, saying why (`EventConsumer.wait_backoff`)


class KeyRepair:
    """Mends or waits out the key a `WrongType` names; the consumer's loop goes on after."""

    def __init__(self, redis: Redis, engine: Engine, keys: Keys, stop: threading.Event) -> None:
        self.redis, self.engine, self.keys, self.stop = redis, engine, keys, stop

    def handle(self, refused: WrongType, log: FilteringBoundLogger, wait: Wait) -> None:
        """Every key the batch met holding another type: the dead letters refused are
        kept first, then the leaderboard is rebuilt, then the worker waits for the rest."""
        dlq, leaderboard = self.keys.dlq, self.keys.leaderboard
        in_memory = refused.refused.get(dlq, []) if refused.ran_the_rest else []
        if in_memory:  # `um:dlq:unwritten` keeps dead letters only
            try:
                self.redis.rpush(self.keys.dlq_unwritten, *in_memory)
                in_memory = []
            except (*REDIS_ERRORS, ResponseError) as exc:
                log.warning("refused dead letters kept in memory only", error=repr(exc))
        if leaderboard in refused.refused:
            self.rebuild_leaderboard(log, wait)
        for key in sorted(refused.refused, key=lambda key: key != dlq):  # `um:dlq` first
            if key != leaderboard:
                # Kept until written: refused dead letters, once `um:dlq` is moved. On a
                # cluster the acks did not run: the entries come back, decided again then.
                mine = in_memory if key == dlq else []
                self.write_unwritten(log, wait, key, mine, until_moved=True)

    def write_unwritten(
        self,
        log: FilteringBoundLogger,
        wait: Wait,
        key: str | None = None,
        in_memory: list[bytes] | None = None,
        until_moved: bool = False,
    ) -> None:
        """Write the dead letters `um:dlq:unwritten` keeps (and `in_memory`) once `key`
        (`um:dlq`) is a stream again, and forget them in the same transaction.

        `until_moved`: wait for the key even with no letter to write (on a cluster the
        acks did not run: the entries come back, to be decided once it is moved).
        """
        key = key or self.keys.dlq
        message = (
            f"Redis key {key} holds another type of value than the worker writes there; "
            "rename or delete it"
        )
        letters = key == self.keys.dlq  # `um:dlq:unwritten` holds that key's only
        while not self.stop.is_set():
            try:
                kept = (
                    cast(list[bytes], self.redis.lrange(self.keys.dlq_unwritten, 0, -1))
                    if letters
                    else []
                )
                if not (kept or in_memory or until_moved):
                    return
                if self.redis.type(key) in (b"none", b"stream", "none", "stream"):
                    writes = cache.CommandBatch()
                    for part in [*kept, *(in_memory or [])]:
                        writes.add_packed(part, 1, key, whole=False)
                    if kept:
                        writes.barrier()  # one server: the letters and the forgetting together
                        writes.add("DEL", self.keys.dlq_unwritten)
                    if writes.parts:
                        writes.send(self.redis).wait()
                    log.info("the key of another type is gone; writing to it again", key=key)
                    return
            except (*REDIS_ERRORS, ResponseError) as exc:
                log.warning("cannot check or write the key yet", key=key, error=repr(exc))
            wait(message)
        log.error("stopped with writes refused by a key of another type", key=key)

    def rebuild_leaderboard(self, log: FilteringBoundLogger, wait: Wait) -> None:
        key = self.keys.leaderboard
        log.error("the leaderboard key held another type of value; rebuilding it", key=key)
        try:
            pipe = self.redis.pipeline(transaction=True)
            players = rebuild_leaderboard_cache(self.engine, pipe, self.keys, replace=True)
            pipe.execute()
        except (*REDIS_ERRORS, *DATABASE_ERRORS) as exc:
            wait(f"leaderboard not rebuilt ({exc!r}); the next batch tries again")
            return
        log.info("leaderboard cache rebuilt from the database", players=players)
