"""Scenario 2, the straightforward baseline: the first implementation one would write.

One entry per read, ORM objects, one commit and one ack per event, with the same
effects as the worker (stats, wallets, leaderboard rows, results, sessions, rosters,
processed ids, checkpoints; then the session hash, the user hashes and the
leaderboard set) and the same validation (the domain's pydantic schemas). Nothing is
made slow on purpose: no re-rank per event (ranks are refreshed once, when idle),
SQLite in WAL mode with `synchronous=NORMAL` like the worker's engine, stock redis-py
pipeline for the caches and the ack.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

import orjson
from redis import Redis
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from usermgmt.domain.events import EventKind, TerminateEvent, UpdateEvent, parse_event
from usermgmt.persistence.db import make_engine
from usermgmt.persistence.keys import EVENTS_GROUP, Keys
from usermgmt.persistence.models import (
    GameResult,
    GameSession,
    LeaderboardEntry,
    ProcessedEvent,
    SessionPlayer,
    Stats,
    StreamCheckpoint,
    User,
)
from usermgmt.persistence.ranking import refresh_ranks_now


class Baseline:
    """Applies one entry at a time, in entry-id order across both streams."""

    def __init__(self, redis: Redis, keys: Keys, database_url: str, ttl: int = 300) -> None:
        self.redis = redis
        self.keys = keys
        self.engine = make_engine(database_url)
        self.ttl = ttl
        self.streams = {
            keys.update_stream: EventKind.UPDATE,
            keys.terminate_stream: EventKind.TERMINATE,
        }
        self.held: dict[str, tuple[str, bytes] | None] = dict.fromkeys(self.streams)

    def run(self, total: int) -> float:
        """Apply `total` entries; returns the seconds it took (ranks refreshed after)."""
        for stream in self.streams:
            self.redis.xgroup_create(stream, EVENTS_GROUP, id="0", mkstream=True)
        done = 0
        started = time.perf_counter()
        while done < total:
            entry = self.next_entry()
            if entry is None:
                raise RuntimeError(f"baseline ran dry after {done} of {total} entries")
            stream, entry_id, payload = entry
            self.apply(stream, entry_id, payload)
            done += 1
        elapsed = time.perf_counter() - started
        refresh_ranks_now(self.engine)
        self.engine.dispose()
        return elapsed

    def next_entry(self) -> tuple[str, str, bytes] | None:
        """Read one entry from each stream that has none held; hand out the older one."""
        wanted = {stream: ">" for stream, held in self.held.items() if held is None}
        if wanted:
            response = self.redis.xreadgroup(EVENTS_GROUP, "baseline", wanted, count=1)  # type: ignore[arg-type]
            for stream, messages in response or []:
                for entry_id, fields in messages:
                    self.held[stream.decode()] = (entry_id.decode(), fields[b"payload"])
        ready = [(_key(held[0]), stream) for stream, held in self.held.items() if held is not None]
        if not ready:
            return None
        _, stream = min(ready)
        held = self.held[stream]
        assert held is not None
        self.held[stream] = None
        return stream, held[0], held[1]

    def apply(self, stream: str, entry_id: str, payload: bytes) -> None:
        event = parse_event(self.streams[stream], payload)
        now = datetime.now(UTC)
        self.loaded: dict[int, tuple[Stats, LeaderboardEntry]] = {}
        with Session(self.engine) as db, db.begin():
            if db.get(ProcessedEvent, str(event.event_id)) is None:
                if isinstance(event, UpdateEvent):
                    touched = self.update(db, event, now)
                else:
                    touched = self.terminate(db, event, now)
                db.add(
                    ProcessedEvent(
                        event_id=str(event.event_id),
                        stream=str(self.streams[stream]),
                        entry_id=entry_id,
                        processed_at=now,
                    )
                )
                checkpoint = db.get(StreamCheckpoint, stream)
                if checkpoint is None:
                    db.add(StreamCheckpoint(stream=stream, last_entry_id=entry_id, updated_at=now))
                else:
                    checkpoint.last_entry_id = entry_id
                    checkpoint.updated_at = now
            else:
                touched = []
            db.flush()
            views = [self.view(db, user) for user in touched]
            session = db.scalars(
                select(GameSession).where(GameSession.session_id == event.session_id)
            ).one()
            session_fields = {
                "session_id": session.session_id,
                "players": orjson.dumps([f["username"] for f, live in views if live]),
                "status": session.status,
                "meta": session.meta,
                "created_at": session.created_at.isoformat(),
                "updated_at": session.updated_at.isoformat(),
            }
            ended = session.status == "ended"
        pipe = self.redis.pipeline(transaction=False)
        session_key = self.keys.session(event.session_id)
        pipe.delete(session_key)
        if not ended:
            pipe.hset(session_key, mapping=session_fields)  # type: ignore[arg-type]
        for fields, live in views:
            name = str(fields["username"])
            key = self.keys.user(name)
            pipe.hset(key, mapping=fields)  # type: ignore[arg-type]
            if live is None:
                pipe.hdel(key, "session")
            else:
                pipe.hset(key, "session", live)
            pipe.expire(key, self.ttl)
            pipe.zadd(self.keys.leaderboard, {name: int(str(fields["earnings"]))}, gt=True)
        pipe.xack(stream, EVENTS_GROUP, entry_id)
        pipe.execute()

    def view(self, db: Session, user: User) -> tuple[dict[str, object], str | None]:
        """A touched user's public record (ORM) and live session, for its cache hash."""
        if user.id in self.loaded:  # already in hand from the terminate
            stats, board = self.loaded[user.id]
        else:
            stats = db.scalars(select(Stats).where(Stats.user_id == user.id)).one()
            board = db.scalars(
                select(LeaderboardEntry).where(LeaderboardEntry.stats_id == stats.id)
            ).one()
        member = db.get(SessionPlayer, user.id)
        live = None
        if member is not None:
            live = db.get(GameSession, member.session_pk).session_id  # type: ignore[union-attr]
        fields: dict[str, object] = {
            "id": user.id,
            "username": user.username,
            "wallet": user.wallet,
            "win_count": stats.win_count,
            "loss_count": stats.loss_count,
            "earnings": stats.earnings,
            "rank": board.rank,
        }
        return fields, live

    def users(self, db: Session, names: list[str]) -> list[User]:
        users = []
        for name in names:
            user = db.scalars(select(User).where(User.username_key == name.lower())).first()
            if user is None:
                raise RuntimeError(f"baseline: unknown player {name}")
            users.append(user)
        return users

    def update(self, db: Session, event: UpdateEvent, now: datetime) -> list[User]:
        users = self.users(db, list(event.players))
        session = db.scalars(
            select(GameSession).where(GameSession.session_id == event.session_id)
        ).first()
        if session is None:
            session = GameSession(
                session_id=event.session_id,
                status=event.status,
                meta=orjson.dumps(dict(event.meta)).decode(),
                created_at=now,
                updated_at=now,
            )
            db.add(session)
            db.flush()
        for user in users:
            member = db.get(SessionPlayer, user.id)
            if member is not None and member.session_pk != session.id:
                raise RuntimeError(f"baseline: {user.username} is in another live session")
        db.execute(delete(SessionPlayer).where(SessionPlayer.session_pk == session.id))
        for user in users:
            db.add(SessionPlayer(user_id=user.id, session_pk=session.id))
        session.status = event.status
        session.meta = orjson.dumps(dict(event.meta)).decode()
        session.updated_at = now
        return users

    def terminate(self, db: Session, event: TerminateEvent, now: datetime) -> list[User]:
        session = db.scalars(
            select(GameSession).where(GameSession.session_id == event.session_id)
        ).one()
        roster = {
            m.user_id
            for m in db.scalars(select(SessionPlayer).where(SessionPlayer.session_pk == session.id))
        }
        users = self.users(db, [result.username for result in event.results])
        for user, result in zip(users, event.results, strict=True):
            if user.id not in roster:
                raise RuntimeError(f"baseline: {user.username} not in the roster")
            stats = db.scalars(select(Stats).where(Stats.user_id == user.id)).one()
            if result.outcome == "win":
                stats.win_count += 1
            else:
                stats.loss_count += 1
            stats.earnings += result.earnings
            user.wallet += result.earnings
            board = db.scalars(
                select(LeaderboardEntry).where(LeaderboardEntry.stats_id == stats.id)
            ).one()
            board.earnings += result.earnings
            self.loaded[user.id] = (stats, board)
            db.add(
                GameResult(
                    session_pk=session.id,
                    user_id=user.id,
                    outcome=result.outcome,
                    earnings=result.earnings,
                )
            )
        db.execute(delete(SessionPlayer).where(SessionPlayer.session_pk == session.id))
        session.status = "ended"
        session.end_reason = event.reason
        session.ended_at = now
        session.updated_at = now
        return users


def _key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq)
