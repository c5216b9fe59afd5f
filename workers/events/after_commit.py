"""What a committed batch writes to Redis: its caches, its dead letters, then its acks.

All of it is queued on one `cache.CommandBatch`, acks last, so an entry is never
acked before its effect is cached and its dead letter written. The batch is sent as
one write after the next read has gone out, and its replies are read after the next
commit (`EventConsumer.flush`, `EventConsumer.settle`).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence

import orjson
from structlog.typing import FilteringBoundLogger

from usermgmt.domain.games import Changes, World
from usermgmt.domain.planner import Plan
from usermgmt.persistence import cache
from usermgmt.persistence.games import session_is_live
from usermgmt.persistence.keys import EVENTS_GROUP, Keys
from usermgmt.workers.events.batch import DeadLetter
from usermgmt.workers.runtime.streams import Entry, dead_letter_payload

# With several workers applying events side by side (no reader lease), a worker's
# session-hash write can reach Redis after another worker's delete of the same hash:
# each sends its writes after its own commit, and commits follow one another in
# milliseconds. A reader whose link stalled sends its last writes late, up to its socket
# timeout (30 s), after another worker took the lease over. An ended session never
# comes back, so its hash is deleted again this long after, in case such a write came.
DELETE_AGAIN_AFTER_S = (1.0, 5.0, 35.0)


class AfterCommit:
    """Queues a committed batch's cache writes, dead letters and acks.

    `streams`: the event streams, in the order their acks are queued.
    """

    def __init__(
        self,
        keys: Keys,
        streams: Sequence[str],
        player_hashes: cache.PlayerHashes,
        log: FilteringBoundLogger,
        delete_again: bool = False,
    ) -> None:
        self.keys = keys
        self.streams = streams
        self.player_hashes = player_hashes
        self.log = log
        # (when, key) of ended sessions' hashes to delete again, one queue per delay
        # (`DELETE_AGAIN_AFTER_S`): always with several writers (`delete_again`), and
        # for a while after this worker took the reader lease over (`repeat_for`): the
        # writes of the worker that held it may still be on their way.
        self.again: list[deque[tuple[float, bytes]]] = [deque() for _ in DELETE_AGAIN_AFTER_S]
        self.always = delete_again
        self.until = 0.0

    def pack(self, plan: Plan, world: World) -> cache.CommandBatch:
        """A new batch of writes holding a plan's caches (`write_caches`): packed while
        its transaction commits (`EventStore.apply`), sent only once it has."""
        batch = cache.CommandBatch()
        self.write_caches(batch, world, plan.changes)
        return batch

    def write_caches(self, batch: cache.CommandBatch, world: World, changes: Changes) -> None:
        """Session hashes, players' user hashes and leaderboard scores, each key once."""
        players = world.by_id
        for session_id in changes.touched_sessions:
            session = world.sessions.get(session_id)
            if session is None:
                continue
            if session_is_live(session):
                cache.queue_session(
                    batch,
                    self.keys,
                    session_id,
                    players=[players[uid].username for uid in session.roster if uid in players],
                    status=session.status,
                    meta=orjson.dumps(session.meta).decode(),
                    created_at=session.created_at.isoformat(),
                    updated_at=session.updated_at.isoformat(),
                )
            else:
                key = self.keys.session(session_id)
                batch.add("DEL", key)
                now = time.monotonic()
                if self.always or now < self.until:
                    for queue, after_s in zip(self.again, DELETE_AGAIN_AFTER_S, strict=True):
                        queue.append((now + after_s, key.encode()))  # (packing thread: atomic)
        scores: dict[str, int] = {}
        for user_id in changes.touched_users:
            player = players.get(user_id)
            if player is None:
                continue
            live = world.live_session_of.get(player.id)
            self.player_hashes.queue(batch, player, live)
            scores[player.username] = player.earnings
        cache.queue_leaderboard_scores(batch, self.keys, scores)

    def repeat_for(self, seconds: float) -> None:
        """Delete ended sessions' hashes again (`DELETE_AGAIN_AFTER_S`) for `seconds`."""
        self.until = time.monotonic() + seconds

    def deletes_due(self, batch: cache.CommandBatch) -> bool:
        """Queue the repeated deletes that are due (`DELETE_AGAIN_AFTER_S`); whether any."""
        now, queued = time.monotonic(), False
        for queue in self.again:
            while queue and queue[0][0] <= now:
                batch.add("DEL", queue.popleft()[1])
                queued = True
        return queued

    def publish(
        self, batch: cache.CommandBatch, dead: list[DeadLetter], acks: list[Entry]
    ) -> cache.CommandBatch:
        """A committed batch's caches, then its dead letters and acks (acks last).

        On a cluster each `barrier` is a round trip, and nothing after an error reply is
        sent: a dead letter goes out once the caches are written, so a node that fails
        them costs no second dead letter when the batch's entries come back.
        """
        self.deletes_due(batch)
        if dead:
            batch.barrier()
        for entry, reason, message in dead:
            letter = dead_letter_payload(entry, reason, message)
            batch.add("XADD", self.keys.dlq, "*", "payload", letter)
            self.log.warning(
                "entry dead-lettered",
                stream=entry.stream,
                entry_id=entry.entry_id,
                reason=str(reason),
                error=message,
            )
        batch.barrier()  # on a cluster the acks' node is not the caches' one
        for stream in self.streams:
            ids = [entry.entry_id for entry in acks if entry.stream == stream]
            if ids:
                batch.add("XACK", stream, EVENTS_GROUP, *ids)
        return batch
