"""The game-event planner (domain/planner.py): every decision of docs/protocol.md,
"Delivery", in memory.

Entries are given to `plan_batch` in their merged order, as the worker does. Unless a
test says otherwise, each new entry is one millisecond after the last (`entry`), so a
test's entries are far inside `max_wait_ms` and its sessions far inside
`session_timeout_ms`; the rules on time (test_planner_waiting.py) set the ids.
"""

from __future__ import annotations

import itertools
import random
import uuid
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from usermgmt.domain.errors import DeadLetterReason
from usermgmt.domain.events import GameEvent, Result, TerminateEvent, UpdateEvent
from usermgmt.domain.games import (
    APPLIED,
    BIGINT_MAX,
    DUPLICATE,
    ENDED,
    Changes,
    Decision,
    Order,
    Outcome,
    PlannedEntry,
    Player,
    ResultRow,
    Session,
    World,
    event_usernames,
)
from usermgmt.domain.planner import Plan, plan_batch
from usermgmt.domain.waiting import Limits, Waiters

BASE_MS = 1_700_000_000_000
NOW = datetime.fromtimestamp(1_700_000_000, UTC)  # the time of an entry "1700000000000-<seq>"
EARLIER = NOW - timedelta(hours=1)
LIMITS = Limits()
WAITING = "waiting"  # what `decide` reports for an entry left waiting
_CLOCK = itertools.count(BASE_MS + 1)


def at(ms: int) -> datetime:
    """Entry-id time: the moment of an entry id's millisecond."""
    return datetime.fromtimestamp(ms / 1000, UTC)


# -- the world and the events ------------------------------------------------------------


def make_world(*names: str, wallet: int = 0) -> World:
    players = {
        name.lower(): Player(
            id=number,
            username=name,
            stats_id=100 + number,
            wallet=wallet,
            win_count=0,
            loss_count=0,
            earnings=0,
        )
        for number, name in enumerate(names, start=1)
    }
    return World(players=players, sessions={}, live_session_of={}, processed=set())


def add_session(
    world: World,
    session_id: str,
    *names: str,
    status: str = "in_progress",
    updated_at: datetime = EARLIER,
) -> Session:
    """A session already in the database; an ended one has no roster left (as loaded)."""
    roster = sorted(world.players[name.lower()].id for name in names)
    if status == ENDED:
        roster = []
    session = Session(
        session_id, status, roster, {}, updated_at, updated_at, pk=len(world.sessions) + 1
    )
    world.sessions[session_id] = session
    if status != ENDED:
        for user_id in roster:
            world.live_session_of[user_id] = session_id
    return session


def update(session_id: str, *players: str, **fields: object) -> UpdateEvent:
    return UpdateEvent.model_validate(
        {
            "event_id": fields.pop("event_id", None) or str(uuid.uuid4()),
            "session_id": session_id,
            "players": list(players),
            **fields,
        }
    )


def terminate(session_id: str, *results: tuple[str, str, int], **fields: object) -> TerminateEvent:
    return TerminateEvent.model_validate(
        {
            "event_id": fields.pop("event_id", None) or str(uuid.uuid4()),
            "session_id": session_id,
            "results": [
                {"username": name, "outcome": outcome, "earnings": earnings}
                for name, outcome, earnings in results
            ],
            **fields,
        }
    )


def kind_of(event: GameEvent) -> str:
    return "update" if isinstance(event, UpdateEvent) else "terminate"


def entry(event: GameEvent, ms: int | None = None, seq: int = 0) -> PlannedEntry:
    """A planned entry; by default one millisecond after the last one made."""
    return PlannedEntry(event, kind_of(event), f"{next(_CLOCK) if ms is None else ms}-{seq}")


def ids(world: World, *names: str) -> list[int]:
    return [world.players[name.lower()].id for name in names]


# -- the adapter: one batch, and what became of each of its entries ------------------------


@dataclass
class Run:
    entries: list[PlannedEntry]
    plan: Plan
    waiters: Waiters

    @property
    def changes(self) -> Changes:
        return self.plan.changes

    @property
    def decisions(self) -> list[Decision | None]:
        """The final decision of each input entry, in input order (None: waiting)."""
        by_order = {planned.order: decision for planned, decision in self.plan.decided}
        return [by_order.get(planned.order) for planned in self.entries]

    @property
    def outcomes(self) -> list[Outcome | str]:
        return [WAITING if d is None else d.outcome for d in self.decisions]

    @property
    def sequence(self) -> list[int | str]:
        """The decided entries in the order decided: input index, or the entry id of a
        waiter from an earlier batch."""
        index = {planned.order: number for number, planned in enumerate(self.entries)}
        return [index.get(planned.order, planned.entry_id) for planned, _ in self.plan.decided]

    def waits_for(self, number: int) -> str:
        return self.waiters.by_order[self.entries[number].order].waits_for


def check_plan(plan: Plan, waiters: Waiters, entries: Sequence[PlannedEntry]) -> None:
    """What every plan keeps: each entry decided at most once, or else waiting."""
    decided = [planned.order for planned, _ in plan.decided]
    assert len(decided) == len(set(decided)), "an entry decided twice"
    assert not set(decided) & set(waiters.by_order), "an entry both decided and waiting"
    for planned in entries:
        assert planned.order in decided or planned.order in waiters.by_order, planned
    assert all(waiter.entry.order in waiters.by_order for waiter in plan.waits_added)
    assert all(planned.order in decided for planned in plan.waits_removed)
    assert all(d.outcome is not Outcome.DEFERRED for _, d in plan.decided)


def decide(
    world: World,
    *items: GameEvent | PlannedEntry,
    waiters: Waiters | None = None,
    limits: Limits = LIMITS,
    horizon_ms: int | None = None,
    restored: Sequence[tuple[PlannedEntry, str]] = (),
) -> Run:
    """Plan one batch of `items` (events get the next entry ids), in the order given."""
    entries = [item if isinstance(item, PlannedEntry) else entry(item) for item in items]
    orders = [planned.order for planned in entries]
    assert orders == sorted(orders), "a test must give entries in their merged order"
    waiters = Waiters() if waiters is None else waiters
    plan = plan_batch(world, entries, waiters, limits, horizon_ms, restored)
    check_plan(plan, waiters, entries)
    return Run(entries, plan, waiters)


class WaitingTable:
    """The waiting entries as a worker records them, from `waits_added` / `waits_removed`."""

    def __init__(self) -> None:
        self.rows: dict[Order, tuple[PlannedEntry, str]] = {}

    def record(self, plan: Plan) -> None:
        for planned in plan.waits_removed:
            del self.rows[planned.order]  # only what was recorded is removed
        for waiter in plan.waits_added:
            self.rows[waiter.entry.order] = (waiter.entry, waiter.waits_for)

    def restored(self) -> list[tuple[PlannedEntry, str]]:
        """As a new worker loads them (in no particular order)."""
        return list(reversed(self.rows.values()))


class Worker:
    """Batches as the event worker runs them: its waiters kept from batch to batch, or
    (`restart`) a new worker for every batch, with only the recorded waiting entries."""

    def __init__(self, world: World, restart: bool = False, limits: Limits = LIMITS) -> None:
        self.world = world
        self.restart = restart
        self.limits = limits
        self.waiters = Waiters()
        self.table = WaitingTable()

    def batch(self, *items: GameEvent | PlannedEntry, horizon_ms: int | None = None) -> Run:
        restored: list[tuple[PlannedEntry, str]] = []
        if self.restart:
            self.waiters, restored = Waiters(), self.table.restored()
        run = decide(
            self.world,
            *items,
            waiters=self.waiters,
            limits=self.limits,
            horizon_ms=horizon_ms,
            restored=restored,
        )
        self.table.record(run.plan)
        assert {order: w.waits_for for order, w in self.waiters.by_order.items()} == {
            order: waits_for for order, (_, waits_for) in self.table.rows.items()
        }, "what is recorded is what waits"
        return run

    def waits_for(self, planned: PlannedEntry) -> str:
        return self.waiters.by_order[planned.order].waits_for


RESTART = pytest.mark.parametrize("restart", [False, True], ids=["kept", "new worker"])


# -- update --------------------------------------------------------------------------


def test_update_creates_a_live_session() -> None:
    world = make_world("alice", "bob")
    event = update("s1", "alice", "bob", status="waiting", meta={"map": "dust"})
    planned = entry(event, ms=BASE_MS, seq=7)
    run = decide(world, planned)
    assert run.plan.decided == [(planned, APPLIED)]
    session = world.sessions["s1"]
    assert (session.status, session.roster, session.meta) == ("waiting", [1, 2], {"map": "dust"})
    # Entry-id time, not the wall clock: a replay writes the same times.
    assert session.created_at == session.updated_at == NOW
    assert session.pk is None and not session.ended and session.ended_at is None
    changes = run.changes
    assert changes.sessions == {"s1": session}
    assert changes.membership == {1: "s1", 2: "s1"}
    assert changes.membership_before == {1: None, 2: None}
    assert world.live_session_of == {1: "s1", 2: "s1"}
    assert [row[:3] for row in changes.processed] == [
        (str(event.event_id), "update", planned.entry_id)
    ]
    assert str(event.event_id) in world.processed
    assert changes.touched_sessions == {"s1"}
    assert changes.touched_users == {1, 2}
    assert not changes.stats and not changes.results
    assert not (run.plan.waits_added or run.plan.waits_removed or run.plan.expired_sessions)
    assert len(run.waiters) == 0


def test_update_replaces_roster_status_and_meta() -> None:
    world = make_world("alice", "bob", "carol")
    add_session(world, "s1", "alice", "bob", status="waiting")
    world.sessions["s1"].meta = {"map": "old"}
    planned = entry(update("s1", "bob", "carol", meta={"round": 2}))
    run = decide(world, planned)
    assert run.outcomes == [Outcome.APPLIED]
    session = world.sessions["s1"]
    assert session.roster == [2, 3]
    assert (session.status, session.meta) == ("in_progress", {"round": 2})
    assert (session.created_at, session.updated_at) == (EARLIER, at(planned.ms))
    changes = run.changes
    assert changes.membership == {1: None, 2: "s1", 3: "s1"}
    # What each was in before the batch: only alice's and carol's rows change.
    assert changes.membership_before == {1: "s1", 2: "s1", 3: None}
    assert world.live_session_of == {2: "s1", 3: "s1"}
    assert changes.touched_users == {1, 2, 3}
    assert changes.touched_sessions == {"s1"}


def test_session_times_are_the_times_of_its_entries() -> None:
    world = make_world("alice")
    start = entry(update("s1", "alice", status="waiting"), ms=BASE_MS + 1_000)
    again = entry(update("s1", "alice"), ms=BASE_MS + 5_000)
    end = entry(terminate("s1", ("alice", "win", 1)), ms=BASE_MS + 9_000)
    decide(world, start)
    session = world.sessions["s1"]
    assert session.created_at == session.updated_at == at(BASE_MS + 1_000)
    decide(world, again)
    assert (session.created_at, session.updated_at) == (at(BASE_MS + 1_000), at(BASE_MS + 5_000))
    decide(world, end)
    assert session.ended_at == session.updated_at == at(BASE_MS + 9_000)
    assert session.created_at == at(BASE_MS + 1_000)


def test_membership_before_is_the_state_at_the_start_of_the_batch() -> None:
    world = make_world("alice", "bob")
    add_session(world, "s1", "alice")
    run = decide(
        world,
        terminate("s1", ("alice", "win", 5)),
        update("s2", "alice", "bob"),
        update("s2", "bob"),
    )
    assert run.outcomes == [Outcome.APPLIED] * 3
    assert run.changes.membership == {1: None, 2: "s2"}
    assert run.changes.membership_before == {1: "s1", 2: None}


def test_player_names_match_case_insensitively() -> None:
    world = make_world("Alice", "bob")
    run = decide(world, update("s1", "ALICE", "Bob"))
    assert run.outcomes == [Outcome.APPLIED]
    assert world.sessions["s1"].roster == [1, 2]


def test_update_with_an_unknown_player_is_dead() -> None:
    world = make_world("alice")
    run = decide(world, update("s1", "alice", "ghost"))
    [decision] = run.decisions
    assert decision is not None and decision.outcome is Outcome.DEAD
    assert decision.reason is DeadLetterReason.UNKNOWN_USER
    assert "ghost" in decision.message and "alice" not in decision.message
    assert run.changes.empty and "s1" not in world.sessions and not world.processed


def test_update_of_an_ended_session_is_dead() -> None:
    world = make_world("alice", "bob")
    add_session(world, "s1", "alice", status=ENDED)
    run = decide(world, update("s1", "alice", "bob"))
    [decision] = run.decisions
    assert decision is not None and decision.outcome is Outcome.DEAD
    assert decision.reason is DeadLetterReason.SESSION_ENDED
    assert run.changes.empty
    assert world.live_session_of == {}


def test_an_update_of_the_players_own_session_is_not_busy() -> None:
    world = make_world("alice", "bob")
    add_session(world, "s1", "alice")
    assert decide(world, update("s1", "alice", "bob")).outcomes == [Outcome.APPLIED]
    assert world.live_session_of == {1: "s1", 2: "s1"}


# -- an update naming a busy player waits ------------------------------------------------


def test_update_naming_a_busy_player_waits() -> None:
    world = make_world("alice", "bob")
    add_session(world, "s0", "alice")
    run = decide(world, update("s1", "bob", "alice"))
    assert run.outcomes == [WAITING]
    assert run.plan.decided == []
    [waiter] = run.waiters
    assert waiter.entry is run.entries[0]
    assert waiter.holds  # later entries of s1, and updates wanting its players, queue
    assert "alice" in waiter.waits_for and "s0" in waiter.waits_for
    assert run.plan.waits_added == [waiter] and run.plan.waits_removed == []
    # Nothing of it is applied: bob, who is free, is not put into s1 either.
    assert run.changes.empty and "s1" not in world.sessions
    assert world.live_session_of == {1: "s0"} and not world.processed


def test_a_waiting_update_applies_as_soon_as_the_terminate_frees_the_player() -> None:
    world = make_world("alice", "bob", "carol", "dave")
    add_session(world, "s0", "alice")
    run = decide(
        world,
        update("s1", "alice", "bob"),  # waits for alice
        update("s2", "carol"),
        terminate("s0", ("alice", "win", 5)),  # frees alice: s1 goes at once ...
        update("s3", "dave"),  # ... before the next entry
    )
    assert run.outcomes == [Outcome.APPLIED] * 4
    assert run.sequence == [1, 2, 0, 3]
    assert [row[1] for row in run.changes.processed] == [
        "update",
        "terminate",
        "update",
        "update",
    ]
    assert world.live_session_of == {1: "s1", 2: "s1", 3: "s2", 4: "s3"}
    assert run.changes.membership_before == {1: "s0", 2: None, 3: None, 4: None}
    # Waited and decided within the batch: there is nothing to record.
    assert not run.plan.waits_added and not run.plan.waits_removed and len(run.waiters) == 0


def test_busy_player_is_free_once_the_other_session_ends() -> None:
    world = make_world("alice", "bob")
    add_session(world, "s0", "alice")
    run = decide(world, terminate("s0", ("alice", "win", 5)), update("s1", "alice", "bob"))
    assert run.outcomes == [Outcome.APPLIED, Outcome.APPLIED]
    assert world.live_session_of == {1: "s1", 2: "s1"}
    assert run.changes.membership == {1: "s1", 2: "s1"}


def test_an_update_that_drops_a_player_frees_them() -> None:
    world = make_world("alice", "bob")
    add_session(world, "s0", "alice", "bob")
    run = decide(world, update("s1", "alice"), update("s0", "bob"))
    assert run.outcomes == [Outcome.APPLIED, Outcome.APPLIED]
    assert run.sequence == [1, 0]
    assert world.live_session_of == {1: "s1", 2: "s0"}
    assert world.sessions["s0"].roster == [2]


@RESTART
def test_a_waiting_update_is_decided_again_in_a_later_batch(restart: bool) -> None:
    world = make_world("alice", "bob")
    add_session(world, "s0", "alice")
    worker = Worker(world, restart)
    first = worker.batch(update("s1", "alice", "bob"))
    assert first.outcomes == [WAITING]
    waiting = first.entries[0]
    assert worker.table.restored() == [(waiting, worker.waits_for(waiting))]
    second = worker.batch(terminate("s0", ("alice", "win", 5)))
    assert second.sequence == [0, waiting.entry_id]
    assert second.plan.decided[1] == (waiting, APPLIED)
    assert second.plan.waits_removed == [waiting] and not second.plan.waits_added
    assert len(worker.waiters) == 0 and worker.table.rows == {}
    assert world.live_session_of == {1: "s1", 2: "s1"}
    assert second.changes.membership_before == {1: "s0", 2: None}


# -- terminate -----------------------------------------------------------------------


def test_terminate_credits_results_and_ends_the_session() -> None:
    world = make_world("alice", "bob", "carol", wallet=10)
    add_session(world, "s1", "alice", "bob", "carol")
    end = entry(terminate("s1", ("alice", "win", 150), ("bob", "loss", 7)))
    run = decide(world, end)
    assert run.outcomes == [Outcome.APPLIED]
    alice, bob, carol = (world.players[name] for name in ("alice", "bob", "carol"))
    assert (alice.win_count, alice.loss_count, alice.earnings, alice.wallet) == (1, 0, 150, 160)
    assert (bob.win_count, bob.loss_count, bob.earnings, bob.wallet) == (0, 1, 7, 17)
    assert (carol.win_count, carol.loss_count, carol.earnings, carol.wallet) == (0, 0, 0, 10)
    changes = run.changes
    assert {uid: (d.wins, d.losses, d.earnings) for uid, d in changes.stats.items()} == {
        1: (1, 0, 150),
        2: (0, 1, 7),
    }
    assert changes.results == [ResultRow("s1", 1, "win", 150), ResultRow("s1", 2, "loss", 7)]
    session = world.sessions["s1"]
    assert session.ended and session.end_reason == "completed"
    assert session.ended_at == session.updated_at == at(end.ms)
    assert session.roster == [1, 2, 3]  # the roster is kept: the results name it
    # Everyone on the roster is free, including the player without a result.
    assert changes.membership == {1: None, 2: None, 3: None}
    assert world.live_session_of == {}
    assert changes.touched_users == {1, 2, 3}
    assert changes.touched_sessions == {"s1"}
    assert changes.sessions == {"s1": session}


def test_an_aborted_game_without_results_only_ends_the_session() -> None:
    world = make_world("alice")
    add_session(world, "s1", "alice")
    run = decide(world, terminate("s1", reason="aborted"))
    assert run.outcomes == [Outcome.APPLIED]
    assert world.sessions["s1"].end_reason == "aborted"
    assert not run.changes.stats and not run.changes.results
    assert run.changes.membership == {1: None}


def dead_letter_of(run: Run, reason: DeadLetterReason) -> str:
    """The message of the one decision of `run`, which must dead-letter for `reason`."""
    [decision] = run.decisions
    assert decision is not None and decision.outcome is Outcome.DEAD
    assert decision.reason is reason
    return decision.message


def test_terminate_naming_an_unknown_player_is_dead() -> None:
    world = make_world("alice")
    add_session(world, "s1", "alice")
    run = decide(world, terminate("s1", ("alice", "win", 1), ("ghost", "loss", 0)))
    assert "ghost" in dead_letter_of(run, DeadLetterReason.UNKNOWN_USER)
    assert run.changes.empty and not world.sessions["s1"].ended
    assert world.players["alice"].earnings == 0


def test_terminate_naming_an_unknown_player_is_dead_before_its_update() -> None:
    world = make_world("alice")
    run = decide(world, terminate("s1", ("ghost", "win", 1)))
    assert run.outcomes == [Outcome.DEAD] and len(run.waiters) == 0


def test_terminate_naming_a_player_outside_the_roster_is_dead() -> None:
    world = make_world("alice", "bob")
    add_session(world, "s1", "alice")
    run = decide(world, terminate("s1", ("alice", "win", 1), ("bob", "loss", 0)))
    message = dead_letter_of(run, DeadLetterReason.NOT_IN_ROSTER)
    assert "bob" in message and "alice" not in message
    assert run.changes.empty and not world.sessions["s1"].ended


def test_terminate_taking_a_wallet_past_bigint_is_dead_and_credits_nobody() -> None:
    """SQLite would store such a wallet as a float, PostgreSQL refuse it: both decide it
    here, alike, and a replay decides it again."""
    world = make_world("alice", "bob", wallet=BIGINT_MAX - 10)
    add_session(world, "s1", "alice", "bob")
    run = decide(world, terminate("s1", ("alice", "loss", 0), ("bob", "win", 11)))
    message = dead_letter_of(run, DeadLetterReason.INVALID_EVENT)
    assert "bob" in message and "alice" not in message
    assert run.changes.empty and not world.sessions["s1"].ended
    assert world.players["alice"].loss_count == 0
    exactly = decide(world, terminate("s1", ("alice", "loss", 0), ("bob", "win", 10)))
    assert exactly.outcomes == [Outcome.APPLIED]
    assert world.players["bob"].wallet == BIGINT_MAX


def test_terminate_of_an_ended_session_is_dead() -> None:
    world = make_world("alice")
    add_session(world, "s1", "alice", status=ENDED)
    run = decide(world, terminate("s1", ("alice", "win", 100)))
    [decision] = run.decisions
    assert decision is not None and decision.reason is DeadLetterReason.SESSION_ENDED
    assert run.changes.empty and world.players["alice"].earnings == 0


def test_second_terminate_in_one_batch_is_dead() -> None:
    world = make_world("alice")
    add_session(world, "s1", "alice")
    run = decide(
        world, terminate("s1", ("alice", "win", 100)), terminate("s1", ("alice", "win", 100))
    )
    assert run.outcomes == [Outcome.APPLIED, Outcome.DEAD]
    assert run.decisions[1] is not None
    assert run.decisions[1].reason is DeadLetterReason.SESSION_ENDED
    assert world.players["alice"].earnings == 100
    assert len(run.changes.results) == 1


# -- a terminate before its session's first update ------------------------------------------


def test_terminate_of_an_unknown_session_waits_holding_nothing() -> None:
    world = make_world("alice")
    run = decide(world, terminate("s1", ("alice", "win", 1)))
    assert run.outcomes == [WAITING]
    [waiter] = run.waiters
    assert not waiter.holds  # the update it waits for must be able to pass it
    assert "first update of session s1" in waiter.waits_for
    assert run.waiters.holder_before(entry(update("s1", "alice"))) is None
    assert run.changes.empty and not world.processed and "s1" not in world.sessions


def test_terminate_published_before_its_update_applies_right_after_it() -> None:
    world = make_world("alice", "bob", "carol", "dave")
    run = decide(
        world,
        terminate("s1", ("alice", "win", 40), ("bob", "loss", 0)),
        update("s2", "carol"),
        update("s1", "alice", "bob"),
        update("s3", "dave"),
    )
    assert run.outcomes == [Outcome.APPLIED] * 4
    assert run.sequence == [1, 2, 0, 3]
    assert world.sessions["s1"].ended
    assert world.players["alice"].earnings == 40
    assert world.live_session_of == {3: "s2", 4: "s3"}
    assert [row[1] for row in run.changes.processed] == [
        "update",
        "update",
        "terminate",
        "update",
    ]


@RESTART
def test_an_update_passes_the_terminate_waiting_for_it_even_when_it_waits_itself(
    restart: bool,
) -> None:
    world = make_world("alice", "bob")
    add_session(world, "s0", "alice")
    worker = Worker(world, restart)
    first = worker.batch(
        terminate("s1", ("alice", "win", 40)),
        update("s1", "alice", "bob"),  # waits for alice, not behind the terminate
    )
    early, start = first.entries
    assert first.outcomes == [WAITING, WAITING]
    assert "first update of session s1" in worker.waits_for(early)
    assert "alice" in worker.waits_for(start) and "s0" in worker.waits_for(start)
    second = worker.batch(terminate("s0", ("alice", "loss", 0)))
    assert second.sequence == [0, start.entry_id, early.entry_id]
    assert all(decision == APPLIED for _, decision in second.plan.decided)
    assert world.players["alice"].earnings == 40 and world.live_session_of == {}


def test_early_terminate_still_checks_the_roster_of_the_update() -> None:
    world = make_world("alice", "bob")
    run = decide(world, terminate("s1", ("bob", "win", 40)), update("s1", "alice"))
    assert run.outcomes == [Outcome.DEAD, Outcome.APPLIED]
    assert run.sequence == [1, 0]
    assert run.decisions[0] is not None
    assert run.decisions[0].reason is DeadLetterReason.NOT_IN_ROSTER
    assert not world.sessions["s1"].ended


def test_the_first_early_terminate_wins() -> None:
    world = make_world("alice")
    first = terminate("s1", ("alice", "win", 40))
    run = decide(world, first, terminate("s1", ("alice", "win", 99)), update("s1", "alice"))
    assert run.outcomes == [Outcome.APPLIED, Outcome.DEAD, Outcome.APPLIED]
    assert run.sequence == [2, 0, 1]
    assert run.decisions[1] is not None
    assert run.decisions[1].reason is DeadLetterReason.SESSION_ENDED
    assert world.players["alice"].earnings == 40
    assert str(first.event_id) in world.processed


# -- duplicates ----------------------------------------------------------------------


def test_an_event_id_already_processed_is_a_duplicate() -> None:
    world = make_world("alice", "bob")
    add_session(world, "s1", "alice", "bob", status=ENDED)
    event = terminate("s1", ("alice", "win", 100))
    world.processed.add(str(event.event_id))
    run = decide(world, event)
    assert run.plan.decided == [(run.entries[0], DUPLICATE)]
    changes = run.changes
    assert not changes.stats and not changes.results and not changes.processed
    assert not changes.sessions and not changes.membership
    assert world.players["alice"].earnings == 0
    # It still refreshes the caches it would have refreshed.
    assert changes.touched_sessions == {"s1"}
    assert changes.touched_users == {1}


def test_a_duplicate_update_refreshes_the_session_and_its_roster() -> None:
    world = make_world("alice", "bob", "carol")
    add_session(world, "s1", "alice", "bob")
    event = update("s1", "carol")
    world.processed.add(str(event.event_id))
    run = decide(world, event)
    assert run.outcomes == [Outcome.DUPLICATE]
    assert run.changes.touched_sessions == {"s1"}
    assert run.changes.touched_users == {1, 2, 3}
    assert world.sessions["s1"].roster == [1, 2]  # unchanged


def test_a_duplicate_refreshes_every_cache_its_original_touched() -> None:
    world = make_world("alice", "bob", "carol")
    add_session(world, "s1", status=ENDED)
    event = terminate("s1", ("alice", "win", 100))
    world.processed.add(str(event.event_id))
    world.also_touched[str(event.event_id)] = [2, 3]  # on the roster, without a result
    run = decide(world, event)
    assert run.outcomes == [Outcome.DUPLICATE]
    assert run.changes.touched_users == {1, 2, 3}


def test_applied_entries_record_whom_they_touched_beyond_the_players_they_name() -> None:
    world = make_world("alice", "bob", "carol")
    add_session(world, "s1", "alice", "bob", "carol")
    run = decide(
        world,
        update("s1", "alice", "bob"),  # drops carol
        terminate("s1", ("alice", "win", 1)),  # bob finished without a result
        update("s2", "carol"),
    )
    assert [row[1:] for row in run.changes.processed] == [
        ("update", run.entries[0].entry_id, "3"),
        ("terminate", run.entries[1].entry_id, "2"),
        ("update", run.entries[2].entry_id, None),
    ]


def test_the_same_event_twice_in_a_batch_applies_once() -> None:
    world = make_world("alice", "bob")
    start = update("s1", "alice", "bob")
    end = terminate("s1", ("alice", "win", 100), ("bob", "loss", 1))
    run = decide(world, start, start, end, end)
    assert run.outcomes == [
        Outcome.APPLIED,
        Outcome.DUPLICATE,
        Outcome.APPLIED,
        Outcome.DUPLICATE,
    ]
    assert world.players["alice"].earnings == 100
    assert len(run.changes.results) == 2
    assert len(run.changes.processed) == 2


def test_a_duplicate_update_after_its_terminate_is_not_dead() -> None:
    world = make_world("alice")
    start = update("s1", "alice")
    run = decide(world, start, terminate("s1", ("alice", "win", 1)), start)
    assert run.outcomes == [Outcome.APPLIED, Outcome.APPLIED, Outcome.DUPLICATE]


def test_a_waiting_update_published_twice_applies_once() -> None:
    world = make_world("alice", "bob")
    add_session(world, "s0", "alice")
    start = update("s1", "alice", "bob")
    run = decide(world, start, start, terminate("s0", ("alice", "win", 1)))
    assert run.outcomes == [Outcome.APPLIED, Outcome.DUPLICATE, Outcome.APPLIED]
    assert run.sequence == [2, 0, 1]
    assert len(run.changes.processed) == 2
    assert world.live_session_of == {1: "s1", 2: "s1"}


def test_a_waiting_terminate_published_twice_applies_once() -> None:
    world = make_world("alice")
    end = terminate("s1", ("alice", "win", 7))
    run = decide(world, end, end, update("s1", "alice"))
    assert run.outcomes == [Outcome.APPLIED, Outcome.DUPLICATE, Outcome.APPLIED]
    assert run.sequence == [2, 0, 1]
    assert world.players["alice"].earnings == 7
    assert len(run.changes.results) == 1


@RESTART
def test_a_waiting_update_published_twice_across_batches_applies_once(restart: bool) -> None:
    world = make_world("alice", "bob")
    add_session(world, "s0", "alice")
    start = update("s1", "alice", "bob")
    worker = Worker(world, restart)
    first = worker.batch(start, start)
    assert first.outcomes == [WAITING, WAITING]
    second = worker.batch(terminate("s0", ("alice", "win", 1)))
    original, again = first.entries
    assert second.plan.decided[1:] == [(original, APPLIED), (again, DUPLICATE)]
    assert worker.table.rows == {}


# -- what waits behind what -----------------------------------------------------------------


@RESTART
def test_two_updates_asking_for_a_busy_player_get_them_in_entry_id_order(restart: bool) -> None:
    world = make_world("alice", "bob", "carol")
    add_session(world, "s0", "alice")
    add_session(world, "s9", "bob")
    worker = Worker(world, restart)
    first = worker.batch(
        update("s1", "alice", "bob"),  # waits for alice (and will for bob)
        update("s2", "alice", "carol"),  # asked for alice after s1: queues behind it
    )
    one, two = first.entries
    assert first.outcomes == [WAITING, WAITING]
    assert one.entry_id in worker.waits_for(two)
    # alice is free, but s1 asked first: s1 now waits for bob, and s2 still behind s1.
    freed = worker.batch(terminate("s0", ("alice", "win", 1)))
    assert freed.sequence == [0]
    assert world.live_session_of == {2: "s9"}
    assert "bob" in worker.waits_for(one) and "s9" in worker.waits_for(one)
    assert one.entry_id in worker.waits_for(two)
    assert [w.entry for w in freed.plan.waits_added] == [one]  # it waits anew
    # bob is free: s1 starts; s2 waits for alice to leave s1.
    started = worker.batch(terminate("s9", ("bob", "win", 1)))
    assert started.sequence == [0, one.entry_id]
    assert world.live_session_of == {1: "s1", 2: "s1"}
    assert "alice" in worker.waits_for(two) and "s1" in worker.waits_for(two)
    done = worker.batch(terminate("s1", ("alice", "win", 1)))
    assert done.sequence == [0, two.entry_id]
    assert world.live_session_of == {1: "s2", 3: "s2"}
    assert len(worker.waiters) == 0 and worker.table.rows == {}


def test_a_freed_player_goes_to_the_update_that_asked_first() -> None:
    world = make_world("alice", "bob", "carol")
    add_session(world, "s0", "alice")
    run = decide(
        world,
        update("s1", "alice"),  # waits for alice
        update("s2", "alice", "bob"),  # s1 asked for alice first
        update("s3", "bob"),  # and s2 (waiting) asked for bob before s3
        update("s4", "carol"),  # nobody waits for carol
    )
    assert run.outcomes == [WAITING, WAITING, WAITING, Outcome.APPLIED]
    assert "alice" in run.waits_for(0) and "s0" in run.waits_for(0)
    assert run.entries[0].entry_id in run.waits_for(1)
    assert run.entries[1].entry_id in run.waits_for(2)
    assert world.live_session_of == {1: "s0", 3: "s4"}
    # When s0 ends in the same batch, alice goes to s1, and s2 waits for s1 to end.
    world = make_world("alice", "bob", "carol")
    add_session(world, "s0", "alice")
    run = decide(
        world,
        update("s1", "alice"),
        update("s2", "alice", "bob"),
        terminate("s0", ("alice", "win", 5)),
        update("s3", "bob"),
    )
    assert run.outcomes == [Outcome.APPLIED, WAITING, Outcome.APPLIED, WAITING]
    assert run.sequence == [2, 0]
    assert world.live_session_of == {1: "s1"}
    assert "s1" in run.waits_for(1)


def test_an_update_of_the_session_holding_a_player_is_not_queued_behind_others() -> None:
    world = make_world("alice", "bob", "carol")
    add_session(world, "s1", "alice")
    run = decide(
        world,
        update("s2", "alice", "bob"),  # waits for alice to leave s1
        update("s1", "alice", status="waiting"),  # s1 has alice already: no queue
        update("s1", "alice", "carol"),  # nor for carol, whom s2 does not want
        terminate("s1", ("alice", "win", 3)),  # so the game can end ...
    )
    assert run.outcomes == [Outcome.APPLIED] * 4
    assert run.sequence == [1, 2, 3, 0]  # ... and s2 start
    assert world.live_session_of == {1: "s2", 2: "s2"}
    assert world.players["alice"].earnings == 3


@RESTART
def test_later_entries_of_a_session_queue_behind_its_waiting_update(restart: bool) -> None:
    world = make_world("alice", "bob", "carol")
    add_session(world, "s0", "alice")
    worker = Worker(world, restart)
    first = worker.batch(
        update("s1", "alice"),  # alice is busy in s0
        update("s1", "bob"),  # must not overtake the first update of s1
        terminate("s1", ("bob", "win", 5)),  # nor its terminate
        update("s2", "carol"),  # another session is not held back
        update("s3", "alice"),  # s1 asked for alice first
    )
    assert first.outcomes == [WAITING, WAITING, WAITING, Outcome.APPLIED, WAITING]
    start, restart_, end, _, other = first.entries
    assert start.entry_id in worker.waits_for(restart_) and "s1" in worker.waits_for(restart_)
    assert restart_.entry_id in worker.waits_for(end)
    assert start.entry_id in worker.waits_for(other)
    assert all(waiter.holds for waiter in worker.waiters)
    assert "s1" not in world.sessions and "s3" not in world.sessions
    assert world.live_session_of == {1: "s0", 3: "s2"}
    assert "s1" not in first.changes.touched_sessions
    assert [w.entry for w in first.plan.waits_added] == [start, restart_, end, other]

    second = worker.batch(terminate("s0", ("alice", "win", 1)))
    ids = [planned.entry_id for planned in (start, restart_, end, other)]
    assert second.sequence == [0, *ids]
    assert all(decision == APPLIED for _, decision in second.plan.decided)
    assert world.sessions["s1"].ended and world.players["bob"].earnings == 5
    assert world.live_session_of == {1: "s3", 3: "s2"}
    assert len(worker.waiters) == 0 and worker.table.rows == {}


def test_a_terminate_is_never_held_back_by_updates_waiting_for_its_players() -> None:
    world = make_world("alice", "bob", "carol")
    add_session(world, "s0", "alice", "bob")
    run = decide(
        world,
        update("s1", "alice"),  # waits for s0 to end
        update("s2", "bob", "carol"),  # so does this one
        terminate("s0", ("alice", "win", 1), ("bob", "loss", 0)),
    )
    assert run.outcomes == [Outcome.APPLIED] * 3
    assert run.sequence == [2, 0, 1]
    assert world.live_session_of == {1: "s1", 2: "s2", 3: "s2"}


@RESTART
def test_a_terminate_is_not_held_back_by_updates_waiting_since_an_earlier_batch(
    restart: bool,
) -> None:
    world = make_world("alice", "bob", "carol")
    add_session(world, "s0", "alice", "bob")
    worker = Worker(world, restart)
    first = worker.batch(update("s1", "alice"), update("s2", "bob", "carol"))
    assert first.outcomes == [WAITING, WAITING]
    second = worker.batch(terminate("s0", ("alice", "win", 1), ("bob", "loss", 0)))
    assert second.sequence == [0, *(planned.entry_id for planned in first.entries)]
    assert world.live_session_of == {1: "s1", 2: "s2", 3: "s2"}


def test_a_dead_entry_does_not_hold_its_session() -> None:
    world = make_world("alice")
    run = decide(world, update("s1", "alice", "ghost"), update("s1", "alice"))
    assert run.outcomes == [Outcome.DEAD, Outcome.APPLIED]


@pytest.mark.parametrize("ends", ["in game order", "reversed", "shuffled"])
def test_a_chain_of_games_over_two_players_resolves_in_one_batch(ends: str) -> None:
    """Every update published before every terminate: each game waits for the last."""
    games = 60
    world = make_world("alice", "bob", wallet=5)
    starts = [update(f"g{n}", "alice", "bob") for n in range(games)]
    finishes = [
        terminate(f"g{n}", ("alice", "win", n), ("bob", "loss", 2 * n)) for n in range(games)
    ]
    if ends == "reversed":
        finishes.reverse()
    elif ends == "shuffled":
        random.Random(7).shuffle(finishes)
    run = decide(world, *starts, *finishes)
    assert run.outcomes == [Outcome.APPLIED] * (2 * games)
    assert len(run.waiters) == 0 and not run.plan.waits_added and not run.plan.waits_removed
    # Each game applied in full before the next one started.
    sessions = [planned.event.session_id for planned, _ in run.plan.decided]
    assert sessions == [f"g{n // 2}" for n in range(2 * games)]
    alice, bob = world.players["alice"], world.players["bob"]
    total = sum(range(games))
    assert (alice.win_count, alice.loss_count, alice.earnings, alice.wallet) == (
        games,
        0,
        total,
        5 + total,
    )
    assert (bob.win_count, bob.loss_count, bob.earnings, bob.wallet) == (
        0,
        games,
        2 * total,
        5 + 2 * total,
    )
    assert len(run.changes.results) == 2 * games
    assert all(session.ended for session in world.sessions.values())
    assert world.live_session_of == {}
    assert run.changes.membership == {1: None, 2: None}


# -- entries that depend on each other must not wait for each other (bugs) ------------------


def test_a_redelivered_update_does_not_hold_its_game_behind_the_players_next_game() -> None:
    """A producer retrying a publish while the player's next game is already announced.

    s1's update waits for alice (in s0); s2's update asks for alice after it. The retry
    of s1's update must come to nothing (a duplicate), and s1's terminate must end s1 so
    that s2 can start: a valid history, all of it applied.
    """
    world = make_world("alice")
    add_session(world, "s0", "alice")
    start = update("s1", "alice")
    run = decide(
        world,
        start,
        update("s2", "alice"),  # alice's next game, announced early
        start,  # the retry
        terminate("s0", ("alice", "win", 1)),
        terminate("s1", ("alice", "win", 2)),
        terminate("s2", ("alice", "win", 4)),
    )
    assert run.outcomes == [
        Outcome.APPLIED,
        Outcome.APPLIED,
        Outcome.DUPLICATE,
        Outcome.APPLIED,
        Outcome.APPLIED,
        Outcome.APPLIED,
    ]
    assert world.players["alice"].earnings == 7 and world.live_session_of == {}


def test_a_status_update_does_not_hold_its_game_behind_the_players_next_game() -> None:
    """The same with a second update of s1 (a status change, the same roster)."""
    world = make_world("alice")
    add_session(world, "s0", "alice")
    run = decide(
        world,
        update("s1", "alice", status="waiting"),  # waits for alice (in s0)
        update("s2", "alice"),  # alice's next game, announced early
        update("s1", "alice"),  # s1 starts: alice will be in s1 by now
        terminate("s0", ("alice", "win", 1)),
        terminate("s1", ("alice", "win", 2)),
        terminate("s2", ("alice", "win", 4)),
    )
    assert run.outcomes == [Outcome.APPLIED] * 6
    assert world.players["alice"].earnings == 7 and world.live_session_of == {}


def test_event_usernames_collects_every_player_key() -> None:
    events = [update("s1", "Alice", "bob"), terminate("s2", ("CAROL", "win", 1), reason="aborted")]
    assert event_usernames(events) == {"alice", "bob", "carol"}


# -- properties ------------------------------------------------------------------------

POPULATION = [f"player{i}" for i in range(6)]

Described = tuple[str, str, str, str | None, str]  # stream, entry id, outcome, reason, message


def describe(planned: PlannedEntry, decision: Decision) -> Described:
    reason = None if decision.reason is None else str(decision.reason)
    return planned.stream_kind, planned.entry_id, str(decision.outcome), reason, decision.message


def stamp(published: Sequence[GameEvent], gaps: Sequence[int]) -> list[PlannedEntry]:
    """Entry ids for events in publication order (`gaps`: milliseconds before each), in
    the merged order a worker reads them (in one millisecond, updates sort first)."""
    entries = []
    ms = BASE_MS
    seq: Counter[tuple[str, int]] = Counter()
    for event, gap in zip(published, gaps, strict=True):
        ms += gap
        kind = kind_of(event)
        entries.append(PlannedEntry(event, kind, f"{ms}-{seq[kind, ms]}"))
        seq[kind, ms] += 1
    return sorted(entries, key=lambda planned: planned.order)


def check_live_sessions(world: World) -> None:
    """A player is in one live session at most, and `live_session_of` says which."""
    live = {sid: s for sid, s in world.sessions.items() if not s.ended}
    members = [uid for s in live.values() for uid in s.roster]
    assert len(members) == len(set(members))
    assert world.live_session_of == {uid: sid for sid, s in live.items() for uid in s.roster}


@dataclass
class Consumed:
    decided: list[Described]
    results: list[ResultRow]
    expired: list[str]
    waiting: list[str]  # entry ids still waiting at the end


def consume(
    world: World,
    entries: Sequence[PlannedEntry],
    sizes: Sequence[int] = (),
    restarts: Sequence[bool] = (False,),
    horizons: bool = False,
    limits: Limits = LIMITS,
    final_horizon: int | None = None,
) -> Consumed:
    """Decide `entries` as a worker would, in batches of `sizes` (cycled; none: one
    batch). `restarts` (cycled): at each batch boundary, whether a new worker takes over
    (the waiters dropped, restored from what was recorded). `horizons`: each batch but
    the last says every entry before the next batch's first millisecond is known."""
    batches: list[list[PlannedEntry]] = []
    position = 0
    cycle = itertools.cycle(sizes)
    while position < len(entries) or not batches:
        size = next(cycle) if sizes else len(entries)
        batches.append(list(entries[position : position + size]))
        position += size
    waiters = Waiters()
    table = WaitingTable()
    restart = itertools.cycle(restarts)
    out = Consumed([], [], [], [])
    for number, batch in enumerate(batches):
        last = number == len(batches) - 1
        restored: list[tuple[PlannedEntry, str]] = []
        if number and next(restart):
            waiters, restored = Waiters(), table.restored()
        horizon = final_horizon
        if not last:
            upcoming = next((b[0] for b in batches[number + 1 :] if b), None)
            horizon = upcoming.ms if horizons and upcoming is not None else None
        plan = plan_batch(world, batch, waiters, limits, horizon, restored)
        check_plan(plan, waiters, batch)
        table.record(plan)
        assert {order: w.waits_for for order, w in waiters.by_order.items()} == {
            order: waits_for for order, (_, waits_for) in table.rows.items()
        }, "what is recorded is what waits"
        check_live_sessions(world)
        out.decided += [describe(planned, decision) for planned, decision in plan.decided]
        out.results += plan.changes.results
        out.expired += plan.expired_sessions
    out.waiting = [waiter.entry.entry_id for waiter in waiters]
    return out


@dataclass(frozen=True)
class Game:
    updates: tuple[UpdateEvent, ...]
    end: TerminateEvent
    early_end: bool  # the terminate published before the update


@st.composite
def games(draw: st.DrawFn, status_updates: bool = False) -> list[Game]:
    """Games of 1-4 players from a small population, so players are often busy; each
    player's games come one after the other (in game order)."""
    played = []
    for number in range(draw(st.integers(1, 10))):
        roster = draw(st.lists(st.sampled_from(POPULATION), min_size=1, max_size=4, unique=True))
        finishers = draw(st.lists(st.sampled_from(roster), max_size=len(roster), unique=True))
        results = [
            Result(
                username=name,
                outcome=draw(st.sampled_from(["win", "loss"])),
                earnings=draw(st.integers(0, 1_000_000_000)),
            )
            for name in finishers
        ]
        reason = "aborted" if not results else draw(st.sampled_from(["completed", "aborted"]))
        session_id = f"g{number}"
        updates = [UpdateEvent(event_id=uuid.uuid4(), session_id=session_id, players=roster)]
        if status_updates and draw(st.booleans()):  # first "waiting", then "in_progress"
            updates.insert(
                0,
                UpdateEvent(
                    event_id=uuid.uuid4(), session_id=session_id, players=roster, status="waiting"
                ),
            )
        end = TerminateEvent(
            event_id=uuid.uuid4(), session_id=session_id, results=results, reason=reason
        )
        played.append(Game(tuple(updates), end, len(updates) == 1 and draw(st.booleans())))
    return played


@st.composite
def histories(
    draw: st.DrawFn, status_updates: bool = False, retries_anywhere: bool = False
) -> tuple[list[Game], list[PlannedEntry]]:
    """A valid history as racing producers publish it: the events of all games in any
    order, except that a game's updates come in order and before its terminate (unless
    the terminate deliberately comes first). Retries publish an event again, later:
    at the end of the streams, or (`retries_anywhere`) anywhere after the original."""
    played = draw(games(status_updates))
    slots = [number for number, game in enumerate(played) for _ in (*game.updates, game.end)]
    slots = draw(st.permutations(slots))
    positions: defaultdict[int, list[int]] = defaultdict(list)
    for position, number in enumerate(slots):
        positions[number].append(position)
    published: list[GameEvent] = [None] * len(slots)  # type: ignore[list-item]
    for number, game in enumerate(played):
        events: list[GameEvent] = [*game.updates, game.end]
        if game.early_end:
            events = [game.end, *game.updates]
        for position, event in zip(positions[number], events, strict=True):
            published[position] = event
    for _ in range(draw(st.integers(0, 4))):
        original = draw(st.integers(0, len(published) - 1))
        place = len(published)
        if retries_anywhere:
            place = draw(st.integers(original + 1, len(published)))
        published.insert(place, published[original])
    gaps = draw(st.lists(st.integers(0, 2), min_size=len(published), max_size=len(published)))
    return played, stamp(published, gaps)


splits = st.tuples(
    st.lists(st.integers(0, 6), min_size=1, max_size=4).filter(any),
    st.lists(st.booleans(), min_size=1, max_size=4),
    st.booleans(),
)


def check_every_game_credited_once(
    played: list[Game], world: World, wallets: list[int], consumed: Consumed, retries: int
) -> None:
    outcomes = Counter(outcome for _, _, outcome, _, _ in consumed.decided)
    assert outcomes[Outcome.DEAD] == 0, consumed.decided
    assert outcomes[Outcome.APPLIED] == sum(len(game.updates) + 1 for game in played)
    assert outcomes[Outcome.DUPLICATE] == retries
    assert consumed.waiting == [] and consumed.expired == []
    # Results recorded once per game and player, exactly as published.
    expected = sorted(
        ResultRow(game.end.session_id, world.players[r.username].id, r.outcome, r.earnings)
        for game in played
        for r in game.end.results
    )
    assert sorted(consumed.results) == expected
    assert len({(s, u) for s, u, _, _ in consumed.results}) == len(consumed.results)
    # Stats equal the sum of the recorded results; wallets = starting balance + earnings.
    for player, wallet in zip(world.players.values(), wallets, strict=True):
        mine = [r for r in consumed.results if r.user_id == player.id]
        assert player.win_count == sum(1 for r in mine if r.outcome == "win")
        assert player.loss_count == sum(1 for r in mine if r.outcome == "loss")
        assert player.earnings == sum(r.earnings for r in mine)
        assert player.wallet == wallet + player.earnings
    assert all(session.ended for session in world.sessions.values())
    assert {s.end_reason for s in world.sessions.values()} <= {"completed", "aborted"}
    assert len(world.sessions) == len(played)
    assert world.live_session_of == {}


def run_every_way(
    played: list[Game],
    published: list[PlannedEntry],
    split: tuple[list[int], list[bool], bool],
    wallets: list[int],
) -> None:
    """One batch, the split with the waiters kept, and the split with restarts: the
    same decisions, each crediting every game exactly once."""
    sizes, restarts, horizons = split
    retries = len(published) - sum(len(game.updates) + 1 for game in played)
    ways: dict[str, dict[str, Any]] = {
        "one batch": {},
        "split": {"sizes": sizes, "horizons": horizons},
        "split, new workers": {"sizes": sizes, "restarts": [True, *restarts]},
    }
    seen: dict[str, list[Described]] = {}
    for way, options in ways.items():
        world = make_world(*POPULATION)
        for player, wallet in zip(world.players.values(), wallets, strict=True):
            player.wallet = wallet
        consumed = consume(world, published, **options)
        check_every_game_credited_once(played, world, wallets, consumed, retries)
        seen[way] = consumed.decided
    assert seen["split"] == seen["one batch"]
    assert seen["split, new workers"] == seen["one batch"]


WALLETS = st.lists(st.integers(0, 10_000), min_size=len(POPULATION), max_size=len(POPULATION))


@settings(max_examples=200, deadline=None)
@given(histories(), splits, WALLETS)
def test_any_order_and_batching_credits_every_game_exactly_once(
    history: tuple[list[Game], list[PlannedEntry]],
    split: tuple[list[int], list[bool], bool],
    wallets: list[int],
) -> None:
    played, published = history
    run_every_way(played, published, split, wallets)


@settings(max_examples=300, deadline=None)
@given(histories(status_updates=True, retries_anywhere=True), splits, WALLETS)
def test_status_updates_and_retries_anywhere_credit_every_game_exactly_once(
    history: tuple[list[Game], list[PlannedEntry]],
    split: tuple[list[int], list[bool], bool],
    wallets: list[int],
) -> None:
    """As above, with a status update in some games and retries published anywhere."""
    played, published = history
    run_every_way(played, published, split, wallets)


@settings(max_examples=150, deadline=None)
@given(games(), splits)
def test_a_player_is_never_in_two_live_sessions(
    played: list[Game], split: tuple[list[int], list[bool], bool]
) -> None:
    """Published in game order (all updates first), so players are busy as often as can
    be; `consume` checks the live sessions after every batch."""
    events: list[GameEvent] = [game.updates[-1] for game in played]
    events += [game.end for game in played]
    published = stamp(events, [1] * len(events))
    sizes, restarts, horizons = split
    one = consume(make_world(*POPULATION), published)
    assert one.waiting == [] and len(one.decided) == len(published)
    assert all(outcome == Outcome.APPLIED for _, _, outcome, _, _ in one.decided)
    kept = consume(make_world(*POPULATION), published, sizes, horizons=horizons)
    fresh = consume(make_world(*POPULATION), published, sizes, [True, *restarts])
    assert kept.decided == one.decided and fresh.decided == one.decided
