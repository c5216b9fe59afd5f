"""Account repository: registration in one transaction, credential and profile lookups."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, bindparam, func, insert, select
from sqlalchemy.exc import IntegrityError

from usermgmt.domain.accounts import username_key
from usermgmt.domain.auth import UserView
from usermgmt.persistence import outbox
from usermgmt.persistence.models import (
    GameSession,
    LeaderboardEntry,
    SessionPlayer,
    Stats,
    User,
    utcnow,
)


class UsernameTaken(Exception):
    """The username (compared case-insensitively) already belongs to an account."""


@dataclass(frozen=True)
class Credentials:
    """What login needs from the database."""

    user_id: int
    username: str
    password_hash: str


def create_user(engine: Engine, username: str, password_hash: str, wallet: int) -> UserView:
    """Create the users, stats and leaderboard rows and the outbox row, in one transaction.

    Uniqueness is the database's unique index on the lower-cased name, so two workers
    racing for one name cannot both win. The outbox row is the registration event the
    relay publishes on the accounts stream (for replay): it commits with the user or
    not at all.
    """
    created_at = utcnow()
    try:
        with engine.begin() as conn:
            user_id = conn.execute(
                insert(User)
                .values(
                    username=username,
                    username_key=username_key(username),
                    password_hash=password_hash,
                    wallet=wallet,
                    created_at=created_at,
                )
                .returning(User.id)
            ).scalar_one()
            stats_id = conn.execute(
                insert(Stats)
                .values(user_id=user_id, win_count=0, loss_count=0, earnings=0)
                .returning(Stats.id)
            ).scalar_one()
            # A new player with no earnings ranks after everyone who has some.
            rank = (
                1
                + conn.execute(
                    select(func.count())
                    .select_from(LeaderboardEntry)
                    .where(LeaderboardEntry.earnings > 0)
                ).scalar_one()
            )
            conn.execute(insert(LeaderboardEntry).values(stats_id=stats_id, rank=rank, earnings=0))
            outbox.add_registration(
                conn,
                user_id=user_id,
                username=username,
                password_hash=password_hash,
                wallet=wallet,
                created_at=created_at,
            )
    except IntegrityError:
        raise UsernameTaken(username) from None
    return UserView(
        id=user_id,
        username=username,
        wallet=wallet,
        win_count=0,
        loss_count=0,
        earnings=0,
        rank=rank,
    )


def find_credentials(engine: Engine, username: str) -> Credentials | None:
    """The id, name as written and password hash of an account, or None."""
    with engine.connect() as conn:
        row = conn.execute(
            select(User.id, User.username, User.password_hash).where(
                User.username_key == username_key(username)
            )
        ).first()
    return Credentials(row.id, row.username, row.password_hash) if row else None


# Everything a public user record needs, joined once; callers add the WHERE clause.
_VIEW_QUERY = (
    select(
        User.id,
        User.username,
        User.wallet,
        Stats.win_count,
        Stats.loss_count,
        Stats.earnings,
        LeaderboardEntry.rank,
        GameSession.session_id,
    )
    .join(Stats, Stats.user_id == User.id)
    .join(LeaderboardEntry, LeaderboardEntry.stats_id == Stats.id)
    .outerjoin(SessionPlayer, SessionPlayer.user_id == User.id)
    .outerjoin(GameSession, GameSession.id == SessionPlayer.session_pk)
)


def load_user(
    engine: Engine, *, username: str | None = None, user_id: int | None = None
) -> UserView | None:
    """The public record of one user by name (case-insensitive) or id, or None."""
    query = _VIEW_QUERY
    if username is not None:
        query = query.where(User.username_key == username_key(username))
    else:
        query = query.where(User.id == user_id)
    with engine.connect() as conn:
        row = conn.execute(query).first()
    return _to_view(row) if row else None


def find_login(engine: Engine, username: str) -> tuple[str, UserView] | None:
    """The password hash and public record of an account, in one query, or None."""
    with engine.connect() as conn:
        row = conn.execute(_LOGIN_QUERY, {"key": username_key(username)}).first()
    return (row.password_hash, _to_view(row)) if row else None


# Built once: a login is frequent, and building the statement cost more than running it.
_LOGIN_QUERY = _VIEW_QUERY.add_columns(User.password_hash).where(
    User.username_key == bindparam("key")
)


def _to_view(row: Any) -> UserView:
    return UserView(
        id=row.id,
        username=row.username,
        wallet=row.wallet,
        win_count=row.win_count,
        loss_count=row.loss_count,
        earnings=row.earnings,
        rank=row.rank,
        session=row.session_id,
    )
