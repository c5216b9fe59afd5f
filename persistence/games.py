"""Game-event persistence: load a batch's `World`, write its `Changes` set-based."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import Connection, bindparam, select, text

from domain.events import entry_id_key
from domain.games import ENDED, Changes, Player, Session, World
from persistence.models import GameSession, LeaderboardEntry, SessionPlayer, Stats, User

# SQLite allows 32766 bound parameters per statement; stay well below.
_CHUNK = 900


def _chunks(values: Sequence[Any]) -> Iterable[Sequence[Any]]:
    for start in range(0, len(values), _CHUNK):
        yield values[start : start + _CHUNK]


def load_world(
    conn: Connection,
    event_ids: Iterable[str],
    username_keys: Iterable[str],
    session_ids: Iterable[str],
    lock: bool,
) -> World:
    """Read everything a batch may touch; with `lock`, rows are locked (PostgreSQL)."""
    world = World(players={}, sessions={}, live_session_of={}, processed=set())
    for chunk in _chunks(sorted(set(event_ids))):
        rows = conn.execute(
            text("SELECT event_id FROM processed_events WHERE event_id IN :ids").bindparams(
                bindparam("ids", expanding=True)
            ),
            {"ids": list(chunk)},
        )
        world.processed.update(row[0] for row in rows)

    _load_players(conn, world, User.username_key, sorted(set(username_keys)), lock)
    _load_sessions(conn, world, GameSession.session_id, sorted(set(session_ids)), lock)

    # Live sessions of the batch's players (a busy player waits), and rosters of the
    # loaded sessions (a replaced roster frees the players it drops).
    player_ids = sorted(player.id for player in world.players.values())
    session_pks = {s.pk: s for s in world.sessions.values() if s.pk is not None}
    memberships: list[tuple[int, int]] = []
    for chunk in _chunks(player_ids):
        memberships += conn.execute(
            select(SessionPlayer.user_id, SessionPlayer.session_pk).where(
                SessionPlayer.user_id.in_(chunk)
            )
        ).all()
    for chunk in _chunks(sorted(session_pks)):
        memberships += conn.execute(
            select(SessionPlayer.user_id, SessionPlayer.session_pk).where(
                SessionPlayer.session_pk.in_(chunk)
            )
        ).all()
    other_pks = sorted({pk for _, pk in memberships} - set(session_pks))
    _load_sessions(conn, world, GameSession.id, other_pks, lock)
    session_by_pk = {s.pk: s for s in world.sessions.values()}
    missing_users: set[int] = set()
    known_ids = set(player_ids)
    for user_id, pk in set(memberships):
        session = session_by_pk[pk]
        world.live_session_of[user_id] = session.session_id
        if user_id not in session.roster:
            session.roster.append(user_id)
        if user_id not in known_ids:
            missing_users.add(user_id)
    _load_players(conn, world, User.id, sorted(missing_users), lock)
    for session in world.sessions.values():
        session.roster.sort()
    return world


def _load_players(
    conn: Connection, world: World, column: Any, values: list[Any], lock: bool
) -> None:
    for chunk in _chunks(values):
        query = (
            select(
                User.id,
                User.username,
                User.username_key,
                User.wallet,
                Stats.id.label("sid"),
                Stats.win_count,
                Stats.loss_count,
                Stats.earnings,
                LeaderboardEntry.rank,
            )
            .join(Stats, Stats.user_id == User.id)
            .join(LeaderboardEntry, LeaderboardEntry.stats_id == Stats.id)
            .where(column.in_(chunk))
            .order_by(User.id)
        )
        if lock:
            query = query.with_for_update()
        for row in conn.execute(query):
            world.players[row.username_key] = Player(
                row.id,
                row.username,
                row.sid,
                row.wallet,
                row.win_count,
                row.loss_count,
                row.earnings,
                row.rank,
            )


def _load_sessions(
    conn: Connection, world: World, column: Any, values: list[Any], lock: bool
) -> None:
    for chunk in _chunks(values):
        query = (
            select(*GameSession.__table__.columns)  # type: ignore[attr-defined]
            .where(column.in_(chunk))
            .order_by(GameSession.id)
        )
        if lock:
            query = query.with_for_update()
        for row in conn.execute(query):
            world.sessions[row.session_id] = Session(
                session_id=row.session_id,
                status=row.status,
                roster=[],
                meta=orjson.loads(row.meta),
                created_at=row.created_at,
                updated_at=row.updated_at,
                pk=row.id,
                end_reason=row.end_reason,
                ended_at=row.ended_at,
            )


def write_changes(conn: Connection, world: World, changes: Changes, now: datetime) -> None:
    """Write a planned batch: sessions, rosters, stats, wallets, results, processed ids."""
    _write_sessions(conn, changes)
    _write_membership(conn, world, changes)
    _write_stats(conn, world, changes)
    if changes.results:
        conn.execute(
            text(
                "INSERT INTO game_results (session_pk, user_id, outcome, earnings) "
                "VALUES (:session_pk, :user_id, :outcome, :earnings)"
            ),
            [
                {
                    "session_pk": world.sessions[r.session_id].pk,
                    "user_id": r.user_id,
                    "outcome": r.outcome,
                    "earnings": r.earnings,
                }
                for r in changes.results
            ],
        )
    if changes.processed:
        conn.execute(
            text(
                "INSERT INTO processed_events (event_id, stream, entry_id, processed_at) "
                "VALUES (:event_id, :stream, :entry_id, :now)"
            ),
            [
                {"event_id": e, "stream": s, "entry_id": i, "now": now}
                for e, s, i in changes.processed
            ],
        )


def _write_sessions(conn: Connection, changes: Changes) -> None:
    new = [s for s in changes.sessions.values() if s.pk is None]
    if new:
        rows = conn.execute(
            GameSession.__table__.insert().returning(  # type: ignore[attr-defined]
                GameSession.id, GameSession.session_id, sort_by_parameter_order=True
            ),
            [
                {
                    "session_id": s.session_id,
                    "status": s.status,
                    "meta": _meta(s),
                    "end_reason": s.end_reason,
                    "created_at": s.created_at,
                    "updated_at": s.updated_at,
                    "ended_at": s.ended_at,
                }
                for s in new
            ],
        )
        for pk, session_id in rows:
            changes.sessions[session_id].pk = pk
    old = [s for s in changes.sessions.values() if s not in new]
    if old:
        conn.execute(
            text(
                "UPDATE game_sessions SET status = :status, meta = :meta, "
                "end_reason = :end_reason, updated_at = :updated_at, ended_at = :ended_at "
                "WHERE id = :pk"
            ),
            [
                {
                    "pk": s.pk,
                    "status": s.status,
                    "meta": _meta(s),
                    "end_reason": s.end_reason,
                    "updated_at": s.updated_at,
                    "ended_at": s.ended_at,
                }
                for s in old
            ],
        )


def _write_membership(conn: Connection, world: World, changes: Changes) -> None:
    if not changes.membership:
        return
    user_ids = sorted(changes.membership)
    for chunk in _chunks(user_ids):
        conn.execute(
            text("DELETE FROM session_players WHERE user_id IN :ids").bindparams(
                bindparam("ids", expanding=True)
            ),
            {"ids": list(chunk)},
        )
    rows = [
        {"user_id": user_id, "session_pk": world.sessions[session_id].pk}
        for user_id, session_id in changes.membership.items()
        if session_id is not None
    ]
    if rows:
        conn.execute(
            text(
                "INSERT INTO session_players (user_id, session_pk) VALUES (:user_id, :session_pk)"
            ),
            rows,
        )


def _write_stats(conn: Connection, world: World, changes: Changes) -> None:
    if not changes.stats:
        return
    stats_ids = {p.id: p.stats_id for p in world.players.values()}
    deltas = [
        {"uid": uid, "sid": stats_ids[uid], "w": d.wins, "l": d.losses, "e": d.earnings}
        for uid, d in sorted(changes.stats.items())
    ]
    conn.execute(
        text(
            "UPDATE stats SET win_count = win_count + :w, loss_count = loss_count + :l, "
            "earnings = earnings + :e WHERE id = :sid"
        ),
        deltas,
    )
    conn.execute(text("UPDATE users SET wallet = wallet + :e WHERE id = :uid"), deltas)
    conn.execute(
        text("UPDATE leaderboard SET earnings = earnings + :e WHERE stats_id = :sid"), deltas
    )


def _meta(session: Session) -> str:
    return orjson.dumps(session.meta).decode()


def session_is_live(session: Session) -> bool:
    """Whether a session's hash should exist in Redis."""
    return session.status != ENDED


def save_checkpoints(conn: Connection, checkpoints: dict[str, str], now: datetime) -> None:
    """Advance, per stream, the last entry id whose effect this transaction commits."""
    for stream, entry_id in checkpoints.items():
        current = conn.execute(
            text("SELECT last_entry_id FROM stream_checkpoints WHERE stream = :stream"),
            {"stream": stream},
        ).scalar_one_or_none()
        if current is None:
            conn.execute(
                text(
                    "INSERT INTO stream_checkpoints (stream, last_entry_id, updated_at) "
                    "VALUES (:stream, :entry_id, :now)"
                ),
                {"stream": stream, "entry_id": entry_id, "now": now},
            )
        elif entry_id_key(entry_id) > entry_id_key(current):
            conn.execute(
                text(
                    "UPDATE stream_checkpoints SET last_entry_id = :entry_id, updated_at = :now "
                    "WHERE stream = :stream"
                ),
                {"stream": stream, "entry_id": entry_id, "now": now},
            )
