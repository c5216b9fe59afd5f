"""Scenario 1, the transport floor: read and ack a backlog with no work at all.

One XREADGROUP of COUNT 500 over both event streams, then one XACK per stream (both
in one round trip), until the backlog is drained: what reading costs, with redis-py
and hiredis, before anything is validated, applied or cached.
"""

from __future__ import annotations

import time

from redis import Redis

from usermgmt.persistence.keys import EVENTS_GROUP, Keys

FLOOR_COUNT = 500


def drain_floor(redis: Redis, keys: Keys, total: int, count: int = FLOOR_COUNT) -> float:
    """Read and ack `total` entries; returns the seconds it took."""
    streams = [keys.update_stream, keys.terminate_stream]
    for stream in streams:
        redis.xgroup_create(stream, EVENTS_GROUP, id="0", mkstream=True)
    wanted = dict.fromkeys(streams, ">")
    done = 0
    started = time.perf_counter()
    while done < total:
        response = redis.xreadgroup(EVENTS_GROUP, "floor", wanted, count=count)  # type: ignore[arg-type]
        if not response:
            break
        pipe = redis.pipeline(transaction=False)
        for stream, messages in response:
            ids = [entry_id for entry_id, _ in messages]
            pipe.xack(stream, EVENTS_GROUP, *ids)
            done += len(ids)
        pipe.execute()
    elapsed = time.perf_counter() - started
    if done != total:
        raise RuntimeError(f"transport floor read {done} entries, {total} were published")
    return elapsed
