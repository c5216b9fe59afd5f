"""Account repository: registration in one transaction, credential and profile lookups.

The lookups run on every auth request (a token check is one lookup and no bcrypt),
so they go through the driver's cursor (`usermgmt.persistence.sql`): SQLAlchemy Core
spent some 140-400 µs building and running one, the cursor some 35. A registration
(one per account, behind a bcrypt hash) stays on SQLAlchemy Core with the models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, func, insert, select
from sqlalchemy.exc import IntegrityError

from usermgmt.domain.accounts import username_key
from usermgmt.domain.auth import UserView
from usermgmt.persistence import outbox
from usermgmt.persistence.models import LeaderboardEntry, Stats, User, utcnow
from usermgmt.persistence.sql import Driver


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
            # The stats and leaderboard rows take the user's id: ids that do not depend
            # on which of two workers' registrations commits first, so a replay makes them
            # the same.
            stats_id = user_id
            conn.execute(
                insert(Stats).values(
                    id=stats_id, user_id=user_id, win_count=0, loss_count=0, earnings=0
                )
            )
            # A new player with no earnings ranks after everyone who has some.
            rank = (
                1
                + conn.execute(
                    select(func.count())
                    .select_from(LeaderboardEntry)
                    .where(LeaderboardEntry.earnings > 0)
                ).scalar_one()
            )
            conn.execute(
                insert(LeaderboardEntry).values(
                    id=stats_id, stats_id=stats_id, rank=rank, earnings=0
                )
            )
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
        rows = Driver(conn).rows(
            "SELECT id, username, password_hash FROM users WHERE username_key = ?",
            (username_key(username),),
        )
    return Credentials(*rows[0]) if rows else None


# Everything a public user record needs, joined once, by name or by id.
_VIEW = (
    "u.id, u.username, u.wallet, s.win_count, s.loss_count, s.earnings, l.rank, g.session_id "
    "FROM users u JOIN stats s ON s.user_id = u.id JOIN leaderboard l ON l.stats_id = s.id "
    "LEFT OUTER JOIN session_players p ON p.user_id = u.id "
    "LEFT OUTER JOIN game_sessions g ON g.id = p.session_pk"
)
_BY_NAME = f"SELECT {_VIEW} WHERE u.username_key = ?"
_BY_ID = f"SELECT {_VIEW} WHERE u.id = ?"
_LOGIN = f"SELECT u.password_hash, {_VIEW} WHERE u.username_key = ?"


def load_user(
    engine: Engine, *, username: str | None = None, user_id: int | None = None
) -> UserView | None:
    """The public record of one user by name (case-insensitive) or id, or None."""
    value: str | int | None
    if username is not None:
        query, value = _BY_NAME, username_key(username)
    else:
        query, value = _BY_ID, user_id
    with engine.connect() as conn:
        rows = Driver(conn).rows(query, (value,))
    return _to_view(rows[0]) if rows else None


def find_login(engine: Engine, username: str) -> tuple[str, UserView] | None:
    """The password hash and public record of an account, in one query, or None."""
    with engine.connect() as conn:
        rows = Driver(conn).rows(_LOGIN, (username_key(username),))
    if not rows:
        return None
    password_hash, *view = rows[0]
    return str(password_hash), _to_view(view)


def replace_password_hash(engine: Engine, user_id: int, old_hash: str, new_hash: str) -> bool:
    """Store `new_hash` where the account still holds `old_hash` (a login that checked
    `old_hash` upgrades it; a password changed meanwhile stays). Whether it was stored."""
    with engine.begin() as conn:
        db = Driver(conn)
        db.run(
            "UPDATE users SET password_hash = ? WHERE id = ? AND password_hash = ?",
            (new_hash, user_id, old_hash),
        )
        return bool(db.cursor.rowcount == 1)


def _to_view(row: Any) -> UserView:
    user_id, username, wallet, wins, losses, earnings, rank, session_id = row
    return UserView(
        id=user_id,
        username=username,
        wallet=wallet,
        win_count=wins,
        loss_count=losses,
        earnings=earnings,
        rank=rank,
        session=session_id,
    )
