"""SQL for recovery: recreate registered users, read checkpoints and backup marks,
fix id sequences, list live sessions for rebuilding their caches.

Game events replay through `usermgmt.persistence.games` exactly as the live worker applies them;
only registrations need their own statements (the live path creates users directly).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import Connection, DateTime, Engine, bindparam, insert, text

from usermgmt.domain.accounts import username_key
from usermgmt.domain.games import Decision, Outcome
from usermgmt.domain.registrations import Registration
from usermgmt.persistence import outbox
from usermgmt.persistence.games import roster_position
from usermgmt.persistence.models import User
from usermgmt.persistence.sql import as_utc, chunks

# -- registrations ------------------------------------------------------------------


def apply_registrations(
    conn: Connection, registrations: list[tuple[Registration, str]], now: datetime
) -> list[Decision]:
    """Create each registered user (same id, name, hash, wallet, creation time) unless
    already there; one decision per `(registration, entry id)`, in order.

    A user already present under the same id and name is a duplicate (the relay may
    publish a row twice; a restored backup already holds older users). An id or a
    name held by another account is a conflict: nothing is written for it.
    """
    by_id = _existing(conn, "id", sorted({reg.user_id for reg, _ in registrations}))
    by_key = _existing(
        conn, "username_key", sorted({username_key(reg.username) for reg, _ in registrations})
    )
    decisions: list[Decision] = []
    new: list[Registration] = []
    seen: list[tuple[str, str]] = []  # (event id, entry id) of every registration found
    for reg, entry_id in registrations:
        key = username_key(reg.username)
        owner_of_id = by_id.get(reg.user_id)
        owner_of_name = by_key.get(key)
        if owner_of_id == key:
            decisions.append(Decision(Outcome.DUPLICATE))
            seen.append((str(reg.event_id), entry_id))
        elif owner_of_id is not None or owner_of_name is not None:
            decisions.append(
                Decision(
                    Outcome.DEAD,
                    message=f"user {reg.user_id} {reg.username!r} conflicts with an existing "
                    "account (same id or same name)",
                )
            )
        else:
            decisions.append(Decision(Outcome.APPLIED))
            seen.append((str(reg.event_id), entry_id))
            new.append(reg)
            by_id[reg.user_id] = key
            by_key[key] = str(reg.user_id)
    if new:
        _insert_users(conn, new)
    outbox.mark_replayed(conn, seen, now)
    return decisions


def _existing(conn: Connection, column: str, values: list[Any]) -> dict[Any, str]:
    """Existing users keyed by `column` (id or username_key) -> the other identity."""
    found: dict[Any, str] = {}
    other = "username_key" if column == "id" else "id"
    for chunk in chunks(values):
        rows = conn.execute(
            text(f"SELECT {column}, {other} FROM users WHERE {column} IN :values").bindparams(  # noqa: S608 - fixed column names
                bindparam("values", expanding=True)
            ),
            {"values": list(chunk)},
        )
        for value, identity in rows:
            found[value] = str(identity)
    return found


def _insert_users(conn: Connection, registrations: list[Registration]) -> None:
    """Users with explicit ids, then their stats and leaderboard rows, set-based."""
    conn.execute(
        insert(User),
        [
            {
                "id": reg.user_id,
                "username": reg.username,
                "username_key": username_key(reg.username),
                "password_hash": reg.password_hash,
                "wallet": reg.wallet,
                "created_at": reg.created_at,
            }
            for reg in registrations
        ],
    )
    conn.execute(
        text(
            "INSERT INTO stats (id, user_id, win_count, loss_count, earnings) "
            "VALUES (:user_id, :user_id, 0, 0, 0)"  # the user's id, as `create_user` does
        ),
        [{"user_id": reg.user_id} for reg in sorted(registrations, key=lambda r: r.user_id)],
    )
    ids = sorted(reg.user_id for reg in registrations)
    for chunk in chunks(ids):
        # Ranks are refreshed once the replay is done.
        conn.execute(
            text(
                "INSERT INTO leaderboard (id, stats_id, rank, earnings) "
                "SELECT id, id, 1, 0 FROM stats WHERE user_id IN :ids ORDER BY id"
            ).bindparams(bindparam("ids", expanding=True)),
            {"ids": list(chunk)},
        )


def fix_sequences(conn: Connection) -> None:
    """PostgreSQL: move the id sequences past the explicit ids a replay inserted."""
    if conn.dialect.name != "postgresql":
        return  # SQLite's INTEGER PRIMARY KEY continues from the largest id by itself
    for table in ("users", "stats", "leaderboard"):
        conn.execute(
            text(
                f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "  # noqa: S608
                f"COALESCE((SELECT MAX(id) FROM {table}), 0) + 1, false)"
            )
        )


# -- checkpoints and backup marks ----------------------------------------------------------


def load_checkpoints(engine: Engine) -> dict[str, str]:
    """Per stream key, the last entry id whose effect the database holds."""
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT stream, last_entry_id FROM stream_checkpoints")).all()
    return {stream: entry_id for stream, entry_id in rows}


def write_backup_marks(conn: Connection, marks: dict[str, str], now: datetime) -> None:
    """Replace the backup marks (in a backup file, right after the snapshot)."""
    conn.execute(text("DELETE FROM backup_marks"))
    if marks:
        conn.execute(
            text(
                "INSERT INTO backup_marks (stream, replay_from, recorded_at) "
                "VALUES (:stream, :replay_from, :now)"
            ).bindparams(bindparam("now", type_=DateTime(timezone=True))),
            [{"stream": s, "replay_from": m, "now": now} for s, m in sorted(marks.items())],
        )


def load_backup_marks(engine: Engine) -> dict[str, str]:
    """The replay starting points recorded when this database was backed up (if it was)."""
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT stream, replay_from FROM backup_marks")).all()
    return {stream: replay_from for stream, replay_from in rows}


def clear_backup_marks(engine: Engine) -> None:
    """Forget the marks once a restore has used them: they describe the old snapshot."""
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM backup_marks"))


# -- caches -----------------------------------------------------------------------------


@dataclass(frozen=True)
class LiveSession:
    """What a live session's hash holds."""

    session_id: str
    status: str
    players: list[str]
    meta: str
    created_at: datetime
    updated_at: datetime


def _in_order(players: list[tuple[int, str]], order: str | None) -> list[str]:
    """Usernames of (user id, username) pairs, in `roster_order`."""
    position = roster_position(order)
    return [name for _, name in sorted(players, key=lambda player: position(player[0]))]


def live_sessions(engine: Engine) -> list[LiveSession]:
    """Every session that has not ended, with its roster's usernames in the last
    update's order (`roster_order`; by user id for rows written before it)."""
    with engine.connect() as conn:
        stamp = DateTime(timezone=True)
        sessions = conn.execute(
            text(
                "SELECT id, session_id, status, meta, created_at, updated_at, roster_order "
                "FROM game_sessions WHERE status <> 'ended' ORDER BY id"
            ).columns(created_at=stamp, updated_at=stamp)
        ).all()
        rosters: dict[int, list[tuple[int, str]]] = {}
        for session_pk, user_id, username in conn.execute(
            text(
                "SELECT sp.session_pk, u.id, u.username FROM session_players sp "
                "JOIN users u ON u.id = sp.user_id ORDER BY sp.session_pk, u.id"
            )
        ):
            rosters.setdefault(session_pk, []).append((user_id, username))
    return [
        LiveSession(
            session_id=row.session_id,
            status=row.status,
            players=_in_order(rosters.get(row.id, []), row.roster_order),
            meta=orjson.dumps(orjson.loads(row.meta)).decode(),
            created_at=as_utc(row.created_at),
            updated_at=as_utc(row.updated_at),
        )
        for row in sessions
    ]
