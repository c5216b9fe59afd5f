"""The rank refresh beside the event hot path (`workers/events/ranks.py`): a snapshot
read on a connection of its own, written in slices between batches; exact once idle
(docs/protocol.md, "SQL tables"; docs/design.md, "Ranks")."""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import text

from tests.conftest import Backend
from tests.integration.helpers import add_players, services_for, standings
from usermgmt.domain.ranking import competition_ranks
from usermgmt.persistence import db as persistence_db
from usermgmt.persistence.ranking import read_rank_snapshot, refresh_ranks, write_ranks
from usermgmt.workers.events import ranks as ranks_module
from usermgmt.workers.events.consumer import EventConsumer
from usermgmt.workers.runtime.bootstrap import Services
from usermgmt.workers.runtime.metrics import Metrics

NAMES = [f"rk{i:02d}" for i in range(30)]


class Recorder(Metrics):
    """Counts what the refresher reports."""

    def __init__(self) -> None:
        self.steps: list[float] = []
        self.refreshes = 0

    def observe_rank_step(self, seconds: float) -> None:
        self.steps.append(seconds)

    def observe_rank_refresh(self, seconds: float) -> None:
        self.refreshes += 1


def set_earnings(services: Services, earnings: dict[str, int]) -> None:
    """Change `stats` behind the worker's back, as games would (the table must follow)."""
    with services.engine.begin() as conn:
        for name, earned in earnings.items():
            conn.execute(
                text(
                    "UPDATE stats SET earnings = :earned WHERE user_id = "
                    "(SELECT id FROM users WHERE username = :name)"
                ),
                {"earned": earned, "name": name},
            )


def table_is_exact(services: Services) -> bool:
    """Whether every leaderboard row holds its player's earnings and competition rank."""
    rows = standings(services)
    expected = competition_ranks({name: row[2] for name, row in rows.items()})
    with services.engine.connect() as conn:
        snapshot_earnings: dict[str, int] = dict(
            conn.execute(
                text(
                    "SELECT u.username, l.earnings FROM users u JOIN stats s ON s.user_id = u.id "
                    "JOIN leaderboard l ON l.stats_id = s.id"
                )
            ).all()
        )
    return all(
        row[4] == expected[name] and snapshot_earnings[name] == row[2] for name, row in rows.items()
    )


def play_bursts(backend: Backend, rng: random.Random, games: int, tag: str) -> None:
    """Games of 2-4 players in pipelined bursts; a player's next game follows its end."""
    pipe = backend.redis.pipeline(transaction=False)
    for number in range(games):
        roster = rng.sample(NAMES, rng.randint(2, 4))
        session_id = f"{tag}-{number}"
        events: tuple[tuple[str, dict[str, Any]], ...] = (
            ("update", {"session_id": session_id, "players": roster}),
            (
                "terminate",
                {
                    "session_id": session_id,
                    "results": [
                        {"username": name, "outcome": "win", "earnings": rng.choice([0, 5, 50])}
                        for name in roster
                    ],
                },
            ),
        )
        for kind, payload in events:
            payload["event_id"] = str(uuid.uuid4())
            pipe.xadd(backend.keys.event_stream(kind), {"payload": orjson.dumps(payload)})
    pipe.execute()


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@contextmanager
def live_worker(services: Services, metrics: Metrics) -> Iterator[EventConsumer]:
    """`EventConsumer.run()` in a thread (not burst: idle refreshes happen)."""
    stop = threading.Event()
    worker = EventConsumer(services, "ranks", stop, metrics=metrics)
    crashed: list[BaseException] = []

    def target() -> None:
        try:
            worker.run()
        except BaseException as exc:
            crashed.append(exc)

    thread = threading.Thread(target=target, name="events-ranks", daemon=True)
    thread.start()
    try:
        yield worker
    finally:
        stop.set()
        thread.join(15)
    assert not thread.is_alive(), "the event worker did not stop"
    assert not crashed, f"the event worker crashed: {crashed!r}"


# -- persistence -----------------------------------------------------------------------


def test_a_snapshot_holds_the_changed_rows_and_slices_write_it(
    services: Services, backend: Backend
) -> None:
    add_players(services, *NAMES)
    with services.engine.connect() as conn:
        assert len(read_rank_snapshot(conn)) == 0  # everyone at 0: ranks exact already
    rng = random.Random(3)
    set_earnings(services, {name: rng.choice([0, 10, 10, 40, 90]) for name in NAMES[:20]})
    with services.engine.connect() as conn:
        snapshot = read_rank_snapshot(conn)
    earnings = {name: row[2] for name, row in standings(services).items()}
    expected = competition_ranks(earnings)
    changed = {name for name, row in standings(services).items() if row[4] != expected[name]}
    assert len(snapshot) == len(changed | {n for n in NAMES[:20] if earnings[n]})
    assert list(snapshot.ids) == sorted(snapshot.ids)

    with services.engine.begin() as conn:
        write_ranks(conn, snapshot, 0, 7)
    assert not table_is_exact(services)  # part written
    with services.engine.begin() as conn:
        write_ranks(conn, snapshot, 7, 19)
        write_ranks(conn, snapshot, 19, len(snapshot))
    assert table_is_exact(services)
    with services.engine.begin() as conn:
        assert refresh_ranks(conn) == 0  # the one-statement refresh agrees
    with services.engine.connect() as conn:
        assert len(read_rank_snapshot(conn)) == 0


# -- the consumer ------------------------------------------------------------------------


def test_a_live_worker_refreshes_in_slices_and_is_exact_once_idle(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ranks_module, "FIRST_STEP_ROWS", 3)
    monkeypatch.setattr(ranks_module, "MAX_STEP_ROWS", 5)
    recorder = Recorder()
    with services_for(backend, rank_refresh_s=0.2) as services:
        add_players(services, *NAMES)
        rng = random.Random(5)
        with live_worker(services, recorder) as worker:
            for wave in range(4):
                play_bursts(backend, rng, games=8, tag=f"w{wave}")
                time.sleep(0.1)  # the next wave lands while a refresh is under way
            wait_until(
                lambda: (
                    worker.stats.applied == 4 * 8 * 2
                    and not worker.ranks.dirty
                    and not worker.ranks.reading
                    and not worker.ranks.writing
                    and table_is_exact(services)
                ),
                "every event applied and the ranks exact",
            )
        assert recorder.refreshes >= 1
        assert len(recorder.steps) > recorder.refreshes  # several slices a refresh
        assert table_is_exact(services)


def test_a_batch_committed_during_a_refresh_leaves_the_ranks_dirty(
    services: Services, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ranks_module, "FIRST_STEP_ROWS", 4)
    add_players(services, *NAMES)
    worker = EventConsumer(services, "c1", threading.Event(), burst=True)
    rng = random.Random(9)
    play_bursts(backend, rng, games=6, tag="a")
    worker.run()  # burst: exits with the ranks exact
    assert table_is_exact(services)

    set_earnings(services, {NAMES[0]: 1_000, NAMES[1]: 500})  # everyone else moves down
    refresher = worker.ranks
    refresher.dirty = True
    refresher.start()
    wait_until(lambda: refresher.writing, "the snapshot read")
    assert refresher.step()
    set_earnings(services, {NAMES[2]: 2_000})  # committed after the snapshot
    refresher.dirty = True  # as a batch with results marks it
    while refresher.writing:
        assert refresher.step()
    assert not table_is_exact(services)  # the snapshot's, not NAMES[2]'s win
    assert refresher.due(idle=True)
    refresher.start()
    wait_until(lambda: refresher.writing, "the second snapshot read")
    while refresher.writing:
        refresher.step()
    assert not refresher.dirty
    assert table_is_exact(services)
    worker.store.close()


def test_a_failed_snapshot_read_is_taken_again(
    services: Services, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    add_players(services, *NAMES)
    set_earnings(services, {NAMES[3]: 70})
    worker = EventConsumer(services, "c1", threading.Event(), burst=True)
    refresher = worker.ranks
    real = read_rank_snapshot
    calls = {"n": 0}

    def flaky(conn):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("snapshot read failed (test)")
        return real(conn)

    monkeypatch.setattr(ranks_module, "read_rank_snapshot", flaky)
    refresher.start()
    assert refresher.reader is not None
    refresher.reader.join(10)
    assert not refresher.step()  # the failure is noticed, nothing written
    assert refresher.dirty and not refresher.reading and not refresher.writing
    assert not table_is_exact(services)
    refresher.start()
    wait_until(lambda: refresher.writing, "the second snapshot read")
    while refresher.writing:
        refresher.step()
    assert table_is_exact(services) and calls["n"] == 2
    worker.store.close()


# -- SQLite's checkpoints ----------------------------------------------------------------


def test_a_long_read_holds_checkpoint_restarts_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = persistence_db.make_engine(f"sqlite:///{tmp_path}/wal.db", background_checkpoints=True)
    try:
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE t (x INTEGER)"))
            conn.execute(text("INSERT INTO t VALUES (1)"))
        restarts: list[int] = []
        monkeypatch.setattr(persistence_db, "_restart", lambda conn, wal: restarts.append(1))
        with persistence_db.long_read():
            persistence_db.checkpoint_wal(engine, restart_pages=0)
        assert restarts == []
        persistence_db.checkpoint_wal(engine, restart_pages=0)
        assert restarts == [1]

        # A long read that begins during a RESTART waits for it.
        entered = threading.Event()

        def read() -> None:
            with persistence_db.long_read():
                entered.set()

        with persistence_db._RESTARTS:
            thread = threading.Thread(target=read, daemon=True)
            thread.start()
            assert not entered.wait(0.2)
        assert entered.wait(5)
        thread.join(5)
    finally:
        engine.dispose()
