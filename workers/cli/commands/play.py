"""`usermgmt simulate`, `usermgmt leaderboard` and `usermgmt user`: the game as people see it."""

from __future__ import annotations

import argparse
import math
import random
from dataclasses import asdict

import orjson
from rich.table import Table

from usermgmt.persistence import standings
from usermgmt.workers.cli.commands.base import (
    CommandFailed,
    Subparsers,
    UsageError,
    add_database_option,
    connected,
    count,
    settings_from,
)
from usermgmt.workers.cli.tables import (
    leaderboard_table,
    number,
    progress_report,
    stdout_console,
    summary_table,
    user_table,
)
from usermgmt.workers.client.auth import AuthError
from usermgmt.workers.sim.simulate import (
    NoWorker,
    SimConfig,
    SimulationReport,
    check_password,
    run_simulation,
)

DEFAULT_PASSWORD = "simulated-pass"  # noqa: S105 - the documented password of simulated players
# Bounds of the size options: far above any real use, far below what overflows SQL.
MAX_ROWS = 1_000_000
MAX_SIM_PLAYERS = 1_000_000
MAX_SIM_GAMES = 10_000_000


def register(subparsers: Subparsers) -> None:
    simulate = subparsers.add_parser(
        "simulate",
        help="publish simulated matchmaking and game-server traffic",
        description="Register the players it needs (through the auth stream, so a worker "
        "must be running; players already registered are reused), then publish games as "
        "matchmakers and game servers would: an update per lobby (status waiting, then "
        "in_progress), sometimes a roster change, then a terminate with wins, losses and "
        "earnings (some games aborted). Games overlap, but no player is ever in two live "
        "sessions at once. Prints a summary; the worker applies the events.",
    )
    simulate.add_argument(
        "--players", type=count(1, MAX_SIM_PLAYERS), default=200, metavar="N", help="default 200"
    )
    simulate.add_argument(
        "--games", type=count(0, MAX_SIM_GAMES), default=2000, metavar="N", help="default 2000"
    )
    simulate.add_argument(
        "--players-per-game", type=int, default=4, metavar="N", help="roster size (default 4)"
    )
    simulate.add_argument(
        "--rate",
        type=float,
        default=0.0,
        metavar="EVENTS_PER_S",
        help="publishing rate (default 0: as fast as possible)",
    )
    simulate.add_argument(
        "--seed", type=int, metavar="N", help="random seed; the same seed gives the same games"
    )
    simulate.add_argument(
        "--abort-ratio",
        type=float,
        default=0.05,
        metavar="F",
        help="share of games aborted without results (default 0.05)",
    )
    simulate.add_argument(
        "--password",
        default=DEFAULT_PASSWORD,
        help=f"password of the simulated players (default {DEFAULT_PASSWORD!r})",
    )
    simulate.add_argument(
        "--name-prefix",
        default="player",
        metavar="TEXT",
        help="players are named <prefix>0001, <prefix>0002, … (default 'player')",
    )
    simulate.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="seconds to wait for each registration reply (default 30; the first, which "
        "tells whether a worker is running, waits at most 10)",
    )
    simulate.set_defaults(func=cmd_simulate)

    leaderboard = subparsers.add_parser(
        "leaderboard",
        help="print the leaderboard from the database",
        description="Rank, player, earnings, wins, losses and wallet, read from the SQL "
        "tables. Ranks are exact competition ranks (ties share a rank).",
    )
    leaderboard.add_argument(
        "--top",
        type=count(1, MAX_ROWS),
        default=10,
        metavar="N",
        help=f"rows to show (default 10, at most {MAX_ROWS:,})",
    )
    leaderboard.add_argument(
        "--around", metavar="USER", help="show the N rows around USER instead of the top"
    )
    leaderboard.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_database_option(leaderboard)
    leaderboard.set_defaults(func=cmd_leaderboard)

    user = subparsers.add_parser(
        "user",
        help="print one user's record",
        description="A user's id, wallet, wins, losses, earnings, exact rank and live game "
        "session, read from the database. Exits 1 when there is no such user.",
    )
    user.add_argument("name", metavar="NAME", help="username (case-insensitive)")
    user.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_database_option(user)
    user.set_defaults(func=cmd_user)


def cmd_simulate(args: argparse.Namespace) -> int:
    config = SimConfig(
        players=args.players,
        games=args.games,
        per_game=args.players_per_game,
        seed=args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 31),
        abort_ratio=args.abort_ratio,
        name_prefix=args.name_prefix,
    )
    problems = config.problems()
    if not math.isfinite(args.rate):
        problems.append("--rate must be a number of events per second")
    elif args.rate < 0:
        problems.append("--rate must not be negative")
    if not math.isfinite(args.timeout):
        problems.append("--timeout must be a number of seconds")
    elif args.timeout <= 0:
        problems.append("--timeout must be positive")
    password_problem = check_password(args.password)
    if password_problem:
        problems.append(password_problem)
    if problems:
        raise UsageError("; ".join(problems))
    settings = settings_from(args)
    with connected(settings, database=False) as services, progress_report() as progress:
        try:
            report = run_simulation(
                services.redis,
                services.keys,
                config,
                args.password,
                rate=args.rate,
                progress=progress,
                reply_timeout=args.timeout,
            )
        except NoWorker as exc:
            raise CommandFailed(str(exc)) from None
        except AuthError as exc:
            raise CommandFailed(f"registering the players failed: {exc}") from None
    stdout_console().print(simulation_summary(report))
    return 0


def simulation_summary(report: SimulationReport) -> Table:
    """The closing table of a simulation run."""
    expected, published, registered = report.expected, report.published, report.registered
    return summary_table(
        f"Simulation {report.run_id} (seed {report.config.seed})",
        [
            ("players registered", f"{registered.created:,} new, {registered.existing:,} existing"),
            ("registration time", f"{registered.elapsed:.1f} s"),
            ("games", f"{expected.games:,} ({expected.aborted:,} aborted)"),
            ("roster changes", f"{expected.roster_changes:,}"),
            (
                "events published",
                f"{published.events:,} ({expected.updates:,} update, "
                f"{expected.terminates:,} terminate)",
            ),
            ("publishing time", f"{published.elapsed:.2f} s"),
            ("events/s", f"{published.rate:,.0f}"),
        ],
    )


def cmd_leaderboard(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    with connected(settings, redis=False) as services:
        total = standings.count_players(services.engine)
        if args.around:
            rows = standings.around(services.engine, args.around, args.top)
            if rows is None:
                raise CommandFailed(f"no user named {args.around!r}")
        else:
            rows = standings.top(services.engine, args.top)
    if args.json:
        _print_json({"total_players": total, "rows": [asdict(row) for row in rows]})
        return 0
    title = f"Leaderboard around {args.around}" if args.around else f"Top {args.top}"
    stdout_console().print(
        leaderboard_table(
            rows, total, highlight=args.around, title=f"{title} of {number(total)} players"
        )
    )
    return 0


def cmd_user(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    with connected(settings, redis=False) as services:
        record = standings.player_record(services.engine, args.name)
    if record is None:
        raise CommandFailed(f"no user named {args.name!r}")
    if args.json:
        _print_json(asdict(record))
    else:
        stdout_console().print(user_table(record))
    return 0


def _print_json(value: object) -> None:
    print(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode())
