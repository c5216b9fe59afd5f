"""SQLAlchemy 2.0 typed models: the source of truth (docs/protocol.md, "SQL tables")."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# SQLite only auto-increments INTEGER PRIMARY KEY; PostgreSQL gets a BIGINT identity.
Id = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class User(Base):
    """An account. `username_key` (lower case) makes usernames unique case-insensitively."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    username: Mapped[str] = mapped_column(String(32))
    username_key: Mapped[str] = mapped_column(String(32), unique=True)
    password_hash: Mapped[str] = mapped_column(String(72))
    wallet: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Stats(Base):
    """A player's game totals."""

    __tablename__ = "stats"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), unique=True)
    win_count: Mapped[int] = mapped_column(Integer, default=0)
    loss_count: Mapped[int] = mapped_column(Integer, default=0)
    earnings: Mapped[int] = mapped_column(BigInteger, default=0)


class LeaderboardEntry(Base):
    """A player's place: competition rank by earnings, exact whenever the worker is idle."""

    __tablename__ = "leaderboard"
    __table_args__ = (Index("ix_leaderboard_earnings", "earnings"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    stats_id: Mapped[int] = mapped_column(ForeignKey("stats.id"), unique=True)
    rank: Mapped[int] = mapped_column(Integer, default=1)
    earnings: Mapped[int] = mapped_column(BigInteger, default=0)


class GameSession(Base):
    """A game session; kept after it ends so late and duplicate events are recognised."""

    __tablename__ = "game_sessions"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    session_id: Mapped[str] = mapped_column(String(64), unique=True)
    status: Mapped[str] = mapped_column(String(16))  # waiting | in_progress | ended
    meta: Mapped[str] = mapped_column(Text, default="{}")
    end_reason: Mapped[str | None] = mapped_column(String(16), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # The roster's user ids in the last update's order, comma-separated (`session_players`
    # says who plays, not in which order); NULL for sessions written before 0007.
    roster_order: Mapped[str | None] = mapped_column(Text, nullable=True)


# `session_players` and `game_results` name users and sessions without foreign keys
# (migration 0005): the event worker writes them with ids it read under the batch's
# lock, and no user or session is ever deleted. On PostgreSQL every inserted row cost
# a check of each parent row (a row lock on it); the worker's SQLite connection never
# checked them.


class SessionPlayer(Base):
    """The roster of live sessions. Keyed by user: a player is in one live session at most."""

    __tablename__ = "session_players"

    user_id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=False)
    session_pk: Mapped[int] = mapped_column(Id, index=True)


class GameResult(Base):
    """One player's result in one game; unique per (session, user): no double credit."""

    __tablename__ = "game_results"
    __table_args__ = (UniqueConstraint("session_pk", "user_id"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    session_pk: Mapped[int] = mapped_column(Id)
    # No index of its own: nothing reads results by player, and users are never
    # deleted; each result would dirty a random page of it (migration 0004).
    user_id: Mapped[int] = mapped_column(Id)
    outcome: Mapped[str] = mapped_column(String(8))
    earnings: Mapped[int] = mapped_column(BigInteger)


class ProcessedEvent(Base):
    """Event ids already applied, committed with their effect: the idempotency record."""

    __tablename__ = "processed_events"

    event_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    stream: Mapped[str] = mapped_column(String(16))
    entry_id: Mapped[str] = mapped_column(String(41))
    processed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # User ids whose caches the event changed beyond the players it names (a terminate's
    # players without a result, an update's dropped players), comma-separated: a
    # redelivered duplicate refreshes them too.
    touched: Mapped[str | None] = mapped_column(Text, nullable=True)


class StreamCheckpoint(Base):
    """Per stream, the last entry id whose effect is committed: every backup's replay point."""

    __tablename__ = "stream_checkpoints"

    stream: Mapped[str] = mapped_column(String(64), primary_key=True)
    last_entry_id: Mapped[str] = mapped_column(String(41))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class WaitingEvent(Base):
    """A game event decided to wait for what it depends on; pending in Redis meanwhile.

    Any worker (or a replay) decides it again once that has been applied; `since` is
    its entry-id time, from which `USERMGMT_MAX_WAIT_S` counts.
    """

    __tablename__ = "waiting_events"

    stream: Mapped[str] = mapped_column(String(16), primary_key=True)  # update | terminate
    entry_id: Mapped[str] = mapped_column(String(41), primary_key=True)
    event_id: Mapped[str] = mapped_column(String(36))
    session_id: Mapped[str] = mapped_column(String(64))
    payload: Mapped[str] = mapped_column(Text)
    waits_for: Mapped[str] = mapped_column(Text)
    since: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class DeadEvent(Base):
    """A game event the rules dead-lettered, recorded with the decision: a redelivery
    after a crash (before the dead letter was written) is dead-lettered the same way."""

    __tablename__ = "dead_events"

    stream: Mapped[str] = mapped_column(String(16), primary_key=True)  # update | terminate
    entry_id: Mapped[str] = mapped_column(String(41), primary_key=True)
    reason: Mapped[str] = mapped_column(String(32))
    message: Mapped[str] = mapped_column(Text)


class OutboxEvent(Base):
    """An event committed with its effect, waiting for the relay to XADD it (then marked).

    Registrations go through here: the user row and its outbox row commit together,
    so a crash between the commit and the publish loses nothing.
    """

    __tablename__ = "outbox"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    event_id: Mapped[str] = mapped_column(String(36), unique=True)
    kind: Mapped[str] = mapped_column(String(16))  # the stream: um:{events}:<kind>
    payload: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    published_at: Mapped[datetime | None] = mapped_column(
        DateTime(timezone=True), nullable=True, index=True
    )
    entry_id: Mapped[str | None] = mapped_column(String(41), nullable=True)


class BackupMark(Base):
    """Written into a backup file only: per event stream, where a replay of it must start.

    Taken from the consumer group before the snapshot: entries below it were acked,
    so their effects are in the snapshot; anything pending or undelivered is not.
    """

    __tablename__ = "backup_marks"

    stream: Mapped[str] = mapped_column(String(64), primary_key=True)
    replay_from: Mapped[str] = mapped_column(String(41))
    recorded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class WorldVersion(Base):
    """One row: counts the commits that changed players or sessions (PostgreSQL).

    Triggers bump it for every statement that changes `users`, `stats`, `leaderboard`,
    `game_sessions`, `session_players` or `waiting_events` (migration 0006; inserts of
    players do not count), except in an event batch, which bumps it once itself.
    While it holds the value an event worker's last batch left, that worker's memory
    of those rows is exact (`WorldCache`). SQLite asks `PRAGMA data_version` instead,
    and leaves this row alone.
    """

    __tablename__ = "world_version"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    version: Mapped[int] = mapped_column(BigInteger, default=0)
