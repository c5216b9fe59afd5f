"""`usermgmt simulate`, `leaderboard` and `user` as processes against a real worker."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from tests.e2e.conftest import Stack, wait_for
from tests.integration.helpers import publish
from usermgmt.domain.ranking import competition_ranks
from usermgmt.persistence import accounts, standings
from usermgmt.persistence.db import make_engine
from usermgmt.persistence.keys import Keys
from usermgmt.workers.cli.main import main
from usermgmt.workers.sim.demo import events_drained
from usermgmt.workers.sim.matchmaker import Expected, SimConfig, plan
from usermgmt.workers.sim.players import player_names
from usermgmt.workers.sim.publish import publish_traffic

pytestmark = pytest.mark.e2e


def totals_in_db(stack: Stack) -> dict[str, tuple[int, int, int, int]]:
    engine = make_engine(stack.database_url)
    try:
        return standings.player_totals(engine)
    finally:
        engine.dispose()


def scaled(expected: Expected, times: int) -> dict[str, tuple[int, int, int, int]]:
    return {
        name: (t.wins * times, t.losses * times, t.earnings * times, t.earnings * times)
        for name, t in expected.players.items()
    }


def test_simulate_registers_players_and_the_worker_applies_every_game(stack: Stack) -> None:
    worker = stack.start_worker()
    keys = Keys(stack.prefix)
    args = ["--players", "12", "--games", "40", "--players-per-game", "3", "--seed", "5"]
    _, expected = plan(SimConfig(players=12, games=40, per_game=3, seed=5))

    first = stack.cli("simulate", *args)
    assert first.returncode == 0, first.stderr
    assert "12 new, 0 existing" in first.stdout
    assert f"{expected.events:,} ({expected.updates:,} update" in first.stdout
    assert "games: 40/40 (100%)" in first.stderr  # plain progress when not on a terminal
    wait_for(lambda: events_drained(stack.redis, keys))
    assert totals_in_db(stack) == scaled(expected, 1)

    # Again: the players exist already (username_taken is fine), the games are new.
    second = stack.cli("simulate", *args)
    assert second.returncode == 0, second.stderr
    assert "0 new, 12 existing" in second.stdout
    wait_for(lambda: events_drained(stack.redis, keys))
    assert totals_in_db(stack) == scaled(expected, 2)

    assert stack.redis.xlen(keys.dlq) == 0
    assert stack.stop_worker(worker) == 0


def test_simulate_without_a_worker_says_so_in_one_line(stack: Stack) -> None:
    result = stack.cli(
        "simulate", "--players", "2", "--players-per-game", "2", "--games", "1", "--timeout", "0.5"
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "start `usermgmt worker`" in lines[0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--players", "2", "--players-per-game", "3"], "--players must be at least"),
        (["--rate", "-1"], "--rate must not be negative"),
        (["--password", "short"], "--password must be 8-72 bytes"),
        (["--timeout", "0"], "--timeout must be positive"),
        (["--rate", "nan"], "--rate must be a number of events per second"),
        (["--timeout", "inf"], "--timeout must be a number of seconds"),
    ],
)
def test_simulate_rejects_bad_options(
    capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    # Rejected before anything is contacted, so the entry point runs in-process.
    assert main(["simulate", *args]) == 2
    assert message in capsys.readouterr().err


@pytest.fixture
def played(stack: Stack) -> Expected:
    """Nine players with games applied by `usermgmt worker --burst`, and two who never played."""
    config = SimConfig(players=9, games=30, per_game=3, seed=8)
    engine = make_engine(stack.database_url)
    for name in [*player_names(config.players), "idle1", "Idle2"]:
        accounts.create_user(engine, name, "x" * 60, wallet=0)
    engine.dispose()
    events, expected = plan(config)
    publish_traffic(stack.redis, Keys(stack.prefix), events)
    burst = stack.cli("worker", "--burst")
    assert burst.returncode == 0, burst.stderr
    return expected


def json_of(stack: Stack, *args: str) -> Any:
    result = stack.cli(*args)
    assert result.returncode == 0, result.stderr
    return orjson.loads(result.stdout)


def expected_rows(expected: Expected) -> list[dict[str, Any]]:
    earnings = {name: t.earnings for name, t in expected.players.items()}
    earnings |= {"idle1": 0, "Idle2": 0}
    ranks = competition_ranks(earnings)
    rows = []
    for name, value in earnings.items():
        totals = expected.players.get(name)
        rows.append(
            {
                "rank": ranks[name],
                "username": name,
                "earnings": value,
                "win_count": totals.wins if totals else 0,
                "loss_count": totals.losses if totals else 0,
                "wallet": value,
            }
        )
    rows.sort(key=lambda row: (-row["earnings"], row["username"].lower()))
    return rows


def test_leaderboard_shows_exact_ranks_as_json_and_tables(stack: Stack, played: Expected) -> None:
    want = expected_rows(played)
    assert want[-1]["rank"] == want[-2]["rank"] == 10  # the two idle players tie, last
    board = json_of(stack, "leaderboard", "--top", "20", "--json")
    assert board == {"total_players": 11, "rows": want}
    result = stack.cli("leaderboard", "--top", "5")
    assert result.returncode == 0, result.stderr
    body = [line.split() for line in result.stdout.splitlines()]
    rows = [cells for cells in body if len(cells) == 6 and cells[0].isdigit()]
    assert [(int(cells[0]), cells[1]) for cells in rows] == [
        (row["rank"], row["username"]) for row in want[:5]
    ]
    assert "Top 5 of 11 players" in result.stdout

    # --around: the window centres on the player, and fills from the other side at the ends.
    middle = want[5]["username"]
    around = json_of(stack, "leaderboard", "--around", middle.upper(), "--top", "3", "--json")
    assert around["rows"] == want[4:7]
    last = json_of(stack, "leaderboard", "--around", "Idle2", "--top", "4", "--json")
    assert last["rows"] == want[-4:]

    table = stack.cli("leaderboard", "--around", middle, "--top", "3")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert any("rank" in line and "wallet" in line for line in lines)
    mine = [line for line in lines if "◀" in line]
    assert len(mine) == 1 and middle in mine[0]
    assert f"{want[5]['earnings']:,}" in mine[0]
    after_header = table.stdout[table.stdout.index("wallet") :]
    shown = [after_header.index(row["username"]) for row in want[4:7]]
    assert shown == sorted(shown)

    unknown = stack.cli("leaderboard", "--around", "nobody")
    assert unknown.returncode == 1
    assert unknown.stderr.strip() == "usermgmt: no user named 'nobody'"


def test_user_shows_one_record_with_rank_and_live_session(stack: Stack, played: Expected) -> None:
    want = {row["username"]: row for row in expected_rows(played)}
    name = player_names(9)[0]
    record = json_of(stack, "user", name.upper(), "--json")
    row = want[name]
    assert record == {
        "id": 1,
        "username": name,
        "wallet": row["wallet"],
        "win_count": row["win_count"],
        "loss_count": row["loss_count"],
        "earnings": row["earnings"],
        "rank": row["rank"],
        "session": None,
    }

    publish(
        stack.redis,
        Keys(stack.prefix),
        "update",
        session_id="eu-live-1",
        players=["idle1", "Idle2"],
        status="waiting",
        meta={"map": "dust"},
    )
    assert stack.cli("worker", "--burst").returncode == 0
    live = json_of(stack, "user", "idle1", "--json")
    assert live["session"] == {
        "session_id": "eu-live-1",
        "status": "waiting",
        "players": ["idle1", "Idle2"],
        "meta": {"map": "dust"},
    }
    assert live["rank"] == 10

    table = stack.cli("user", "idle1")
    assert table.returncode == 0, table.stderr
    assert "eu-live-1 (waiting)" in table.stdout
    assert "idle1, Idle2" in table.stdout

    unknown = stack.cli("user", "nobody")
    assert unknown.returncode == 1
    assert unknown.stderr.strip() == "usermgmt: no user named 'nobody'"
    assert unknown.stdout == ""
