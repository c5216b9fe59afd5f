"""The batch planner (domain/games.py): every decision of SPEC §3, in memory."""

from __future__ import annotations

import itertools
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from domain.errors import DeadLetterReason
from domain.events import GameEvent, Result, TerminateEvent, UpdateEvent, entry_order
from domain.games import (
    ENDED,
    Changes,
    Decision,
    Outcome,
    PlannedEntry,
    Player,
    Session,
    Waiting,
    World,
    event_usernames,
    plan_batch,
)

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
EARLIER = NOW - timedelta(hours=1)
_SEQUENCE = itertools.count(1)


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


def add_session(world: World, session_id: str, *names: str, status: str = "in_progress") -> Session:
    """A session already in the database; an ended one has no roster left (as loaded)."""
    roster = sorted(world.players[name.lower()].id for name in names)
    if status == ENDED:
        roster = []
    session = Session(session_id, status, roster, {}, EARLIER, EARLIER, pk=len(world.sessions) + 1)
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


def entry(event: GameEvent) -> PlannedEntry:
    """A planned entry with the next entry id (ids grow in publication order)."""
    kind = "update" if isinstance(event, UpdateEvent) else "terminate"
    return PlannedEntry(event, kind, f"1700000000000-{next(_SEQUENCE)}")


def plan(world: World, *events: GameEvent) -> tuple[list[Outcome], Changes, list[Decision]]:
    decisions, changes = plan_batch(world, [entry(event) for event in events], NOW)
    return [d.outcome for d in decisions], changes, decisions


def ids(world: World, *names: str) -> list[int]:
    return [world.players[name.lower()].id for name in names]


# -- update --------------------------------------------------------------------------


def test_update_creates_a_live_session() -> None:
    world = make_world("alice", "bob")
    event = update("s1", "alice", "bob", status="waiting", meta={"map": "dust"})
    planned = entry(event)
    decisions, changes = plan_batch(world, [planned], NOW)
    assert decisions == [Decision(Outcome.APPLIED)]
    session = world.sessions["s1"]
    assert (session.status, session.roster, session.meta) == ("waiting", [1, 2], {"map": "dust"})
    assert session.created_at == session.updated_at == NOW
    assert session.pk is None and not session.ended
    assert changes.sessions == {"s1": session}
    assert changes.membership == {1: "s1", 2: "s1"}
    assert world.live_session_of == {1: "s1", 2: "s1"}
    assert changes.processed == [(str(event.event_id), "update", planned.entry_id)]
    assert str(event.event_id) in world.processed
    assert changes.touched_sessions == {"s1"}
    assert changes.touched_users == {1, 2}
    assert not changes.stats and not changes.results


def test_update_replaces_roster_status_and_meta() -> None:
    world = make_world("alice", "bob", "carol")
    add_session(world, "s1", "alice", "bob", status="waiting")
    world.sessions["s1"].meta = {"map": "old"}
    outcomes, changes, _ = plan(world, update("s1", "bob", "carol", meta={"round": 2}))
    assert outcomes == [Outcome.APPLIED]
    session = world.sessions["s1"]
    assert session.roster == [2, 3]
    assert (session.status, session.meta) == ("in_progress", {"round": 2})
    assert (session.created_at, session.updated_at) == (EARLIER, NOW)
    assert changes.membership == {1: None, 2: "s1", 3: "s1"}
    # What each was in before the batch: only alice's and carol's rows change.
    assert changes.membership_before == {1: "s1", 2: "s1", 3: None}
    assert world.live_session_of == {2: "s1", 3: "s1"}
    assert changes.touched_users == {1, 2, 3}


def test_membership_before_is_the_state_at_the_start_of_the_batch() -> None:
    world = make_world("alice", "bob")
    add_session(world, "s1", "alice")
    _, changes, _ = plan(
        world,
        terminate("s1", ("alice", "win", 5)),
        update("s2", "alice", "bob"),
        update("s2", "bob"),
    )
    assert changes.membership == {1: None, 2: "s2"}
    assert changes.membership_before == {1: "s1", 2: None}


def test_player_names_match_case_insensitively() -> None:
    world = make_world("Alice", "bob")
    outcomes, _, _ = plan(world, update("s1", "ALICE", "Bob"))
    assert outcomes == [Outcome.APPLIED]
    assert world.sessions["s1"].roster == [1, 2]


def test_update_with_an_unknown_player_is_dead() -> None:
    world = make_world("alice")
    outcomes, changes, decisions = plan(world, update("s1", "alice", "ghost"))
    assert outcomes == [Outcome.DEAD]
    assert decisions[0].reason is DeadLetterReason.UNKNOWN_USER
    assert "ghost" in decisions[0].message
    assert changes.empty and "s1" not in world.sessions


def test_update_of_an_ended_session_is_dead() -> None:
    world = make_world("alice", "bob")
    add_session(world, "s1", "alice", status=ENDED)
    outcomes, changes, decisions = plan(world, update("s1", "alice", "bob"))
    assert outcomes == [Outcome.DEAD]
    assert decisions[0].reason is DeadLetterReason.SESSION_ENDED
    assert changes.empty
    assert world.live_session_of == {}


def test_update_naming_a_busy_player_is_deferred() -> None:
    world = make_world("alice", "bob")
    add_session(world, "s0", "alice")
    outcomes, changes, decisions = plan(world, update("s1", "alice", "bob"))
    assert outcomes == [Outcome.DEFERRED]
    assert decisions[0].holds_session
    assert "alice" in decisions[0].message and "s0" in decisions[0].message
    assert changes.empty and "s1" not in world.sessions
    assert world.live_session_of == {1: "s0"}


def test_busy_player_is_free_once_the_other_session_ends() -> None:
    world = make_world("alice", "bob")
    add_session(world, "s0", "alice")
    outcomes, changes, _ = plan(
        world, terminate("s0", ("alice", "win", 5)), update("s1", "alice", "bob")
    )
    assert outcomes == [Outcome.APPLIED, Outcome.APPLIED]
    assert world.live_session_of == {1: "s1", 2: "s1"}
    assert changes.membership == {1: "s1", 2: "s1"}


def test_an_update_of_the_players_own_session_is_not_busy() -> None:
    world = make_world("alice", "bob")
    add_session(world, "s1", "alice")
    assert plan(world, update("s1", "alice", "bob"))[0] == [Outcome.APPLIED]


# -- terminate -----------------------------------------------------------------------


def test_terminate_credits_results_and_ends_the_session() -> None:
    world = make_world("alice", "bob", "carol", wallet=10)
    add_session(world, "s1", "alice", "bob", "carol")
    outcomes, changes, _ = plan(world, terminate("s1", ("alice", "win", 150), ("bob", "loss", 7)))
    assert outcomes == [Outcome.APPLIED]
    alice, bob, carol = (world.players[name] for name in ("alice", "bob", "carol"))
    assert (alice.win_count, alice.loss_count, alice.earnings, alice.wallet) == (1, 0, 150, 160)
    assert (bob.win_count, bob.loss_count, bob.earnings, bob.wallet) == (0, 1, 7, 17)
    assert (carol.win_count, carol.loss_count, carol.earnings, carol.wallet) == (0, 0, 0, 10)
    assert {uid: (d.wins, d.losses, d.earnings) for uid, d in changes.stats.items()} == {
        1: (1, 0, 150),
        2: (0, 1, 7),
    }
    assert sorted((r.session_id, r.user_id, r.outcome, r.earnings) for r in changes.results) == [
        ("s1", 1, "win", 150),
        ("s1", 2, "loss", 7),
    ]
    session = world.sessions["s1"]
    assert session.ended and session.end_reason == "completed"
    assert session.ended_at == session.updated_at == NOW
    # Everyone on the roster is free, including the player without a result.
    assert changes.membership == {1: None, 2: None, 3: None}
    assert world.live_session_of == {}
    assert changes.touched_users == {1, 2, 3}
    assert changes.touched_sessions == {"s1"}


def test_an_aborted_game_without_results_only_ends_the_session() -> None:
    world = make_world("alice")
    add_session(world, "s1", "alice")
    outcomes, changes, _ = plan(world, terminate("s1", reason="aborted"))
    assert outcomes == [Outcome.APPLIED]
    assert world.sessions["s1"].end_reason == "aborted"
    assert not changes.stats and not changes.results
    assert changes.membership == {1: None}


def test_terminate_naming_an_unknown_player_is_dead() -> None:
    world = make_world("alice")
    add_session(world, "s1", "alice")
    outcomes, changes, decisions = plan(
        world, terminate("s1", ("alice", "win", 1), ("ghost", "loss", 0))
    )
    assert outcomes == [Outcome.DEAD]
    assert decisions[0].reason is DeadLetterReason.UNKNOWN_USER
    assert changes.empty and not world.sessions["s1"].ended
    assert world.players["alice"].earnings == 0


def test_terminate_naming_a_player_outside_the_roster_is_dead() -> None:
    world = make_world("alice", "bob")
    add_session(world, "s1", "alice")
    outcomes, changes, decisions = plan(
        world, terminate("s1", ("alice", "win", 1), ("bob", "loss", 0))
    )
    assert outcomes == [Outcome.DEAD]
    assert decisions[0].reason is DeadLetterReason.NOT_IN_ROSTER
    assert "bob" in decisions[0].message
    assert changes.empty and not world.sessions["s1"].ended


def test_terminate_of_an_ended_session_is_dead() -> None:
    world = make_world("alice")
    add_session(world, "s1", "alice", status=ENDED)
    outcomes, changes, decisions = plan(world, terminate("s1", ("alice", "win", 100)))
    assert outcomes == [Outcome.DEAD]
    assert decisions[0].reason is DeadLetterReason.SESSION_ENDED
    assert changes.empty and world.players["alice"].earnings == 0


def test_second_terminate_in_one_batch_is_dead() -> None:
    world = make_world("alice")
    add_session(world, "s1", "alice")
    outcomes, changes, decisions = plan(
        world, terminate("s1", ("alice", "win", 100)), terminate("s1", ("alice", "win", 100))
    )
    assert outcomes == [Outcome.APPLIED, Outcome.DEAD]
    assert decisions[1].reason is DeadLetterReason.SESSION_ENDED
    assert world.players["alice"].earnings == 100
    assert len(changes.results) == 1


def test_terminate_of_an_unknown_session_waits() -> None:
    world = make_world("alice")
    outcomes, changes, decisions = plan(world, terminate("s1", ("alice", "win", 1)))
    assert outcomes == [Outcome.DEFERRED]
    assert not decisions[0].holds_session  # the update it waits for must pass it
    assert changes.empty and not world.processed


def test_terminate_published_before_its_update_applies_after_it() -> None:
    world = make_world("alice", "bob")
    outcomes, changes, _ = plan(
        world,
        terminate("s1", ("alice", "win", 40), ("bob", "loss", 0)),
        update("s1", "alice", "bob"),
    )
    assert outcomes == [Outcome.APPLIED, Outcome.APPLIED]
    assert world.sessions["s1"].ended
    assert world.players["alice"].earnings == 40
    assert world.live_session_of == {}
    # The update's event id is recorded before the terminate's: the order they applied in.
    assert [stream for _, stream, _ in changes.processed] == ["update", "terminate"]


def test_early_terminate_still_checks_the_roster_of_the_update() -> None:
    world = make_world("alice", "bob")
    outcomes, _, decisions = plan(world, terminate("s1", ("bob", "win", 40)), update("s1", "alice"))
    assert outcomes == [Outcome.DEAD, Outcome.APPLIED]
    assert decisions[0].reason is DeadLetterReason.NOT_IN_ROSTER
    assert not world.sessions["s1"].ended


def test_the_first_early_terminate_wins() -> None:
    world = make_world("alice")
    first = terminate("s1", ("alice", "win", 40))
    outcomes, _, _ = plan(
        world, first, terminate("s1", ("alice", "win", 99)), update("s1", "alice")
    )
    assert outcomes == [Outcome.APPLIED, Outcome.DEFERRED, Outcome.APPLIED]
    assert world.players["alice"].earnings == 40
    assert str(first.event_id) in world.processed


# -- duplicates ----------------------------------------------------------------------


def test_an_event_id_already_processed_is_a_duplicate() -> None:
    world = make_world("alice", "bob")
    add_session(world, "s1", "alice", "bob", status=ENDED)
    event = terminate("s1", ("alice", "win", 100))
    world.processed.add(str(event.event_id))
    outcomes, changes, _ = plan(world, event)
    assert outcomes == [Outcome.DUPLICATE]
    assert not changes.stats and not changes.results and not changes.processed
    assert world.players["alice"].earnings == 0
    # It still refreshes the caches it would have refreshed.
    assert changes.touched_sessions == {"s1"}
    assert changes.touched_users == {1}


def test_the_same_event_twice_in_a_batch_applies_once() -> None:
    world = make_world("alice", "bob")
    start = update("s1", "alice", "bob")
    end = terminate("s1", ("alice", "win", 100), ("bob", "loss", 1))
    outcomes, changes, _ = plan(world, start, start, end, end)
    assert outcomes == [Outcome.APPLIED, Outcome.DUPLICATE, Outcome.APPLIED, Outcome.DUPLICATE]
    assert world.players["alice"].earnings == 100
    assert len(changes.results) == 2
    assert len(changes.processed) == 2


def test_a_duplicate_update_after_its_terminate_is_not_dead() -> None:
    world = make_world("alice")
    start = update("s1", "alice")
    outcomes, _, _ = plan(world, start, terminate("s1", ("alice", "win", 1)), start)
    assert outcomes == [Outcome.APPLIED, Outcome.APPLIED, Outcome.DUPLICATE]


# -- order after a deferral ------------------------------------------------------------


def test_later_events_of_a_session_wait_behind_a_deferred_update() -> None:
    world = make_world("alice", "bob", "carol")
    add_session(world, "s0", "alice")
    outcomes, changes, decisions = plan(
        world,
        update("s1", "alice"),  # alice is busy in s0
        update("s1", "bob"),  # must not overtake the first update of s1
        terminate("s1", ("bob", "win", 5)),
        update("s2", "carol"),  # another session is not held back
        update("s3", "alice"),  # s1 asked for alice first
    )
    assert outcomes == [
        Outcome.DEFERRED,
        Outcome.DEFERRED,
        Outcome.DEFERRED,
        Outcome.APPLIED,
        Outcome.DEFERRED,
    ]
    assert all(d.holds_session for d in decisions if d.outcome is Outcome.DEFERRED)
    assert "s1" in decisions[1].message and "alice" in decisions[4].message
    assert "s1" not in world.sessions and "s3" not in world.sessions
    assert world.live_session_of == {1: "s0", 3: "s2"}
    assert "s1" not in changes.touched_sessions


def test_an_update_waiting_for_a_player_applies_once_the_batch_frees_them() -> None:
    """Within one millisecond updates sort before terminates, so a player's next game
    often comes just before the end of the last one: no retry is needed for it."""
    world = make_world("alice", "bob", "carol")
    add_session(world, "s0", "alice", "bob")
    outcomes, changes, decisions = plan(
        world,
        update("s1", "alice", "carol"),  # waits for alice
        terminate("s1", ("alice", "win", 2)),  # queued behind it: retried later
        terminate("s0", ("alice", "win", 5), ("bob", "loss", 0)),  # frees alice ...
        update("s2", "bob"),
    )
    assert outcomes == [Outcome.APPLIED, Outcome.DEFERRED, Outcome.APPLIED, Outcome.APPLIED]
    assert world.live_session_of == {1: "s1", 3: "s1", 2: "s2"}
    assert world.players["alice"].earnings == 5
    # The update was recorded after the terminate that freed alice: the order applied.
    assert [stream for _, stream, _ in changes.processed] == ["terminate", "update", "update"]
    assert decisions[1].holds_session


def test_a_freed_player_goes_to_the_update_that_asked_first() -> None:
    world = make_world("alice", "bob", "carol")
    add_session(world, "s0", "alice")
    outcomes, _, decisions = plan(
        world,
        update("s1", "alice"),  # waits for alice
        update("s2", "alice", "bob"),  # s1 asked for alice first
        update("s3", "bob"),  # and s2 (waiting) asked for bob before s3
        update("s4", "carol"),  # nobody waits for carol
    )
    assert outcomes == [
        Outcome.DEFERRED,
        Outcome.DEFERRED,
        Outcome.DEFERRED,
        Outcome.APPLIED,
    ]
    assert "alice" in decisions[1].message and "bob" in decisions[2].message
    assert world.live_session_of == {1: "s0", 3: "s4"}
    # When s0 ends in the same batch, alice goes to s1, and s2 waits for s1 to end.
    world = make_world("alice", "bob", "carol")
    add_session(world, "s0", "alice")
    outcomes, _, _ = plan(
        world,
        update("s1", "alice"),
        update("s2", "alice", "bob"),
        terminate("s0", ("alice", "win", 5)),
        update("s3", "bob"),
    )
    assert outcomes == [Outcome.APPLIED, Outcome.DEFERRED, Outcome.APPLIED, Outcome.DEFERRED]
    assert world.live_session_of == {1: "s1"}
    # Held outside the batch, an update holds its players just the same.
    held = Waiting()
    held.hold(update("s1", "alice"), entry_order("update", "1600000000000-0"))
    decisions, _ = plan_batch(world, [entry(update("s5", "CAROL", "ALICE"))], NOW, held)
    assert [d.outcome for d in decisions] == [Outcome.DEFERRED]


def test_a_dead_entry_does_not_hold_its_session() -> None:
    world = make_world("alice")
    outcomes, _, _ = plan(world, update("s1", "alice", "ghost"), update("s1", "alice"))
    assert outcomes == [Outcome.DEAD, Outcome.APPLIED]


def test_entries_behind_one_waiting_outside_the_batch_wait_too() -> None:
    world = make_world("alice")
    late = entry(update("s1", "alice"))
    earlier = entry_order("update", "1600000000000-0")
    later = entry_order("update", "1800000000000-0")
    decisions, changes = plan_batch(world, [late], NOW, Waiting(sessions={"s1": [earlier]}))
    assert [d.outcome for d in decisions] == [Outcome.DEFERRED]
    assert decisions[0].holds_session and changes.empty
    # An entry older than the waiting one goes first; other sessions are not affected.
    decisions, _ = plan_batch(
        world,
        [late, entry(update("s2", "alice"))],
        NOW,
        Waiting(sessions={"s1": [later], "s9": [earlier]}),
    )
    assert [d.outcome for d in decisions] == [Outcome.APPLIED, Outcome.DEFERRED]


def test_waiting_compares_across_streams_in_the_merged_order() -> None:
    """A held update at sequence 5 of a millisecond comes before a terminate at sequence 0
    of the same millisecond: sequence numbers count per stream."""
    world = make_world("alice")
    add_session(world, "s1", "alice")
    end = PlannedEntry(terminate("s1", ("alice", "win", 1)), "terminate", "1700000000000-0")
    held = Waiting(sessions={"s1": [entry_order("update", "1700000000000-5")]})
    decisions, changes = plan_batch(world, [end], NOW, held)
    assert [d.outcome for d in decisions] == [Outcome.DEFERRED]
    assert changes.empty


def test_event_usernames_collects_every_player_key() -> None:
    events = [update("s1", "Alice", "bob"), terminate("s2", ("CAROL", "win", 1), reason="aborted")]
    assert event_usernames(events) == {"alice", "bob", "carol"}


# -- properties ------------------------------------------------------------------------

POPULATION = [f"player{i}" for i in range(8)]


@st.composite
def games(draw: st.DrawFn) -> list[tuple[UpdateEvent, TerminateEvent]]:
    """Games of 1-4 players from a small population, so players are often busy."""
    played = []
    for number in range(draw(st.integers(1, 12))):
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
        played.append(
            (
                UpdateEvent(event_id=uuid.uuid4(), session_id=session_id, players=roster),
                TerminateEvent(
                    event_id=uuid.uuid4(), session_id=session_id, results=results, reason=reason
                ),
            )
        )
    return played


def run_like_a_consumer(
    world: World, published: list[PlannedEntry], batch_sizes: list[int]
) -> tuple[Counter[Outcome], list[tuple[str, int, str, int]]]:
    """Plan in batches; deferred entries come back (in id order) until nothing is left."""
    outcomes: Counter[Outcome] = Counter()
    recorded: list[tuple[str, int, str, int]] = []
    pending = published
    sizes = itertools.cycle(batch_sizes)
    for _ in range(len(published) + 2):
        if not pending:
            break
        deferred: list[PlannedEntry] = []
        waiting = Waiting()
        position = 0
        while position < len(pending):
            batch = pending[position : position + next(sizes)]
            position += len(batch)
            decisions, changes = plan_batch(world, batch, NOW, waiting)
            recorded += [(r.session_id, r.user_id, r.outcome, r.earnings) for r in changes.results]
            for planned, decision in zip(batch, decisions, strict=True):
                outcomes[decision.outcome] += 1
                if decision.outcome is Outcome.DEFERRED:
                    deferred.append(planned)
                    if decision.holds_session:
                        waiting.hold(
                            planned.event, entry_order(planned.stream_kind, planned.entry_id)
                        )
        pending = deferred
    assert not pending, "entries still deferred after every other entry was decided"
    return outcomes, recorded


@settings(max_examples=150, deadline=None)
@given(
    games(),
    st.randoms(use_true_random=False),
    st.lists(st.integers(1, 6), min_size=1, max_size=4),
    st.lists(st.integers(0, 10_000), min_size=len(POPULATION), max_size=len(POPULATION)),
    st.integers(0, 5),
)
def test_any_order_and_batching_credits_every_game_exactly_once(
    played: list[tuple[UpdateEvent, TerminateEvent]],
    shuffler: object,
    batch_sizes: list[int],
    wallets: list[int],
    redeliveries: int,
) -> None:
    world = make_world(*POPULATION)
    for player, wallet in zip(world.players.values(), wallets, strict=True):
        player.wallet = wallet
    events: list[GameEvent] = [event for game in played for event in game]
    shuffler.shuffle(events)  # type: ignore[attr-defined]
    # A producer retrying a publish: the same event again, later in the streams.
    events += [shuffler.choice(events) for _ in range(redeliveries)]  # type: ignore[attr-defined]
    published = [entry(event) for event in events]

    outcomes, recorded = run_like_a_consumer(world, published, batch_sizes)

    assert outcomes[Outcome.DEAD] == 0
    assert outcomes[Outcome.APPLIED] == 2 * len(played)
    # Results recorded once per game and player, exactly as published.
    expected = sorted(
        (end.session_id, world.players[r.username].id, r.outcome, r.earnings)
        for _, end in played
        for r in end.results
    )
    assert sorted(recorded) == expected
    assert len({(s, u) for s, u, _, _ in recorded}) == len(recorded)
    # Stats equal the sum of the recorded results; wallets = starting balance + earnings.
    for player, wallet in zip(world.players.values(), wallets, strict=True):
        mine = [r for r in recorded if r[1] == player.id]
        assert player.win_count == sum(1 for r in mine if r[2] == "win")
        assert player.loss_count == sum(1 for r in mine if r[2] == "loss")
        assert player.earnings == sum(r[3] for r in mine)
        assert player.wallet == wallet + player.earnings
    assert all(session.ended for session in world.sessions.values())
    assert len(world.sessions) == len(played)
    assert world.live_session_of == {}


@settings(max_examples=150, deadline=None)
@given(games(), st.lists(st.integers(1, 5), min_size=1, max_size=3))
def test_a_player_is_never_in_two_live_sessions(
    played: list[tuple[UpdateEvent, TerminateEvent]], batch_sizes: list[int]
) -> None:
    """Published in game order (all updates first), so players are busy as often as can be."""
    world = make_world(*POPULATION)
    published = [entry(start) for start, _ in played] + [entry(end) for _, end in played]
    sizes = itertools.cycle(batch_sizes)
    position = 0
    while position < len(published):
        batch = published[position : position + next(sizes)]
        position += len(batch)
        plan_batch(world, batch, NOW)
        live = {sid: s for sid, s in world.sessions.items() if not s.ended}
        members = [uid for s in live.values() for uid in s.roster]
        assert len(members) == len(set(members))
        assert world.live_session_of == {uid: sid for sid, s in live.items() for uid in s.roster}
