"""Waiting entries (domain/waiting.py) and the planner's rules on time: what a waiter
holds, what is recorded for a new worker, `wait_timeout`, expired sessions, and that
the decisions do not depend on how the entries are cut into batches (docs/protocol.md,
"Delivery")."""

from __future__ import annotations

import random
import uuid
from collections import Counter
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.test_games_planner import (
    BASE_MS,
    RESTART,
    WAITING,
    Consumed,
    WaitingTable,
    Worker,
    add_session,
    at,
    check_live_sessions,
    consume,
    decide,
    entry,
    make_world,
    stamp,
    terminate,
    update,
)
from usermgmt.domain import planner
from usermgmt.domain.errors import DeadLetterReason
from usermgmt.domain.events import GameEvent, Result, TerminateEvent, UpdateEvent
from usermgmt.domain.games import APPLIED, ENDED, Outcome, PlannedEntry, World
from usermgmt.domain.planner import EXPIRED
from usermgmt.domain.waiting import Limits, Waiter, Waiters, Wake

T = BASE_MS + 100_000  # the entries of a test on time start here


# -- Waiters -----------------------------------------------------------------------------


def test_waiters_are_indexed_by_what_wakes_them_and_kept_in_entry_order() -> None:
    waiters = Waiters()
    late = Waiter(entry(update("s1", "alice"), ms=T + 2), "alice", Wake("player", 1), True)
    early = Waiter(
        entry(terminate("s2", ("bob", "win", 1)), ms=T + 1), "s2", Wake("session", "s2"), False
    )
    waiters.add(late)
    waiters.add(early)
    assert len(waiters) == 2 and list(waiters) == [early, late]
    assert waiters.woken_by(Wake("player", 1)) == [late.entry.order]
    assert waiters.woken_by(Wake("session", "s2")) == [early.entry.order]
    assert waiters.woken_by(Wake("player", 2)) == []
    assert waiters.oldest() is early
    assert waiters.take(early.entry.order) is early
    assert waiters.take(early.entry.order) is None
    assert waiters.oldest() is late and waiters.woken_by(Wake("session", "s2")) == []
    assert waiters.take(late.entry.order) is late
    assert waiters.oldest() is None and len(waiters) == 0


def test_holder_before_finds_the_nearest_earlier_entry_not_to_overtake() -> None:
    waiters = Waiters()
    first = Waiter(entry(update("s1", "alice", "bob"), ms=T + 1), "x", Wake("player", 1), True)
    early_end = Waiter(
        entry(terminate("s2", ("carol", "win", 1)), ms=T), "y", Wake("session", "s2"), False
    )
    waiters.add(first)
    waiters.add(early_end)
    later = T + 10
    # Its session's later entries, and updates wanting one of its players, queue.
    assert waiters.holder_before(entry(update("s1", "carol"), ms=later)) is first
    assert waiters.holder_before(entry(terminate("s1", reason="aborted"), ms=later)) is first
    assert waiters.holder_before(entry(update("s3", "bob"), ms=later), ("bob",)) is first
    # Only for the players an update asks for, and never for an earlier entry.
    assert waiters.holder_before(entry(update("s3", "bob"), ms=later), ()) is None
    assert waiters.holder_before(entry(update("s1", "dave"), ms=T, seq=0)) is None
    # A terminate waiting for its session's first update holds nothing.
    assert waiters.holder_before(entry(update("s2", "carol"), ms=later), ("carol",)) is None
    # The nearest of several holders.
    second = Waiter(
        entry(update("s4", "bob"), ms=T + 3), "z", Wake("entry", first.entry.order), True
    )
    waiters.add(second)
    assert waiters.holder_before(entry(update("s5", "bob"), ms=later), ("bob",)) is second
    assert waiters.holder_before(entry(update("s5", "bob"), ms=T + 2), ("bob",)) is first
    waiters.take(first.entry.order)
    assert waiters.holder_before(entry(update("s1", "bob"), ms=later)) is None
    assert waiters.holder_before(entry(update("s5", "alice"), ms=later), ("alice",)) is None


def test_a_terminate_holding_its_session_holds_none_of_its_players() -> None:
    waiters = Waiters()
    end = entry(terminate("s1", ("alice", "win", 1)), ms=T)
    waiters.add(Waiter(end, "x", Wake("entry", (0, 0, 0)), True))
    assert waiters.holder_before(entry(update("s2", "alice"), ms=T + 1), ("alice",)) is None
    assert waiters.holder_before(entry(update("s1", "bob"), ms=T + 1), ("bob",)) is not None


# -- what a batch records --------------------------------------------------------------


def recorded(waiters: list[Waiter]) -> list[tuple[str, str]]:
    return [(waiter.entry.entry_id, waiter.waits_for) for waiter in waiters]


@RESTART
def test_a_waiter_is_recorded_again_only_when_it_waits_for_something_else(restart: bool) -> None:
    world = make_world("alice", "bob", "carol")
    add_session(world, "s0", "alice")
    add_session(world, "s9", "bob")
    worker = Worker(world, restart)
    first = worker.batch(update("s1", "alice", "bob"))
    start = first.entries[0]
    assert recorded(first.plan.waits_added) == [(start.entry_id, worker.waits_for(start))]
    assert "alice" in worker.waits_for(start)
    quiet = worker.batch(update("s2", "carol"))
    assert quiet.plan.waits_added == [] and quiet.plan.waits_removed == []
    freed = worker.batch(terminate("s0", ("alice", "win", 1)))
    assert freed.sequence == [0]
    [again] = freed.plan.waits_added
    assert again.entry == start and "bob" in again.waits_for and "s9" in again.waits_for
    assert freed.plan.waits_removed == []
    done = worker.batch(terminate("s9", ("bob", "win", 1)))
    assert done.plan.decided[1] == (start, APPLIED)
    assert done.plan.waits_removed == [start] and done.plan.waits_added == []
    assert worker.table.rows == {}
    assert world.live_session_of == {1: "s1", 2: "s1", 3: "s2"}


def test_restored_entries_go_back_where_they_waited() -> None:
    world = make_world("alice", "bob", "carol")
    add_session(world, "s0", "alice")
    table = WaitingTable()
    first = decide(
        world,
        update("s1", "alice"),
        update("s1", "bob"),
        terminate("s1", ("bob", "win", 5)),
        update("s3", "alice"),
        terminate("s4", ("carol", "win", 1)),
    )
    table.record(first.plan)
    assert first.outcomes == [WAITING] * 5
    # A new worker gets them in any order: it decides them again in entry order.
    again = decide(world, restored=table.restored())
    assert again.plan.decided == [] and again.plan.waits_added == [] == again.plan.waits_removed
    assert [(w.entry, w.waits_for, w.holds) for w in again.waiters] == [
        (w.entry, w.waits_for, w.holds) for w in first.waiters
    ]
    # And they are set free as the first worker's would have been.
    done = decide(world, terminate("s0", ("alice", "win", 1)), restored=table.restored())
    ids = [planned.entry_id for planned in first.entries]
    assert done.sequence == [0, ids[0], ids[1], ids[2], ids[3]]
    table.record(done.plan)
    assert [planned.entry_id for planned, _ in table.restored()] == [ids[4]]


# -- wait_timeout ----------------------------------------------------------------------

SHORT = Limits(max_wait_ms=1_000)


def busy_world() -> World:
    world = make_world("alice", "bob", "carol", "dave")
    add_session(world, "s0", "alice")
    return world


@RESTART
def test_a_waiter_times_out_only_once_the_clock_is_past_max_wait(restart: bool) -> None:
    worker = Worker(busy_world(), restart, SHORT)
    start = worker.batch(entry(update("s1", "alice"), ms=T)).entries[0]
    # Exactly max_wait_ms later is not too late.
    edge = worker.batch(entry(update("s2", "carol"), ms=T + 1_000))
    assert edge.sequence == [0] and len(worker.waiters) == 1
    late = worker.batch(entry(update("s3", "dave"), ms=T + 1_001))
    assert late.sequence == [start.entry_id, 0]  # dead-lettered before the entry is decided
    planned, decision = late.plan.decided[0]
    assert planned == start
    assert decision.outcome is Outcome.DEAD and decision.reason is DeadLetterReason.WAIT_TIMEOUT
    assert decision.message == "waited more than 1 s for player alice to leave live session s0"
    assert late.plan.waits_removed == [start] and len(worker.waiters) == 0
    assert "s1" not in worker.world.sessions
    assert str(start.event_id) not in worker.world.processed


@RESTART
def test_the_horizon_times_waiters_out_too(restart: bool) -> None:
    worker = Worker(busy_world(), restart, SHORT)
    worker.batch(entry(update("s1", "alice"), ms=T))
    assert worker.batch(horizon_ms=T + 1_000).plan.decided == []
    late = worker.batch(horizon_ms=T + 1_001)
    assert [d.reason for _, d in late.plan.decided] == [DeadLetterReason.WAIT_TIMEOUT]
    assert worker.table.rows == {}
    # An entry can time out in the batch it came in: it is then never recorded.
    run = decide(
        busy_world(), entry(update("s1", "alice"), ms=T), limits=SHORT, horizon_ms=T + 5_000
    )
    assert run.outcomes == [Outcome.DEAD]
    assert run.plan.waits_added == [] and run.plan.waits_removed == []


def test_a_waiter_times_out_before_a_later_entry_could_free_it() -> None:
    world = busy_world()
    run = decide(
        world,
        entry(update("s1", "alice"), ms=T),
        entry(terminate("s0", ("alice", "win", 1)), ms=T + 1_001),
        limits=SHORT,
    )
    assert run.outcomes == [Outcome.DEAD, Outcome.APPLIED]
    assert run.decisions[0] is not None
    assert run.decisions[0].reason is DeadLetterReason.WAIT_TIMEOUT
    assert "s1" not in world.sessions and world.live_session_of == {}


def test_waiters_time_out_oldest_first() -> None:
    world = busy_world()
    add_session(world, "s9", "bob")
    run = decide(
        world,
        entry(update("s2", "bob"), ms=T),
        entry(terminate("s5", ("carol", "win", 1)), ms=T),
        entry(update("s1", "alice"), ms=T + 5),
        limits=SHORT,
        horizon_ms=T + 2_000,
    )
    assert run.sequence == [0, 1, 2]
    assert all(d.reason is DeadLetterReason.WAIT_TIMEOUT for _, d in run.plan.decided)
    assert "first update of session s5" in run.plan.decided[1][1].message


@RESTART
def test_entries_queued_behind_a_timed_out_entry_are_then_decided(restart: bool) -> None:
    worker = Worker(busy_world(), restart, SHORT)
    first = worker.batch(
        entry(update("s1", "alice"), ms=T),  # waits for alice
        entry(update("s1", "bob"), ms=T + 10),  # queued behind it (its session)
        entry(update("s3", "alice"), ms=T + 20),  # queued behind it (alice)
    )
    assert first.outcomes == [WAITING] * 3
    start, restart_, other = first.entries
    assert start.entry_id in worker.waits_for(other)
    timed_out = worker.batch(horizon_ms=T + 1_001)
    assert [(p, d.outcome) for p, d in timed_out.plan.decided] == [
        (start, Outcome.DEAD),
        (restart_, Outcome.APPLIED),  # s1's first update now: bob is free
    ]
    assert worker.world.sessions["s1"].roster == [2]
    # s3 is no longer behind anything: it waits for alice itself, and is recorded so.
    assert [w.entry for w in timed_out.plan.waits_added] == [other]
    assert "alice" in worker.waits_for(other) and "s0" in worker.waits_for(other)
    assert timed_out.plan.waits_removed == [start, restart_]
    last = worker.batch(horizon_ms=T + 1_021)
    assert [(p, d.reason) for p, d in last.plan.decided] == [(other, DeadLetterReason.WAIT_TIMEOUT)]


def test_a_backlog_behind_a_lost_terminate_times_out_in_a_number_of_decisions_linear_in_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A game server died: its session holds two players for ever, while matchmaking goes
    on rematching forty. Nearly every update ends up queued behind one that wants those
    two. When they time out, each decision may wake only what it can change: waking every
    entry sharing a player re-decided the whole backlog at each decision (47,926
    decisions for 1,000 entries, minutes of CPU for 10,000, in a worker that no longer
    answered SIGTERM). The decisions are those of before, only fewer times taken."""
    names = [f"p{number:03d}" for number in range(40)]
    world = make_world(*names)
    add_session(world, "lost-1", "p000", "p001")  # its terminate never comes
    rng = random.Random(7)
    free, live, entries = set(names), {}, []  # the matchmaker thinks lost-1 ended
    while len(entries) < 1_000:
        if live and (rng.random() < 0.5 or len(free) < 4):
            session_id = rng.choice(sorted(live))
            players = live.pop(session_id)
            results = [(name, "loss", 0) for name in players]
            event: GameEvent = terminate(session_id, *results)
            free |= set(players)
        else:
            players = rng.sample(sorted(free), 4)
            free -= set(players)
            session_id = f"g{len(entries)}"
            live[session_id] = players
            event = update(session_id, *players)
        entries.append(entry(event, ms=T + len(entries) // 20, seq=len(entries)))
    decisions = [0]
    real_decide = planner._Planner.decide

    def counted(self: Any, item: PlannedEntry) -> None:
        decisions[0] += 1
        real_decide(self, item)

    monkeypatch.setattr(planner._Planner, "decide", counted)
    waiters = Waiters()
    limits = Limits(max_wait_ms=1_000, session_timeout_ms=0)
    planner.plan_batch(world, entries, waiters, limits, horizon_ms=T + 50)
    waiting = len(waiters)
    assert waiting > 900  # nearly all of them wait, behind p000 and p001
    decisions[0] = 0
    plan = planner.plan_batch(world, [], waiters, limits, horizon_ms=T + 10_000)
    assert len(plan.decided) == waiting and not waiters
    # The same before and after the change: 780 freed once the first waiters went.
    assert Counter(d.outcome for _, d in plan.decided) == {Outcome.APPLIED: 780, Outcome.DEAD: 184}
    assert decisions[0] < 3 * waiting  # 1,354 (47,926 before)


@RESTART
def test_a_session_whose_first_update_timed_out_still_starts_and_ends(restart: bool) -> None:
    """s1's first update is dead-lettered (alice never leaves s0). s1's terminate, which
    was queued behind it, now waits for s1's first update: the later update of s1, which
    must not in turn wait for that terminate. A worker that restarted in between (the
    waiters restored) and one that did not must decide the same, as a replay would."""
    worker = Worker(busy_world(), restart, SHORT)
    first = worker.batch(
        entry(update("s1", "alice"), ms=T),  # waits for alice: she never leaves s0
        entry(terminate("s1", ("bob", "win", 5)), ms=T + 1),  # queued behind it
        entry(update("s1", "bob"), ms=T + 2),  # queued behind both
    )
    assert first.outcomes == [WAITING] * 3
    start, end, restart_ = first.entries
    decided = []
    for horizon in (T + 1_001, T + 1_002, T + 1_003):
        decided += worker.batch(horizon_ms=horizon).plan.decided
    assert [(p, d.outcome, d.reason) for p, d in decided] == [
        (start, Outcome.DEAD, DeadLetterReason.WAIT_TIMEOUT),
        (restart_, Outcome.APPLIED, None),
        (end, Outcome.APPLIED, None),
    ]
    assert worker.world.sessions["s1"].ended and worker.world.players["bob"].earnings == 5


# -- expired sessions ----------------------------------------------------------------------

TIMEOUT = Limits(session_timeout_ms=10_000)


def silent_world(**limits: Any) -> World:
    """alice and bob in s0, whose last event was at T."""
    world = make_world("alice", "bob", "carol")
    add_session(world, "s0", "alice", "bob", updated_at=at(T))
    world.sessions["s0"].created_at = at(T - 5_000)
    return world


def test_a_silent_session_is_ended_as_expired_for_an_update_needing_its_player() -> None:
    world = silent_world()
    start = entry(update("s1", "alice", "carol"), ms=T + 10_001)
    run = decide(world, start, limits=TIMEOUT)
    assert run.outcomes == [Outcome.APPLIED]
    assert run.plan.expired_sessions == ["s0"]
    expired = world.sessions["s0"]
    assert expired.ended and expired.status == ENDED and expired.end_reason == EXPIRED
    assert expired.ended_at == expired.updated_at == at(start.ms)
    assert expired.created_at == at(T - 5_000)
    changes = run.changes
    assert not changes.stats and not changes.results  # no results for an expired game
    assert set(changes.sessions) == {"s0", "s1"}
    assert changes.membership == {1: "s1", 2: None, 3: "s1"}
    assert changes.membership_before == {1: "s0", 2: "s0", 3: None}
    assert world.live_session_of == {1: "s1", 3: "s1"}
    assert changes.touched_sessions == {"s0", "s1"} and changes.touched_users == {1, 2, 3}
    assert [row[1] for row in changes.processed] == ["update"]


def test_a_session_silent_for_exactly_the_timeout_is_not_expired() -> None:
    world = silent_world()
    run = decide(world, entry(update("s1", "alice"), ms=T + 10_000), limits=TIMEOUT)
    assert run.outcomes == [WAITING] and run.plan.expired_sessions == []
    assert not world.sessions["s0"].ended and world.live_session_of == {1: "s0", 2: "s0"}


@pytest.mark.parametrize("last_ms", [T, 1_095_426_484_689, 2_195_464_926_082])
def test_silence_is_measured_in_whole_milliseconds_of_entry_id_time(last_ms: int) -> None:
    """Any entry id's millisecond, not only today's: 2004 and 2039 here. The session's
    last update time, read back as milliseconds, must be the entry's millisecond (a
    float product truncated by `int()` reads some of them 1 ms early)."""
    world = make_world("alice")
    decide(world, entry(update("s0", "alice"), ms=last_ms))
    edge = decide(world, entry(update("s1", "alice"), ms=last_ms + 10_000), limits=TIMEOUT)
    assert edge.outcomes == [WAITING] and edge.plan.expired_sessions == []


def test_a_session_timeout_of_zero_never_expires() -> None:
    world = silent_world()
    world.sessions["s0"].updated_at = at(T) - timedelta(days=365)
    never = Limits(session_timeout_ms=0)
    run = decide(world, entry(update("s1", "alice"), ms=T), limits=never)
    assert run.outcomes == [WAITING] and run.plan.expired_sessions == []
    assert not world.sessions["s0"].ended


def test_silence_counts_from_the_sessions_last_event() -> None:
    def world_with_a_late_update() -> World:
        world = silent_world()
        decide(world, entry(update("s0", "alice", "bob"), ms=T + 8_000), limits=TIMEOUT)
        return world

    world = world_with_a_late_update()
    assert decide(world, entry(update("s1", "alice"), ms=T + 10_001), limits=TIMEOUT).outcomes == [
        WAITING
    ]
    world = world_with_a_late_update()
    run = decide(world, entry(update("s1", "alice"), ms=T + 18_001), limits=TIMEOUT)
    assert run.outcomes == [Outcome.APPLIED] and run.plan.expired_sessions == ["s0"]


def test_events_of_an_expired_session_are_dead() -> None:
    world = silent_world()
    run = decide(
        world,
        entry(update("s1", "alice"), ms=T + 10_001),
        entry(terminate("s0", ("alice", "win", 100)), ms=T + 10_002),
        entry(update("s0", "bob"), ms=T + 10_003),
        limits=TIMEOUT,
    )
    assert run.outcomes == [Outcome.APPLIED, Outcome.DEAD, Outcome.DEAD]
    assert [d.reason for d in run.decisions[1:] if d is not None] == [
        DeadLetterReason.SESSION_ENDED,
        DeadLetterReason.SESSION_ENDED,
    ]
    assert world.players["alice"].earnings == 0 and world.players["alice"].win_count == 0
    assert world.sessions["s0"].end_reason == EXPIRED


def test_an_update_expires_every_silent_session_it_needs() -> None:
    world = silent_world()
    add_session(world, "s9", "carol", updated_at=at(T + 1))
    run = decide(world, entry(update("s1", "carol", "bob"), ms=T + 10_002), limits=TIMEOUT)
    assert run.outcomes == [Outcome.APPLIED]
    assert run.plan.expired_sessions == ["s9", "s0"]
    assert world.live_session_of == {2: "s1", 3: "s1"}


@pytest.mark.parametrize("players", [("alice", "carol"), ("carol", "alice")])
def test_an_update_ends_every_silent_session_it_needs_whatever_their_order(
    players: tuple[str, str],
) -> None:
    """alice's s0 is silent, carol's s9 is not: s0 ends at the update's first decision
    (in either order of its players), and the update waits for carol alone."""
    world = silent_world()
    add_session(world, "s9", "carol", updated_at=at(T + 5_000))
    waits = decide(world, entry(update("s1", *players), ms=T + 10_001), limits=TIMEOUT)
    assert waits.outcomes == [WAITING] and waits.plan.expired_sessions == ["s0"]
    assert world.sessions["s0"].ended_at == at(T + 10_001)
    assert world.live_session_of == {3: "s9"}
    assert [w.waits_for for w in waits.plan.waits_added] == [
        "player carol to leave live session s9"
    ]
    end = entry(terminate("s9", ("carol", "win", 5)), ms=T + 10_002)
    ends = decide(world, end, waiters=waits.waiters, limits=TIMEOUT)
    assert [(p.ms, d.outcome) for p, d in ends.plan.decided] == [
        (T + 10_002, Outcome.APPLIED),
        (T + 10_001, Outcome.APPLIED),
    ]
    assert ends.plan.expired_sessions == []
    assert world.live_session_of == {1: "s1", 3: "s1"}


def test_an_expired_session_frees_its_players_for_other_waiters() -> None:
    world = silent_world()
    run = decide(
        world,
        entry(update("s2", "bob"), ms=T + 9_000),  # s0 is not silent enough yet: waits
        entry(update("s1", "alice"), ms=T + 10_001),  # expires s0 ...
        limits=TIMEOUT,
    )
    assert run.outcomes == [Outcome.APPLIED, Outcome.APPLIED]  # ... which frees bob too
    assert run.sequence == [1, 0]
    assert world.live_session_of == {1: "s1", 2: "s2"}


@RESTART
def test_an_update_that_expires_a_session_does_not_overtake_an_earlier_one_wanting_its_player(
    restart: bool,
) -> None:
    """s2 asks for alice while s0 is live: it waits. s1 asks for her once s0 is silent: s0
    ends as expired, and alice goes to s2 first, in entry-id order; s1 then waits for
    her to leave s2. (s1 used to queue behind s2 without expiring s0, and s2 then timed
    out waiting for s0: a valid update lost.)"""
    world = silent_world()
    worker = Worker(world, restart, Limits(max_wait_ms=60_000, session_timeout_ms=10_000))
    first = worker.batch(entry(update("s2", "alice", "carol"), ms=T + 9_000))
    assert first.outcomes == [WAITING]
    later = entry(update("s1", "alice"), ms=T + 10_001)
    run = worker.batch(later)
    assert run.plan.expired_sessions == ["s0"]
    assert [(p.event.session_id, d.outcome) for p, d in run.plan.decided] == [
        ("s2", Outcome.APPLIED)
    ]
    assert world.live_session_of == {1: "s2", 3: "s2"}
    assert worker.waits_for(later) == "player alice to leave live session s2"
    ends = worker.batch(entry(terminate("s2", ("alice", "win", 5)), ms=T + 10_002))
    assert [(p.event.session_id, d.outcome) for p, d in ends.plan.decided] == [
        ("s2", Outcome.APPLIED),
        ("s1", Outcome.APPLIED),
    ]
    assert world.live_session_of == {1: "s1"}


@RESTART
def test_waiting_entries_of_a_session_that_expires_are_dead_at_once(restart: bool) -> None:
    """s0's update waits for carol (in s9, never ending), its terminate behind it. An
    update needing alice expires s0: both are then `session_ended` at once, as a new
    worker restoring them would decide, not `wait_timeout` later (hypothesis found it)."""
    world = silent_world()
    add_session(world, "s9", "carol", updated_at=at(T + 10_000))
    worker = Worker(world, restart, Limits(max_wait_ms=60_000, session_timeout_ms=10_000))
    first = worker.batch(
        entry(update("s0", "carol"), ms=T + 10_000),  # waits for carol
        entry(terminate("s0", reason="aborted"), ms=T + 10_000),  # queued behind it
    )
    assert first.outcomes == [WAITING] * 2
    waiting, end = first.entries
    run = worker.batch(entry(update("s1", "alice"), ms=T + 10_001))  # expires s0
    assert run.plan.expired_sessions == ["s0"]
    assert [(p.entry_id, d.reason) for p, d in run.plan.decided] == [
        (run.entries[0].entry_id, None),
        (waiting.entry_id, DeadLetterReason.SESSION_ENDED),
        (end.entry_id, DeadLetterReason.SESSION_ENDED),
    ]
    assert run.plan.waits_removed == [waiting, end] and worker.table.rows == {}


# -- the same decisions however the entries are cut into batches ----------------------------

SOUP = ["pl0", "pl1", "pl2"]
NAMES = st.sampled_from([*SOUP, *SOUP, *SOUP, "ghost"])  # now and then a player nobody knows
SESSIONS = st.sampled_from(["old", "gone", "s1", "s1", "s2", "s2", "s3"])


@st.composite
def soups(draw: st.DrawFn) -> list[PlannedEntry]:
    """Any events at all: invalid histories, lost terminates, retries, long gaps."""
    events: list[GameEvent] = []
    for _ in range(draw(st.integers(1, 30))):
        if events and draw(st.integers(0, 7)) == 0:  # a retry
            events.append(events[draw(st.integers(0, len(events) - 1))])
            continue
        session_id = draw(SESSIONS)
        if draw(st.booleans()):
            events.append(
                UpdateEvent(
                    event_id=uuid.uuid4(),
                    session_id=session_id,
                    players=draw(st.lists(NAMES, min_size=1, max_size=3, unique=True)),
                    status=draw(st.sampled_from(["waiting", "in_progress"])),
                )
            )
            continue
        finishers = draw(st.lists(NAMES, max_size=3, unique=True))
        results = [Result(username=name, outcome="win", earnings=7) for name in finishers]
        events.append(
            TerminateEvent(
                event_id=uuid.uuid4(),
                session_id=session_id,
                results=results,
                reason="completed" if results else "aborted",
            )
        )
    gaps = draw(st.lists(st.integers(0, 700), min_size=len(events), max_size=len(events)))
    return stamp(events, gaps)


def soup_world() -> World:
    world = make_world(*SOUP)
    add_session(world, "old", "pl0", "pl1", updated_at=at(BASE_MS - 500))
    add_session(world, "gone", status=ENDED)
    return world


def snapshot(world: World) -> tuple[Any, ...]:
    sessions = {
        sid: (
            s.status,
            list(s.roster),
            dict(s.meta),
            s.end_reason,
            s.created_at,
            s.updated_at,
            s.ended_at,
        )
        for sid, s in world.sessions.items()
    }
    players = {
        key: (p.wallet, p.win_count, p.loss_count, p.earnings) for key, p in world.players.items()
    }
    return sessions, players, dict(world.live_session_of), set(world.processed)


@settings(max_examples=400, deadline=None)
@given(
    soups(),
    st.lists(st.integers(0, 5), min_size=1, max_size=4).filter(any),
    st.lists(st.booleans(), min_size=1, max_size=4),
    st.booleans(),
    st.sampled_from([500, 2_000, 60_000]),
    st.sampled_from([0, 1_000, 5_000]),
)
def test_decisions_do_not_depend_on_the_batches(
    published: list[PlannedEntry],
    sizes: list[int],
    restarts: list[bool],
    horizons: bool,
    max_wait_ms: int,
    session_timeout_ms: int,
) -> None:
    """One batch, batches with the waiters kept, batches with new workers: the same
    decisions (dead letters included), the same tables. At the end every waiter has
    timed out."""
    limits = Limits(max_wait_ms=max_wait_ms, session_timeout_ms=session_timeout_ms)
    final = published[-1].ms + max_wait_ms + 1
    ways: dict[str, dict[str, Any]] = {
        "one batch": {},
        "split": {"sizes": sizes, "horizons": horizons},
        "split, new workers": {"sizes": sizes, "restarts": [True, *restarts]},
    }
    seen: dict[str, tuple[Consumed, tuple[Any, ...]]] = {}
    for way, options in ways.items():
        world = soup_world()
        consumed = consume(world, published, limits=limits, final_horizon=final, **options)
        assert consumed.waiting == []
        check_live_sessions(world)
        seen[way] = (consumed, snapshot(world))
    one, one_world = seen["one batch"]
    for way in ("split", "split, new workers"):
        consumed, world_after = seen[way]
        assert consumed.decided == one.decided, way
        assert consumed.results == one.results and consumed.expired == one.expired, way
        assert world_after == one_world, way
    assert sorted(p.entry_id for p in published) == sorted(d[1] for d in one.decided)
