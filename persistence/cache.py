"""Redis caches: user hashes (TTL), live session hashes and the leaderboard sorted set.

Every write is queued on a `CommandBatch`, packed as it is queued: `PlayerHashes` /
`queue_user` for user hashes, `queue_session`, `queue_leaderboard_scores`. Reads use
redis-py (`read_user`, `live_rank`). `CommandBatch` and the `InFlight` replies it
gives are `usermgmt.persistence.command_batch`'s, named here for the callers.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

import orjson
from redis import Redis
from redis.client import Pipeline
from redis.exceptions import ResponseError

from usermgmt.domain.auth import UserView
from usermgmt.domain.games import BIGINT_MAX
from usermgmt.domain.payloads import text_of
from usermgmt.persistence.command_batch import ClusterInFlight, CommandBatch, InFlight
from usermgmt.persistence.keys import Keys

_USER_FIELDS = ("id", "username", "wallet", "win_count", "loss_count", "earnings", "rank")
_INT_FIELDS = frozenset({"id", "wallet", "win_count", "loss_count", "earnings", "rank"})


def read_user(client: Redis, keys: Keys, username: str) -> UserView | None:
    """A cached user, or None on a miss: also a partial hash left by an expiry race, and
    a key spoilt by hand (another type of value, a field that is not a number or one
    no BIGINT holds), which the next write replaces."""
    try:
        raw = client.hgetall(keys.user(username))
    except ResponseError as exc:
        if not str(exc).startswith("WRONGTYPE"):
            raise
        return None
    if not raw or not set(_USER_FIELDS) <= {text_of(key) for key in raw}:
        return None
    values: dict[str, Any] = {}
    try:
        for key, value in raw.items():
            name, text = text_of(key), text_of(value)
            values[name] = int(text) if name in _INT_FIELDS else text
            if name in _INT_FIELDS and not -BIGINT_MAX - 1 <= values[name] <= BIGINT_MAX:
                return None  # no column holds it: written by hand
        return UserView.model_validate(values)
    except ValueError:  # pydantic's ValidationError is one too
        return None


def live_rank(client: Redis, keys: Keys, username: str) -> int | None:
    """Competition rank from the sorted set, or None when the member is not there (or
    the key holds another type of value: the worker rebuilds it)."""
    try:
        score = client.zscore(keys.leaderboard, username)
        if score is None:
            return None
        higher = client.zcount(keys.leaderboard, f"({score}", "+inf")
    except ResponseError as exc:
        if not is_wrong_type(exc):
            raise
        return None
    return int(higher) + 1


def is_wrong_type(reply: object) -> bool:
    """Whether a reply is Redis's WRONGTYPE error (a key of another type of value)."""
    return isinstance(reply, ResponseError) and str(reply).startswith("WRONGTYPE")


def queue_live_rank(pipe: Pipeline, keys: Keys, username: str, earnings: int) -> None:
    """`live_rank` in the same round trip as other commands, guessing the score.

    The member's score is the player's earnings as the database has them (the
    worker keeps the two equal); `live_rank_reply` checks the guess.
    """
    pipe.zscore(keys.leaderboard, username)
    pipe.zcount(keys.leaderboard, f"({earnings}", "+inf")


def live_rank_reply(
    client: Redis, keys: Keys, username: str, earnings: int, replies: list[Any]
) -> int | None:
    """The rank from the two replies `queue_live_rank` queued (last in `replies`).

    When the sorted set holds another score than the database (a batch committed in
    between), the rank is asked again with that score.
    """
    score, higher = replies[-2:]
    if score is None or is_wrong_type(score):
        return None
    if score != earnings:
        return live_rank(client, keys, username)
    return int(higher) + 1


# -- writes: commands packed on a batch ------------------------------------------------


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%b\r\n" % (len(value), value)


# The fields a player's numbers fill, each value left as `$<length>\r\n<value>`.
_NUMBERS = b"".join(_bulk(name.encode()) + b"$%d\r\n%b\r\n" for name in _USER_FIELDS[2:])
_HSET_ARGS = 2 + 2 * len(_USER_FIELDS)  # HSET, key, then name and value per field
_HEAD = b"$4\r\nHSET\r\n$%d\r\n%b\r\n$2\r\nid\r\n$%d\r\n%b\r\n$8\r\nusername\r\n$%d\r\n%b\r\n"
_EXPIRE = b"*3\r\n$6\r\nEXPIRE\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n"
_HDEL_SESSION = b"*3\r\n$4\r\nHDEL\r\n$%d\r\n%b\r\n$7\r\nsession\r\n"


class CachedUser(Protocol):
    """What a user hash holds: a batch's `Player` or a reply's `UserView`."""

    @property
    def id(self) -> int: ...
    @property
    def username(self) -> str: ...
    @property
    def wallet(self) -> int: ...
    @property
    def win_count(self) -> int: ...
    @property
    def loss_count(self) -> int: ...
    @property
    def earnings(self) -> int: ...
    @property
    def rank(self) -> int: ...


class PlayerHashes:
    """User hashes packed as RESP: most of the event worker's cache writes.

    A user hash is written as HSET of every public field (and `session` when the
    player is in a live one), HDEL of `session` otherwise, and EXPIRE of the TTL.
    What never changes for a player (key, id, name, the HDEL and EXPIRE commands) is
    packed once and kept, up to `limit` players; each write then formats only the
    five numbers.
    """

    # About 750 bytes a player: 50k players hold 37 MB (200k held 150 MB, the most of
    # the worker's memory at big populations, for no measured speed).
    def __init__(self, keys: Keys, ttl: int, limit: int = 50_000) -> None:
        self.keys, self.limit = keys, limit
        self.ttl_text = b"%d" % ttl
        self.fixed: dict[int, tuple[str, bytes, bytes, bytes, bytes, bytes]] = {}

    def _fixed(self, player: CachedUser) -> tuple[str, bytes, bytes, bytes, bytes, bytes]:
        fixed = self.fixed.get(player.id)
        if fixed is None or fixed[0] != player.username:
            if len(self.fixed) >= self.limit:
                self.fixed.clear()
            fixed = self.fixed[player.id] = self._pack_fixed(player)
        return fixed

    def _pack_fixed(self, player: CachedUser) -> tuple[str, bytes, bytes, bytes, bytes, bytes]:
        """A player's first write: one format per part (players met once are common)."""
        key = self.keys.user(player.username).encode()
        name = player.username.encode()
        uid = b"%d" % player.id
        head = _HEAD % (len(key), key, len(uid), uid, len(name), name)
        expire = _EXPIRE % (len(key), key, len(self.ttl_text), self.ttl_text)
        return (
            player.username,
            key,
            b"*%d\r\n" % _HSET_ARGS + head,
            b"*%d\r\n" % (_HSET_ARGS + 2) + head,
            _HDEL_SESSION % (len(key), key) + expire,
            expire,
        )

    def queue(self, batch: CommandBatch, player: CachedUser, session: str | None) -> None:
        """Queue the writes of one player's hash: 3 commands, or 2 in a live session."""
        _, key, head, head_live, free_tail, live_tail = self._fixed(player)
        wallet, wins, losses, earnings, rank = (
            b"%d" % player.wallet,
            b"%d" % player.win_count,
            b"%d" % player.loss_count,
            b"%d" % player.earnings,
            b"%d" % player.rank,
        )
        numbers = _NUMBERS % (
            len(wallet), wallet, len(wins), wins, len(losses), losses,
            len(earnings), earnings, len(rank), rank,
        )  # fmt: skip
        if session is None:
            batch.add_packed(head + numbers + free_tail, 3, key, whole=True)
        else:
            live = session.encode()
            batch.add_packed(
                head_live + numbers + b"$7\r\nsession\r\n" + _bulk(live) + live_tail,
                2,
                key,
                whole=True,
            )


def queue_user(batch: CommandBatch, keys: Keys, user: UserView, ttl: int) -> None:
    """Replace a cached user hash (with `user.session`, or without the field) and set its TTL."""
    PlayerHashes(keys, ttl, limit=1).queue(batch, user, user.session)


def queue_user_whole(pipe: Pipeline, keys: Keys, user: UserView, ttl: int) -> None:
    """Replace a cached user hash on a redis-py pipeline, whatever the key held (DEL,
    HSET, EXPIRE): `queue_user`'s writes, for a transaction."""
    key = keys.user(user.username)
    items: list[str | int] = []
    for name in _USER_FIELDS:
        items += (name, getattr(user, name))
    if user.session is not None:
        items += ("session", user.session)
    pipe.delete(key)
    pipe.hset(key, items=items)
    pipe.expire(key, ttl)


def queue_session(
    batch: CommandBatch,
    keys: Keys,
    session_id: str,
    *,
    players: Iterable[str],
    status: str,
    meta: str,
    created_at: str,
    updated_at: str,
) -> None:
    """Write a live session hash: players (JSON list), status, meta (JSON), timestamps.

    One HSET and no DEL first: a session hash only ever holds these six fields, and
    each write sets them all.
    """
    batch.add(
        "HSET",
        keys.session(session_id),
        "session_id",
        session_id,
        "players",
        orjson.dumps(list(players)),
        "status",
        status,
        "meta",
        meta,
        "created_at",
        created_at,
        "updated_at",
        updated_at,
        whole=True,
    )


def queue_leaderboard_scores(batch: CommandBatch, keys: Keys, scores: dict[str, int]) -> None:
    """Raise members' scores; `GT` keeps a late writer from lowering a newer score."""
    if scores:
        args: list[str | int] = ["ZADD", keys.leaderboard, "GT"]
        for member, score in scores.items():
            args += (score, member)
        batch.add(*args)


__all__ = [
    "CachedUser",
    "ClusterInFlight",
    "CommandBatch",
    "InFlight",
    "PlayerHashes",
    "live_rank",
    "live_rank_reply",
    "queue_leaderboard_scores",
    "queue_live_rank",
    "queue_session",
    "queue_user",
    "queue_user_whole",
    "read_user",
]
