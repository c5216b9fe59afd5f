"""A whole simulation run, for `usermgmt simulate` and the demo, and its report.

`run_simulation` registers the players (`players.py`), then publishes the games the
matchmaker plays out (`matchmaker.py`) through `publish.py`, reporting progress as
it goes; the `SimulationReport` says what the database must show once a worker has
applied it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from redis import Redis

from usermgmt.persistence.keys import Keys
from usermgmt.workers.client.auth import AuthClient
from usermgmt.workers.sim.matchmaker import Expected, SimConfig, new_run_id, traffic
from usermgmt.workers.sim.players import (
    NoWorker,
    Registered,
    check_password,
    player_names,
    register_players,
)
from usermgmt.workers.sim.publish import Published, publish_traffic

# NoWorker, SimConfig and check_password are re-exported: `workers/cli/commands/play.py`
# imports them from here.
__all__ = [
    "NoWorker",
    "ProgressSink",
    "SimConfig",
    "SimulationReport",
    "check_password",
    "run_simulation",
]


class ProgressSink(Protocol):
    """Where a run reports progress (see `usermgmt.workers.cli.tables.progress_report`)."""

    def add(self, name: str, label: str, total: int) -> None: ...

    def update(self, name: str, done: int, note: str = "") -> None: ...


@dataclass(frozen=True)
class SimulationReport:
    """What a run did and what the database must show once the worker has applied it."""

    config: SimConfig
    run_id: str
    registered: Registered
    published: Published
    expected: Expected


def run_simulation(
    redis: Redis,
    keys: Keys,
    config: SimConfig,
    password: str,
    rate: float = 0.0,
    progress: ProgressSink | None = None,
    reply_timeout: float = 30.0,
) -> SimulationReport:
    """Register the players, then publish the games; raises `NoWorker` if none answers."""
    run_id = new_run_id()
    names = player_names(config.players, config.name_prefix)
    client = AuthClient(redis, prefix=keys.prefix, timeout=reply_timeout)
    if progress is not None:
        progress.add("register", "register", len(names))
    registered = register_players(
        client,
        names,
        password,
        on_done=(lambda done: progress.update("register", done)) if progress else None,
        first_timeout=min(reply_timeout, 10.0),
    )
    if progress is not None:
        progress.add("games", "games", config.games)

    def on_progress(games: int, events: int) -> None:
        if progress is not None:
            progress.update("games", games, f"{events:,} events")

    expected = Expected()
    published = publish_traffic(
        redis, keys, traffic(config, run_id, expected), rate=rate, on_progress=on_progress
    )
    return SimulationReport(config, run_id, registered, published, expected)
