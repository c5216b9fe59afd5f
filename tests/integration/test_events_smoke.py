"""A whole game through the consumer: update, then terminate, on every backend."""

from __future__ import annotations

from tests.conftest import Backend
from tests.integration.helpers import drain, publish, rows
from usermgmt.persistence import accounts
from usermgmt.workers.runtime.bootstrap import Services


def test_a_game_credits_stats_wallets_and_leaderboard(services: Services, backend: Backend) -> None:
    for name in ("alice", "bob"):
        accounts.create_user(services.engine, name, "x" * 60, wallet=10)
    keys = backend.keys
    publish(backend.redis, keys, "update", session_id="eu-1", players=["alice", "bob"])
    publish(
        backend.redis,
        keys,
        "terminate",
        session_id="eu-1",
        results=[
            {"username": "alice", "outcome": "win", "earnings": 150},
            {"username": "bob", "outcome": "loss", "earnings": 0},
        ],
    )
    drain(services)
    assert rows(
        services,
        "SELECT u.username, s.win_count, s.loss_count, s.earnings, u.wallet, "
        "l.rank FROM users u JOIN stats s ON s.user_id = u.id "
        "JOIN leaderboard l ON l.stats_id = s.id ORDER BY u.id",
    ) == [
        ("alice", 1, 0, 150, 160, 1),
        ("bob", 0, 1, 0, 10, 2),
    ]
    assert not backend.redis.exists(keys.session("eu-1"))
    assert backend.redis.hget(keys.user("alice"), "earnings") == b"150"
    assert not backend.redis.hexists(keys.user("bob"), "session")
    assert backend.redis.zscore(keys.leaderboard, "alice") == 150
    pending = backend.redis.xpending(keys.terminate_stream, "usermgmt-events")
    assert pending["pending"] == 0
