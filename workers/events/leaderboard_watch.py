"""`um:leaderboard` kept whole while the worker runs.

Batches only raise the scores of the players they touch, so a set deleted by hand or
evicted under `maxmemory` comes back holding just those: every other player is
missing, and the live ranks `get_user` answers count only the players present. A
registration whose `ZADD` was lost (Redis away just then) leaves one player out the
same way. The worker rebuilds the set when it starts; this checks it while it runs.
"""

from __future__ import annotations

import threading

import structlog
from redis.exceptions import RedisError, ResponseError

from usermgmt.persistence.cache import is_wrong_type
from usermgmt.persistence.ranking import count_players, rebuild_leaderboard_cache
from usermgmt.workers.runtime.bootstrap import Services
from usermgmt.workers.runtime.connections import DATABASE_ERRORS, REDIS_ERRORS

log = structlog.get_logger("usermgmt.leaderboard")

CHECK_EVERY_S = 30.0


class LeaderboardWatch:
    """Every `CHECK_EVERY_S`, compares the set's size with the players in the database
    (one `count(*)`, one `ZCARD`) and fills the set from the database when it is short.

    The fill adds with `GT`, as every writer does, so running it beside batches never
    lowers a score: a player's earnings only grow. Counting first and asking Redis
    second, a registration committed in between is in both or in the set alone. A key
    overwritten with another type of value is replaced whole (no batch could write to
    it meanwhile), as a batch meeting it would (`KeyRepair`).
    """

    def __init__(self, services: Services, stop: threading.Event) -> None:
        self.services = services
        self.stop = stop

    def run(self) -> None:
        while not self.stop.wait(CHECK_EVERY_S):
            try:
                self.check_once()
            except (RedisError, *REDIS_ERRORS, *DATABASE_ERRORS) as exc:
                log.debug("leaderboard check failed; trying again later", error=repr(exc))

    def check_once(self) -> int:
        """Fill the set if it lacks players; returns how many it held before (or -1)."""
        engine, redis, keys = self.services.engine, self.services.redis, self.services.keys
        players = count_players(engine)
        spoilt = False  # overwritten with another type of value: replaced whole
        try:
            held = int(redis.zcard(keys.leaderboard))
        except ResponseError as exc:
            if not is_wrong_type(exc):
                raise
            held, spoilt = 0, True
        if held >= players and not spoilt:
            return -1
        pipe = redis.pipeline(transaction=True)
        rebuild_leaderboard_cache(engine, pipe, keys, replace=spoilt)
        pipe.execute()
        log.warning(
            "the leaderboard cache lacked players (deleted or evicted?); filled it from "
            "the database",
            held=held,
            players=players,
            key=keys.leaderboard,
        )
        return held
