"""What a committed batch writes to Redis: its caches, its dead letters, then its acks.

All of it is queued on one `cache.CommandBatch`, acks last, so an entry is never
acked before its effect is cached and its dead letter written. The batch is sent as
one write after the next read has gone out, and its replies are read after the next
commit (`EventConsumer.flush`, `EventConsumer.settle`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import orjson
from redis import Redis
from structlog.typing import FilteringBoundLogger

from usermgmt.domain.games import Changes, World
from usermgmt.domain.payloads import text_of
from usermgmt.domain.planner import Plan
from usermgmt.persistence import cache
from usermgmt.persistence.games import session_is_live
from usermgmt.persistence.keys import EVENTS_GROUP, Keys
from usermgmt.workers.events.batch import DeadLetter
from usermgmt.workers.runtime.streams import Entry, dead_letter_payload

# With several workers applying events side by side (no reader lease, or while entries
# change hands), a worker's session-hash write can reach Redis after another worker's
# delete of the same hash: each sends its writes after its own commit, and commits
# follow one another in milliseconds. A reader whose link stalled sends its last writes
# late, up to its socket timeout (30 s), after another worker took the lease over. An
# ended session never comes back, so its hash is deleted again this long after, in
# case such a write came. The deletes wait in Redis (`Keys.deletes_again`), not in the
# worker's memory: the worker that queued them may be killed before they are due,
# and any event worker sends the due ones.
DELETE_AGAIN_AFTER_S = (1.0, 5.0, 35.0)
LOOK_EVERY_S = 0.5  # how often a worker asks for the deletes that are due
DUE_PAGE = 1000  # due deletes taken at one look, at most


class AfterCommit:
    """Queues a committed batch's cache writes, dead letters and acks.

    `streams`: the event streams, in the order their acks are queued.
    """

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        streams: Sequence[str],
        player_hashes: cache.PlayerHashes,
        log: FilteringBoundLogger,
        delete_again: bool = False,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.streams = streams
        self.player_hashes = player_hashes
        self.log = log
        # Ended sessions' hashes are deleted again (`DELETE_AGAIN_AFTER_S`): always with
        # several writers (`delete_again`), and for a while when another worker may be
        # writing beside this one (`repeat_for`).
        self.always = delete_again
        self.until = 0.0
        self.looked = 0.0  # monotonic time of the last look for due deletes

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
                if self.always or time.monotonic() < self.until:
                    self._queue_delete(batch, 0, key)
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
        """Queue the deletes that are due, whichever worker queued them, each with its
        next one (`DELETE_AGAIN_AFTER_S`); whether any. Looks every `LOOK_EVERY_S`."""
        now = time.monotonic()
        if now - self.looked < LOOK_EVERY_S:
            return False
        self.looked = now
        queue = self.keys.deletes_again
        due = self.redis.zrangebyscore(queue, "-inf", _now_ms(), start=0, num=DUE_PAGE)
        for raw in due:
            member = text_of(raw)
            stage, _, key = member.partition(" ")
            batch.add("DEL", key)
            batch.add("ZREM", queue, member)
            if int(stage) + 1 < len(DELETE_AGAIN_AFTER_S):
                self._queue_delete(batch, int(stage) + 1, key)
        return bool(due)

    def _queue_delete(self, batch: cache.CommandBatch, stage: int, key: str) -> None:
        """Delete `key` again `DELETE_AGAIN_AFTER_S[stage]` after its first delete."""
        after_s = DELETE_AGAIN_AFTER_S[stage] - (DELETE_AGAIN_AFTER_S[stage - 1] if stage else 0)
        due_ms = _now_ms() + round(after_s * 1000)
        batch.add("ZADD", self.keys.deletes_again, due_ms, f"{stage} {key}")

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


def _now_ms() -> int:
    return round(time.time() * 1000)
