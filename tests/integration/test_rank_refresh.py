"""The rank refresh beside the event hot path (`workers/events/ranks.py`): a snapshot of
`stats` read on a connection of its own, written to `leaderboard` a slice at a time
between batches; the table is exact once the worker is idle (docs/protocol.md, "SQL
tables")."""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NamedTuple

import orjson
import pytest
from sqlalchemy import Connection, text

from tests.conftest import Backend
from tests.integration.helpers import (
    add_players,
    apply_available,
    dead_letters,
    publish,
    services_for,
)
from usermgmt.domain.ranking import competition_ranks
from usermgmt.persistence.ranking import (
    RankSnapshot,
    read_rank_snapshot,
    refresh_ranks,
    write_ranks,
)
from usermgmt.workers.events import consumer as consumer_module
from usermgmt.workers.events import ranks as ranks_module
from usermgmt.workers.events.consumer import EventConsumer
from usermgmt.workers.runtime.bootstrap import Services
from usermgmt.workers.runtime.metrics import Metrics

NAMES = [f"rk{i:02d}" for i in range(30)]
GAMES_PER_WAVE = 8


class Place(NamedTuple):
    """A player's leaderboard row beside their stats."""

    id: int  # leaderboard.id
    rank: int
    earnings: int  # leaderboard.earnings
    stats_earnings: int


_PLACES = text(
    "SELECT u.username, l.id, l.rank, l.earnings, s.earnings FROM users u "
    "JOIN stats s ON s.user_id = u.id JOIN leaderboard l ON l.stats_id = s.id"
)


def places(services: Services, conn: Connection | None = None) -> dict[str, Place]:
    """Every player's leaderboard row and stats earnings (on `conn`, or a connection of its own)."""
    if conn is None:
        with services.engine.connect() as own:
            return places(services, own)
    return {name: Place(*row) for name, *row in conn.execute(_PLACES)}


def table(found: dict[str, Place]) -> dict[str, tuple[int, int]]:
    """username -> (leaderboard.rank, leaderboard.earnings)."""
    return {name: (place.rank, place.earnings) for name, place in found.items()}


def exact(found: dict[str, Place]) -> dict[str, tuple[int, int]]:
    """What the table holds when exact: competition ranks of `stats`, and its earnings."""
    ranks = competition_ranks({name: place.stats_earnings for name, place in found.items()})
    return {name: (ranks[name], place.stats_earnings) for name, place in found.items()}


def set_earnings(services: Services, earnings: dict[str, int]) -> None:
    """Change `stats` directly, as committed games would (the table must follow)."""
    with services.engine.begin() as conn:
        for name, earned in earnings.items():
            conn.execute(
                text(
                    "UPDATE stats SET earnings = :earned WHERE user_id = "
                    "(SELECT id FROM users WHERE username = :name)"
                ),
                {"earned": earned, "name": name},
            )


def pairs(services: Services) -> None:
    """Earnings in tied pairs: 1500, 1500, 1400, 1400, ... 100, 100."""
    set_earnings(services, {name: 100 * (15 - i // 2) for i, name in enumerate(NAMES)})


def move(services: Services) -> None:
    """The top player earns more (rank kept, the one tied with them drops), one climbs from
    the bottom to the middle (those passed drop, ranks only), one joins a tie; the players
    above every move stay as they are."""
    set_earnings(services, {NAMES[0]: 1_600, NAMES[28]: 1_050, NAMES[20]: 1_000})


def uneven_board(services: Services) -> None:
    """The pairs ranked exactly, then moved."""
    add_players(services, *NAMES)
    pairs(services)
    with services.engine.begin() as conn:
        refresh_ranks(conn)
    found = places(services)
    assert table(found) == exact(found)
    move(services)


def changed_rows(found: dict[str, Place]) -> list[tuple[int, int, int, bool]]:
    """(leaderboard id, new rank, earnings, earnings changed) of each row that differs
    from `exact`, in id order: what a snapshot must hold."""
    target = exact(found)
    return sorted(
        (place.id, target[name][0], place.stats_earnings, place.stats_earnings != place.earnings)
        for name, place in found.items()
        if target[name] != (place.rank, place.earnings)
    )


def rows_of(snapshot: RankSnapshot) -> list[tuple[int, int, int, bool]]:
    return [
        (row_id, rank, earnings, bool(earned))
        for row_id, rank, earnings, earned in zip(
            snapshot.ids, snapshot.ranks, snapshot.earnings, snapshot.earned, strict=True
        )
    ]


def snapshot_now(services: Services) -> RankSnapshot:
    with services.engine.connect() as conn:
        return read_rank_snapshot(conn)


# -- the consumer, its metrics and its events --------------------------------------------


class Recorder(Metrics):
    """What the refresher reports, refresh by refresh, with the slices each one wrote."""

    def __init__(self) -> None:
        self.steps = 0
        self.slices: list[tuple[int, int]] = []  # (start, stop) of the refresh under way
        self.refreshes: list[list[tuple[int, int]]] = []

    def observe_rank_step(self, seconds: float) -> None:
        self.steps += 1

    def observe_rank_refresh(self, seconds: float) -> None:
        self.refreshes.append(self.slices)
        self.slices = []


def record_slices(monkeypatch: pytest.MonkeyPatch, recorder: Recorder) -> None:
    """Note every slice the refresher writes (then write it)."""

    def recording(conn: Connection, snapshot: RankSnapshot, start: int, stop: int) -> None:
        recorder.slices.append((start, stop))
        write_ranks(conn, snapshot, start, stop)

    monkeypatch.setattr(ranks_module, "write_ranks", recording)


def small_slices(monkeypatch: pytest.MonkeyPatch, first: int = 3, most: int = 5) -> None:
    """Slices of a few rows, so 30 players take several (MIN_STEP_ROWS must go below them
    too: the slice size is at least MIN_STEP_ROWS)."""
    monkeypatch.setattr(ranks_module, "FIRST_STEP_ROWS", first)
    monkeypatch.setattr(ranks_module, "MIN_STEP_ROWS", 2)
    monkeypatch.setattr(ranks_module, "MAX_STEP_ROWS", most)


def fail_first_read(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The refresher's first snapshot read raises; returns the calls made so far."""
    calls: list[int] = []

    def flaky(conn: Connection) -> RankSnapshot:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("snapshot read failed (test)")
        return read_rank_snapshot(conn)

    monkeypatch.setattr(ranks_module, "read_rank_snapshot", flaky)
    return calls


def play_wave(backend: Backend, rng: random.Random, tag: str, games: int = GAMES_PER_WAVE) -> int:
    """Games of 2-4 players, pipelined in one burst; a player is often matched again right
    after their game in the burst ended. Returns the entries published."""
    pipe = backend.redis.pipeline(transaction=False)
    for number in range(games):
        roster = rng.sample(NAMES, rng.randint(2, 4))
        session_id = f"{tag}-{number}"
        update = {"session_id": session_id, "players": roster}
        results = [
            {
                "username": name,
                "outcome": rng.choice(["win", "loss"]),
                "earnings": rng.choice([0, 5, 50, 50]),
            }
            for name in roster
        ]
        terminate = {"session_id": session_id, "results": results}
        for kind, payload in (("update", update), ("terminate", terminate)):
            payload["event_id"] = str(uuid.uuid4())
            pipe.xadd(backend.keys.event_stream(kind), {"payload": orjson.dumps(payload)})
    pipe.execute()
    return 2 * games


def play_one(backend: Backend, session_id: str, winner: str, loser: str, earned: int) -> None:
    """One game that moves `winner` up by `earned`."""
    publish(backend.redis, backend.keys, "update", session_id=session_id, players=[winner, loser])
    publish(
        backend.redis,
        backend.keys,
        "terminate",
        session_id=session_id,
        results=[
            {"username": winner, "outcome": "win", "earnings": earned},
            {"username": loser, "outcome": "loss", "earnings": 0},
        ],
    )


def idle_refresh(worker: EventConsumer) -> None:
    """The live worker's idle pass (a read that waited and got nothing), then its rank steps
    until the refresh that pass started is written."""
    worker.burst = False  # from now on, as a live worker
    worker.lease.enabled = True  # the one reader: it refreshes in slices
    worker.waited_for_entries = True
    assert worker.on_idle() is False
    assert worker.ranks.reading, "an idle pass with dirty ranks starts a refresh"
    deadline = time.monotonic() + 10
    while worker.ranks.reading or worker.ranks.writing:
        assert time.monotonic() < deadline, "the refresh never ended"
        worker.step_ranks()
        time.sleep(0.002)


def wait_until(condition: Callable[[], bool], explain: Callable[[], str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(explain())
        time.sleep(0.02)


@contextmanager
def live_worker(services: Services, metrics: Metrics) -> Iterator[EventConsumer]:
    """`EventConsumer.run()` on a thread (not burst: reads block, idle passes refresh)."""
    stop = threading.Event()
    worker = EventConsumer(services, "live", stop, metrics=metrics)
    crashed: list[BaseException] = []

    def target() -> None:
        try:
            worker.run()
        except BaseException as exc:
            crashed.append(exc)

    thread = threading.Thread(target=target, name="events-live", daemon=True)
    thread.start()
    try:
        yield worker
    finally:
        stop.set()
        thread.join(15)
    assert not thread.is_alive(), "the event worker did not stop"
    assert not crashed, f"the event worker crashed: {crashed!r}"


def settled_and_exact(services: Services, worker: EventConsumer, published: int) -> bool:
    """Every entry applied, no refresh under way or owed, and the table exact."""
    ranks = worker.ranks
    if worker.stats.applied != published or ranks.dirty or ranks.reading or ranks.writing:
        return False
    found = places(services)
    return table(found) == exact(found)


def explain(services: Services, worker: EventConsumer, published: int) -> Callable[[], str]:
    def describe() -> str:
        found = places(services)
        wrong = {
            name: (row, exact(found)[name])
            for name, row in table(found).items()
            if row != exact(found)[name]
        }
        ranks = worker.ranks
        return (
            f"not settled: applied {worker.stats.applied}/{published}, dead {worker.stats.dead}, "
            f"dirty {ranks.dirty}, reading {ranks.reading}, writing {ranks.writing}; "
            f"rows (table, exact) that differ: {wrong}"
        )

    return describe


# -- persistence ---------------------------------------------------------------------------


def test_a_snapshot_holds_exactly_the_rows_that_differ(services: Services) -> None:
    add_players(services, *NAMES)
    assert len(snapshot_now(services)) == 0  # all at 0 and rank 1: exact already

    pairs(services)
    found = places(services)
    assert rows_of(snapshot_now(services)) == changed_rows(found)
    assert len(changed_rows(found)) == len(NAMES)  # every earnings changed
    with services.engine.begin() as conn:
        assert refresh_ranks(conn) == len(NAMES)
    found = places(services)
    assert table(found) == exact(found)
    assert len(snapshot_now(services)) == 0  # exact again: nothing to write

    move(services)
    found = places(services)
    expected = changed_rows(found)
    assert rows_of(snapshot_now(services)) == expected
    # The moves give rows of each kind: earnings and rank, rank only, untouched.
    assert any(earned for *_, earned in expected)
    assert any(not earned for *_, earned in expected)
    assert 0 < len(expected) < len(found)
    assert places(services) == found  # reading wrote nothing


def test_a_snapshot_written_in_slices_ends_as_the_one_statement_refresh(
    services: Services,
) -> None:
    uneven_board(services)
    before = places(services)
    target = exact(before)
    # What `refresh_ranks` makes of the same rows, rolled back.
    with services.engine.connect() as conn:
        transaction = conn.begin()
        changed = refresh_ranks(conn)
        by_statement = table(places(services, conn))
        transaction.rollback()
    assert by_statement == target
    assert places(services) == before

    snapshot = snapshot_now(services)
    assert len(snapshot) == changed > 8
    id_of = {name: place.id for name, place in before.items()}

    with services.engine.begin() as conn:
        write_ranks(conn, snapshot, 0, 4)
    first = set(snapshot.ids[:4])
    now = table(places(services))
    for name, row in now.items():
        written = id_of[name] in first
        assert row == (target[name] if written else (before[name].rank, before[name].earnings))
    assert now != target  # partly written

    for start in range(4, len(snapshot), 5):
        with services.engine.begin() as conn:
            write_ranks(conn, snapshot, start, min(start + 5, len(snapshot)))
    assert table(places(services)) == by_statement
    assert len(snapshot_now(services)) == 0  # exact: nothing left to write
    with services.engine.begin() as conn:
        assert refresh_ranks(conn) == 0


# -- the consumer ----------------------------------------------------------------------------


def test_a_live_worker_refreshes_in_slices_under_load_and_is_exact_once_idle(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    small_slices(monkeypatch, first=3, most=5)
    recorder = Recorder()
    record_slices(monkeypatch, recorder)
    rng = random.Random(5)
    with services_for(backend, rank_refresh_s=0.2, events_lease=True) as services:
        add_players(services, *NAMES)
        with live_worker(services, recorder) as worker:
            published, wave = 0, 0
            deadline = time.monotonic() + 15
            # Waves until a refresh has ended while games kept coming, then one more.
            while not recorder.refreshes or wave < 3:
                assert time.monotonic() < deadline, "no rank refresh under load"
                published += play_wave(backend, rng, f"w{wave}")
                wave += 1
                time.sleep(0.1)
            under_load = len(recorder.refreshes)
            published += play_wave(backend, rng, f"w{wave}")
            wait_until(
                lambda: settled_and_exact(services, worker, published),
                explain(services, worker, published),
                timeout=15,
            )
            assert len(recorder.refreshes) > under_load  # the last wave got a refresh too
        assert not worker.stats.dead and dead_letters(backend.redis, backend.keys) == []

    # A step is one slice, or a few back to back while a refresh is behind its pace.
    slices_written = sum(max(1, len(slices)) for slices in recorder.refreshes)
    assert len(recorder.refreshes) <= recorder.steps <= slices_written
    for slices in recorder.refreshes:
        # Each refresh wrote its snapshot once, in order, a few rows at a time.
        assert [start for start, _ in slices] == [0, *(stop for _, stop in slices[:-1])]
        assert all(0 < stop - start <= 5 for start, stop in slices)
    first_refresh = next(slices for slices in recorder.refreshes if slices)
    assert first_refresh[0] == (0, 3)  # FIRST_STEP_ROWS
    assert max(len(slices) for slices in recorder.refreshes) >= 3


def test_reads_do_not_wait_while_a_refresh_is_under_way(
    services: Services, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    small_slices(monkeypatch)
    add_players(services, *NAMES)
    worker = EventConsumer(services, "c1", threading.Event(), burst=True)
    play_wave(backend, random.Random(2), "a")
    apply_available(worker)
    assert worker.ranks.dirty

    gate = threading.Event()

    def held_read(conn: Connection) -> RankSnapshot:
        assert gate.wait(10)
        return read_rank_snapshot(conn)

    monkeypatch.setattr(ranks_module, "read_rank_snapshot", held_read)
    worker.burst = False  # reads block now, as a live worker's do
    try:
        worker.ranks.start()

        def read_seconds() -> float:
            started = time.perf_counter()
            assert worker.next_entries() == []
            return time.perf_counter() - started

        assert worker.ranks.reading
        assert read_seconds() < 0.5  # at most READING_POLL_MS, not BLOCK_MS
    finally:
        gate.set()
    assert worker.ranks.reader is not None
    worker.ranks.reader.join(10)
    assert worker.ranks.writing
    assert read_seconds() < 0.5  # slices pending: no wait at all
    while worker.ranks.writing:
        worker.step_ranks()
    found = places(services)
    assert table(found) == exact(found)
    # Nothing under way: the read waits its full BLOCK_MS (the timings above tell).
    assert read_seconds() >= consumer_module.BLOCK_MS / 1000 * 0.9
    worker.store.close()


def test_a_batch_committed_while_a_snapshot_is_written_leaves_the_ranks_dirty(
    services: Services, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    small_slices(monkeypatch, first=4, most=4)
    add_players(services, *NAMES)
    rng = random.Random(9)
    worker = EventConsumer(services, "c1", threading.Event(), burst=True)
    play_wave(backend, rng, "a")
    apply_available(worker)
    worker.refresh_ranks()
    assert not worker.ranks.dirty and table(places(services)) == exact(places(services))

    play_wave(backend, rng, "b")
    apply_available(worker)
    assert worker.ranks.dirty
    as_of_b = exact(places(services))
    refresher = worker.ranks
    refresher.start()
    assert not refresher.dirty
    assert refresher.reader is not None
    refresher.reader.join(10)
    assert refresher.step() and refresher.writing  # one slice written, more to come

    applied = worker.stats.applied
    play_one(backend, "c-0", NAMES[0], NAMES[1], 777)  # committed after the snapshot
    apply_available(worker)
    assert worker.stats.applied == applied + 2
    assert refresher.dirty  # the batch changed stats the snapshot does not hold
    assert refresher.snapshot is not None  # and did not start another refresh meanwhile
    while refresher.writing:
        assert refresher.step()
    assert refresher.dirty
    assert table(places(services)) == as_of_b  # the snapshot's ranks: without game c-0
    assert as_of_b != exact(places(services))

    idle_refresh(worker)  # the next idle pass takes a snapshot again
    assert not refresher.dirty
    found = places(services)
    assert table(found) == exact(found)
    assert found[NAMES[0]].earnings == found[NAMES[0]].stats_earnings >= 777
    worker.store.close()


def test_a_failed_snapshot_read_leaves_the_ranks_dirty_and_is_taken_again(
    services: Services, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    add_players(services, *NAMES)
    rng = random.Random(4)
    recorder = Recorder()
    worker = EventConsumer(services, "c1", threading.Event(), burst=True, metrics=recorder)
    play_wave(backend, rng, "a")
    apply_available(worker)
    worker.refresh_ranks()
    play_wave(backend, rng, "b")
    apply_available(worker)
    before = places(services)
    assert table(before) != exact(before)

    calls = fail_first_read(monkeypatch)
    refresher = worker.ranks
    refresher.start()
    assert refresher.reader is not None
    refresher.reader.join(10)
    assert not refresher.step()  # the failure is taken in; nothing written
    assert calls == [1]
    assert refresher.dirty and not refresher.reading and not refresher.writing
    assert places(services) == before
    assert recorder.steps == 0 and recorder.refreshes == []

    applied = worker.stats.applied
    applied_now = play_wave(backend, rng, "c")  # the worker goes on applying events
    apply_available(worker)
    assert worker.stats.applied == applied + applied_now

    idle_refresh(worker)
    assert calls == [1, 1]
    assert not refresher.dirty and len(recorder.refreshes) == 1
    found = places(services)
    assert table(found) == exact(found)
    worker.store.close()


def test_a_live_worker_keeps_applying_events_after_a_failed_snapshot_read(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = fail_first_read(monkeypatch)
    recorder = Recorder()
    rng = random.Random(6)
    with services_for(backend, rank_refresh_s=0.2, events_lease=True) as services:
        add_players(services, *NAMES)
        with live_worker(services, recorder) as worker:
            published = play_wave(backend, rng, "a")
            wait_until(
                lambda: bool(calls),
                lambda: f"no snapshot read: applied {worker.stats.applied}/{published}",
                timeout=10,
            )
            published += play_wave(backend, rng, "b")  # after the failed read
            wait_until(
                lambda: settled_and_exact(services, worker, published),
                explain(services, worker, published),
                timeout=15,
            )
        assert len(calls) >= 2 and recorder.refreshes
        assert not worker.stats.dead and dead_letters(backend.redis, backend.keys) == []


def test_without_the_lease_a_refresh_is_one_statement(services: Services, backend: Backend) -> None:
    """Several workers may read: slices of two snapshots could interleave, an older one
    last, so each refresh is one statement from the current `stats`."""
    add_players(services, *NAMES)
    worker = EventConsumer(services, "c1", threading.Event(), burst=True)
    play_wave(backend, random.Random(8), "a")
    apply_available(worker)
    assert worker.ranks.dirty
    worker.burst = False  # a live worker, with the lease off (as tests set it)
    assert not worker.lease.enabled
    worker.waited_for_entries = True
    worker.on_idle()
    assert not worker.ranks.dirty and not worker.ranks.reading and not worker.ranks.writing
    found = places(services)
    assert table(found) == exact(found)
    worker.store.close()


def test_a_reader_that_stands_by_drops_its_refresh(
    services: Services, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The new reader refreshes: an older snapshot written after its newer one would
    leave the table stale once idle. Taking the lease back marks the ranks dirty."""
    small_slices(monkeypatch, first=2, most=2)
    add_players(services, *NAMES)
    worker = EventConsumer(services, "c1", threading.Event(), burst=True)
    play_wave(backend, random.Random(12), "a")
    apply_available(worker)
    worker.burst, worker.lease.enabled = False, True  # a live worker, the one reader
    worker.ranks.start()
    assert worker.ranks.reader is not None
    worker.ranks.reader.join(10)
    assert worker.step_ranks() is None and worker.ranks.writing
    worker.stand_by()
    assert not worker.ranks.writing and not worker.ranks.reading and worker.ranks.dirty
    worker.ranks.dirty = False
    worker.standing_by, worker.lease.enabled = True, True
    worker.next_entries()  # holds the lease again: someone else may have moved stats
    assert worker.ranks.dirty
    worker.store.close()
