"""Publishing simulated events: pipelined XADDs, paced, in an order the consumer keeps.

See `publish_traffic` for why chunks are split at dependencies and sent more than
a millisecond apart.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import orjson
from redis import Redis

from usermgmt.domain.events import EventKind
from usermgmt.persistence.keys import Keys
from usermgmt.workers.sim.matchmaker import SimEvent


@dataclass(frozen=True)
class Published:
    """How many events (and terminated games) a run published, and how long it took."""

    events: int
    games: int
    elapsed: float

    @property
    def rate(self) -> float:
        return self.events / self.elapsed if self.elapsed > 0 else 0.0


CHUNK_GAP_S = 0.0015  # > 1 ms between pipelines, so each starts in a later millisecond


def publish_traffic(
    redis: Redis,
    keys: Keys,
    events: Iterable[SimEvent],
    rate: float = 0.0,
    chunk_size: int = 500,
    on_progress: Callable[[int, int], None] | None = None,
) -> Published:
    """XADD the events in pipelined chunks, optionally paced to `rate` events per second.

    The consumer merges the two streams by entry id, and ids from two streams only
    order reliably across milliseconds (each stream counts its own sequence within
    one). So an event never shares a pipeline with the other-stream event it
    depends on (`SimEvent.after`), and each pipeline is sent more than a
    millisecond after the previous one was accepted: every id of a later pipeline
    is then greater than every id of an earlier one.
    """
    if rate > 0:
        chunk_size = max(1, min(chunk_size, int(rate / 20)))
    pipe = redis.pipeline(transaction=False)
    streams = {kind: keys.event_stream(kind) for kind in EventKind}
    started = time.perf_counter()
    last_reply = 0.0
    chunk_start = 0
    in_pipe = 0
    terminates_in_pipe = 0
    published = games = 0

    def flush() -> None:
        nonlocal last_reply, in_pipe, terminates_in_pipe, published, games
        wait = last_reply + CHUNK_GAP_S - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        pipe.execute()
        last_reply = time.perf_counter()
        published += in_pipe
        games += terminates_in_pipe
        in_pipe = terminates_in_pipe = 0
        if on_progress is not None:
            on_progress(games, published)
        if rate > 0:
            ahead = started + published / rate - time.perf_counter()
            if ahead > 0:
                time.sleep(ahead)

    for event in events:
        depends_here = event.after is not None and event.after >= chunk_start
        if in_pipe and (in_pipe >= chunk_size or depends_here):
            flush()
            chunk_start = event.index
        elif not in_pipe:
            chunk_start = event.index
        pipe.xadd(streams[event.kind], {"payload": orjson.dumps(event.payload)})
        in_pipe += 1
        terminates_in_pipe += event.kind is EventKind.TERMINATE
    if in_pipe:
        flush()
    return Published(published, games, time.perf_counter() - started)
