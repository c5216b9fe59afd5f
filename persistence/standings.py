"""Read-side queries for people: the leaderboard's top, a player's neighbourhood, one
player's record. Ranks are computed here from `leaderboard.earnings` (1 + the number
of players with strictly more: docs/protocol.md, "SQL tables"): the leaderboard as of
the worker's last rank refresh, exact whenever the worker is idle and at most
`USERMGMT_RANK_REFRESH_S` behind `stats` under continuous load. Every query walks the
`leaderboard.earnings` index, so it stays cheap with millions of players.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson
from sqlalchemy import Connection, Engine, Select, and_, func, or_, select
from sqlalchemy.orm import aliased

from usermgmt.domain.accounts import username_key
from usermgmt.domain.events import EventKind
from usermgmt.persistence.models import (
    GameSession,
    LeaderboardEntry,
    ProcessedEvent,
    SessionPlayer,
    Stats,
    User,
)


@dataclass(frozen=True)
class Standing:
    """One row of the leaderboard."""

    rank: int
    username: str
    earnings: int
    win_count: int
    loss_count: int
    wallet: int


@dataclass(frozen=True)
class LiveSession:
    """The live game session a player is in."""

    session_id: str
    status: str
    players: list[str]
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PlayerRecord:
    """Everything `usermgmt user NAME` shows."""

    id: int
    username: str
    wallet: int
    win_count: int
    loss_count: int
    earnings: int
    rank: int
    session: LiveSession | None


_Higher = aliased(LeaderboardEntry)


def _exact_rank() -> Any:
    """1 + the number of players with strictly greater earnings (correlated, indexed)."""
    higher = (
        select(func.count())
        .select_from(_Higher)
        .where(_Higher.earnings > LeaderboardEntry.earnings)
        .scalar_subquery()
    )
    return (higher + 1).label("rank")


def _standings() -> Select[Any]:
    return (
        select(
            _exact_rank(),
            User.username,
            LeaderboardEntry.earnings,
            Stats.win_count,
            Stats.loss_count,
            User.wallet,
        )
        .select_from(LeaderboardEntry)
        .join(Stats, Stats.id == LeaderboardEntry.stats_id)
        .join(User, User.id == Stats.user_id)
    )


def _rows(conn: Connection, query: Select[Any]) -> list[Standing]:
    return [Standing(*row) for row in conn.execute(query)]


def count_players(engine: Engine) -> int:
    """How many players the leaderboard holds."""
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(LeaderboardEntry)).scalar_one())


def top(engine: Engine, limit: int) -> list[Standing]:
    """The `limit` best players by earnings (ties in name order)."""
    query = _standings().order_by(LeaderboardEntry.earnings.desc(), User.username_key).limit(limit)
    with engine.connect() as conn:
        return _rows(conn, query)


def around(engine: Engine, username: str, size: int) -> list[Standing] | None:
    """About `size` rows centred on `username` in leaderboard order; None if unknown."""
    key = username_key(username)
    with engine.connect() as conn:
        me = conn.execute(
            select(LeaderboardEntry.earnings)
            .join(Stats, Stats.id == LeaderboardEntry.stats_id)
            .join(User, User.id == Stats.user_id)
            .where(User.username_key == key)
        ).first()
        if me is None:
            return None
        earnings = me.earnings
        before_me = or_(
            LeaderboardEntry.earnings > earnings,
            and_(LeaderboardEntry.earnings == earnings, User.username_key < key),
        )
        after_me = or_(
            LeaderboardEntry.earnings < earnings,
            and_(LeaderboardEntry.earnings == earnings, User.username_key > key),
        )
        others = max(size - 1, 0)
        above = _rows(
            conn,
            _standings()
            .where(before_me)
            .order_by(LeaderboardEntry.earnings.asc(), User.username_key.desc())
            .limit(others),
        )
        below = _rows(
            conn,
            _standings()
            .where(after_me)
            .order_by(LeaderboardEntry.earnings.desc(), User.username_key)
            .limit(others),
        )
        # Centre the window, giving the room one side lacks to the other.
        n_above = min(len(above), others // 2)
        n_below = min(len(below), others - n_above)
        n_above = min(len(above), others - n_below)
        mine = _rows(conn, _standings().where(User.username_key == key))
    return [*reversed(above[:n_above]), *mine, *below[:n_below]]


def player_record(engine: Engine, username: str) -> PlayerRecord | None:
    """One player's public record with an exact rank and the live session, or None."""
    key = username_key(username)
    with engine.connect() as conn:
        row = conn.execute(
            select(
                User.id,
                User.username,
                User.wallet,
                Stats.win_count,
                Stats.loss_count,
                Stats.earnings,
                _exact_rank(),
                SessionPlayer.session_pk,
            )
            .select_from(User)
            .join(Stats, Stats.user_id == User.id)
            .join(LeaderboardEntry, LeaderboardEntry.stats_id == Stats.id)
            .outerjoin(SessionPlayer, SessionPlayer.user_id == User.id)
            .where(User.username_key == key)
        ).first()
        if row is None:
            return None
        session = _live_session(conn, row.session_pk) if row.session_pk is not None else None
    return PlayerRecord(
        id=row.id,
        username=row.username,
        wallet=row.wallet,
        win_count=row.win_count,
        loss_count=row.loss_count,
        earnings=row.earnings,
        rank=row.rank,
        session=session,
    )


def _live_session(conn: Connection, session_pk: int) -> LiveSession | None:
    found = conn.execute(
        select(GameSession.session_id, GameSession.status, GameSession.meta).where(
            GameSession.id == session_pk
        )
    ).first()
    if found is None:
        return None
    players = conn.execute(
        select(User.username)
        .join(SessionPlayer, SessionPlayer.user_id == User.id)
        .where(SessionPlayer.session_pk == session_pk)
        .order_by(User.username_key)
    ).scalars()
    meta = orjson.loads(found.meta) if found.meta else {}
    return LiveSession(found.session_id, found.status, list(players), meta)


def player_totals(engine: Engine) -> dict[str, tuple[int, int, int, int]]:
    """Every player's (win_count, loss_count, earnings, wallet), by username as written."""
    with engine.connect() as conn:
        rows = conn.execute(
            select(
                User.username, Stats.win_count, Stats.loss_count, Stats.earnings, User.wallet
            ).join(Stats, Stats.user_id == User.id)
        )
        return {row.username: (row[1], row[2], row[3], row[4]) for row in rows}


def count_applied_events(engine: Engine) -> int:
    """How many update and terminate events have been applied (ids recorded with the effect)."""
    query = (
        select(func.count())
        .select_from(ProcessedEvent)
        .where(ProcessedEvent.stream.in_([str(kind) for kind in EventKind]))
    )
    with engine.connect() as conn:
        return int(conn.execute(query).scalar_one())
