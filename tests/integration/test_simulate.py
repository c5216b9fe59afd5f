"""The traffic generator's invariants, and its traffic applied by the real consumer."""

from __future__ import annotations

from collections import Counter

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import Backend
from tests.integration.helpers import dead_letters, drain
from usermgmt.domain.accounts import username_key
from usermgmt.domain.events import EventKind, TerminateEvent, UpdateEvent, entry_id_key, parse_event
from usermgmt.domain.ranking import competition_ranks
from usermgmt.persistence import accounts, standings
from usermgmt.workers.runtime.bootstrap import Services
from usermgmt.workers.sim.matchmaker import Expected, PlayerTotals, SimConfig, SimEvent, plan
from usermgmt.workers.sim.players import player_names
from usermgmt.workers.sim.publish import publish_traffic


def replay_rules(events: list[SimEvent], expected: Expected) -> None:
    """Walk the events in publication order as the consumer would, asserting every rule."""
    live_session_of: dict[str, str] = {}  # player -> live session
    rosters: dict[str, list[str]] = {}  # live session -> roster
    last_update: dict[str, int] = {}
    freed_by: dict[str, int] = {}  # player -> terminate that freed them
    ended: set[str] = set()
    totals: dict[str, PlayerTotals] = {name: PlayerTotals() for name in expected.players}
    event_ids = set()
    for position, event in enumerate(events):
        assert event.index == position
        parsed = parse_event(event.kind, orjson.dumps(event.payload))  # valid per docs/protocol.md
        assert str(parsed.event_id) not in event_ids
        event_ids.add(str(parsed.event_id))
        session = parsed.session_id
        assert session not in ended, "an event for a session that already ended"
        if event.after is not None:
            assert event.after < event.index
            assert events[event.after].kind is not event.kind  # only cross-stream waits
        if isinstance(parsed, UpdateEvent):
            for name in parsed.players:
                current = live_session_of.get(name)
                assert current in (None, session), f"{name} is in {current} and {session}"
            if session not in rosters:  # a new session waits for the games that freed them
                needed = [freed_by[n] for n in parsed.players if n in freed_by]
                assert (max(needed) if needed else None) == event.after
            for name in set(rosters.get(session, [])) - set(parsed.players):
                del live_session_of[name]
            for name in parsed.players:
                if session in rosters and name not in rosters[session] and name in freed_by:
                    assert event.after is not None and event.after >= freed_by[name]
                live_session_of[name] = session
            rosters[session] = list(parsed.players)
            last_update[session] = event.index
        else:
            assert isinstance(parsed, TerminateEvent)
            roster = rosters.pop(session)
            assert event.after == last_update[session]
            assert {r.username for r in parsed.results} <= set(roster)
            if parsed.reason == "aborted":
                assert parsed.results == []
            for result in parsed.results:
                player = totals[result.username]
                player.earnings += result.earnings
                player.wins += result.outcome == "win"
                player.losses += result.outcome == "loss"
            for name in roster:
                del live_session_of[name]
                freed_by[name] = event.index
            ended.add(session)
    assert not rosters, "every session ends"
    assert totals == expected.players
    kinds = Counter(event.kind for event in events)
    assert kinds[EventKind.UPDATE] == expected.updates
    assert kinds[EventKind.TERMINATE] == expected.terminates == expected.games


@settings(max_examples=40, deadline=None)
@given(
    players=st.integers(1, 40),
    per_game=st.integers(1, 6),
    games=st.integers(0, 60),
    seed=st.integers(0, 2**31),
    abort_ratio=st.sampled_from([0.0, 0.1, 0.5, 1.0]),
)
def test_generated_traffic_keeps_every_rule(
    players: int, per_game: int, games: int, seed: int, abort_ratio: float
) -> None:
    config = SimConfig(
        players=max(players, per_game),
        games=games,
        per_game=per_game,
        seed=seed,
        abort_ratio=abort_ratio,
    )
    assert config.problems() == []
    events, expected = plan(config, run_id="r1")
    replay_rules(events, expected)
    assert expected.games == games
    assert set(expected.players) == set(player_names(config.players))


def test_the_default_shape_overlaps_games_and_changes_rosters() -> None:
    events, expected = plan(SimConfig(players=200, games=500, per_game=4, seed=3))
    replay_rules(events, expected)
    live, most_live = set(), 0
    for event in events:
        if event.kind is EventKind.UPDATE:
            live.add(event.payload["session_id"])
        else:
            live.discard(event.payload["session_id"])
        most_live = max(most_live, len(live))
    assert most_live >= 20  # matchmaking keeps many games going at once
    assert expected.roster_changes > 0
    assert 0 < expected.aborted < expected.games
    statuses = Counter(e.payload["status"] for e in events if e.kind is EventKind.UPDATE)
    assert statuses["waiting"] > 0 and statuses["in_progress"] > 0
    assert {"map", "mode", "region"} <= set(events[0].payload["meta"])


def test_a_seed_decides_the_games_and_a_run_id_keeps_sessions_apart() -> None:
    config = SimConfig(players=30, games=50, per_game=3, seed=11)
    first, expected_first = plan(config, run_id="aaaa")
    second, expected_second = plan(config, run_id="bbbb")
    assert expected_first == expected_second

    def shape(events: list[SimEvent]) -> list[tuple[str, object]]:
        return [(e.kind, e.payload.get("players") or e.payload.get("results")) for e in events]

    assert shape(first) == shape(second)
    assert {e.payload["session_id"] for e in first}.isdisjoint(
        {e.payload["session_id"] for e in second}
    )
    assert {e.payload["event_id"] for e in first}.isdisjoint(
        {e.payload["event_id"] for e in second}
    )


@pytest.mark.parametrize(
    ("config", "problem"),
    [
        (SimConfig(players=3, per_game=4), "--players must be at least"),
        (SimConfig(per_game=0), "--players-per-game must be 1-100"),
        (SimConfig(per_game=101, players=200), "--players-per-game must be 1-100"),
        (SimConfig(games=-1), "--games must not be negative"),
        (SimConfig(abort_ratio=1.5), "--abort-ratio"),
        (SimConfig(name_prefix="bad name"), "--name-prefix"),
        (SimConfig(name_prefix="x" * 40), "--name-prefix"),
    ],
)
def test_bad_configurations_are_named(config: SimConfig, problem: str) -> None:
    assert any(problem in message for message in config.problems())


def test_published_traffic_applies_exactly(services: Services, backend: Backend) -> None:
    config = SimConfig(players=24, games=120, per_game=4, seed=5, abort_ratio=0.1)
    for name in player_names(config.players):
        accounts.create_user(services.engine, name, "x" * 60, wallet=7)
    events, expected = plan(config)
    progress: list[tuple[int, int]] = []
    published = publish_traffic(
        backend.redis,
        backend.keys,
        events,
        chunk_size=50,
        on_progress=lambda games, count: progress.append((games, count)),
    )
    assert published.events == len(events) == expected.events
    assert published.games == expected.games
    assert progress[-1] == (expected.games, len(events))

    # Every dependent event got a later entry id than the event it waits for, so the
    # consumer's merge by entry id sees them in publication order.
    entry_of = {}
    for kind in EventKind:
        for entry_id, fields in backend.redis.xrange(backend.keys.event_stream(kind)):
            event_id = orjson.loads(fields[b"payload"])["event_id"]
            entry_of[event_id] = entry_id_key(entry_id.decode())
    for event in events:
        if event.after is not None:
            before = events[event.after].payload["event_id"]
            assert entry_of[event.payload["event_id"]] > entry_of[before]

    consumer = drain(services)
    assert consumer.stats.applied == len(events)
    assert consumer.stats.waiting == 0
    assert dead_letters(backend.redis, backend.keys) == []
    assert standings.player_totals(services.engine) == {
        name: (t.wins, t.losses, t.earnings, 7 + t.earnings) for name, t in expected.players.items()
    }
    assert standings.count_applied_events(services.engine) == len(events)
    for kind in EventKind:
        pending = backend.redis.xpending(backend.keys.event_stream(kind), "usermgmt-events")
        assert pending["pending"] == 0
    # No session is left live, in SQL or in the cache.
    for name in expected.players:
        record = standings.player_record(services.engine, name)
        assert record is not None and record.session is None
        assert not backend.redis.hexists(backend.keys.user(username_key(name)), "session")

    # The leaderboard reads give exact competition ranks, in order, on every backend.
    ranks = competition_ranks({name: t.earnings for name, t in expected.players.items()})
    order = sorted(expected.players, key=lambda name: (-expected.players[name].earnings, name))
    board = standings.top(services.engine, 100)
    assert [(row.rank, row.username) for row in board] == [(ranks[n], n) for n in order]
    assert standings.top(services.engine, 5) == board[:5]
    assert standings.around(services.engine, order[10].upper(), 5) == board[8:13]
    assert standings.around(services.engine, order[0], 4) == board[:4]
    assert standings.around(services.engine, order[-1], 4) == board[-4:]
    assert standings.around(services.engine, order[3], 1) == board[3:4]
    assert standings.around(services.engine, "nobody", 5) is None
    assert standings.count_players(services.engine) == len(order)
    record = standings.player_record(services.engine, order[0])
    assert record is not None and record.rank == 1 and record.earnings == board[0].earnings


def test_paced_publishing_sends_everything_in_order(services: Services, backend: Backend) -> None:
    config = SimConfig(players=6, games=10, per_game=2, seed=2)
    events, expected = plan(config)
    published = publish_traffic(backend.redis, backend.keys, events, rate=2_000)
    assert published.events == len(events)
    update_ids = [
        orjson.loads(fields[b"payload"])["event_id"]
        for _, fields in backend.redis.xrange(backend.keys.update_stream)
    ]
    assert update_ids == [e.payload["event_id"] for e in events if e.kind is EventKind.UPDATE]
    assert backend.redis.xlen(backend.keys.terminate_stream) == expected.games
