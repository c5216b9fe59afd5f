"""A key of the worker's that holds another type of value (someone wrote it by hand).

Redis runs a batch's other commands and refuses that one with WRONGTYPE. A user or
session hash is written whole, so the key is replaced; the leaderboard set is rebuilt
from the database; the dead-letter stream is never deleted: the worker waits for it.
The worker neither stops nor loses an event, and says which key it met.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
import structlog
from redis import Redis
from structlog.testing import capture_logs

from tests.conftest import Backend
from tests.integration.helpers import add_players, another_client, dead_letters
from tests.integration.rematch import PLAYERS, Totals, assert_exact, publish_games
from tests.integration.replay_helpers import wait_until
from usermgmt.persistence import accounts
from usermgmt.workers.auth.server import AuthServer
from usermgmt.workers.client.auth import AuthClient
from usermgmt.workers.events.consumer import EventConsumer
from usermgmt.workers.runtime.bootstrap import Services


def test_user_session_and_leaderboard_keys_of_another_type_are_replaced(
    services: Services, backend: Backend
) -> None:
    add_players(services, *PLAYERS)
    keys, redis = backend.keys, backend.redis
    redis.set(keys.user(PLAYERS[0]), "written by hand")
    redis.rpush(keys.user(PLAYERS[5]), "a list")
    redis.set(keys.session("r2-t1"), "not a hash")  # a session of the last round
    redis.set(keys.leaderboard, "not a sorted set")
    bad, totals = publish_games([redis, another_client(backend)], keys)

    consumer = EventConsumer(services, "c1", threading.Event(), burst=True)
    with capture_logs() as logs:
        consumer.log = structlog.get_logger()  # a new logger, which capture_logs sees
        consumer.run()

    assert_exact(services, redis, keys, totals)  # every hash, score and ack written
    assert redis.zcard(keys.leaderboard) == len(PLAYERS)
    # The batch whose leaderboard write failed is acked once the set is rebuilt; a dead
    # letter of it may then be written twice, as after a crash between letter and ack.
    assert {letter["payload"] for letter in dead_letters(redis, keys)} == {bad}
    replaced = {
        key
        for log in logs
        if log["event"] == "cache keys held another type of value; replaced them"
        for key in log["keys"]
    }
    assert {keys.user(PLAYERS[0]), keys.user(PLAYERS[5])} <= replaced
    assert any(log["event"].startswith("the leaderboard key held another type") for log in logs)


def games_beside_a_spoilt_dlq(
    services: Services, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> tuple[list[str], str, Totals]:
    """`um:dlq` spoilt, games and one bad entry published; what the consumer says each
    time it waits with backoff is collected (no real wait). Returns the sayings, the bad
    payload and the games' totals."""
    add_players(services, *PLAYERS)
    backend.redis.set(backend.keys.dlq, "not a stream")
    reported: list[str] = []

    def report(_consumer: EventConsumer, text: str) -> None:
        reported.append(text)
        time.sleep(0.01)

    monkeypatch.setattr(EventConsumer, "wait_backoff", report)
    bad, totals = publish_games([backend.redis, another_client(backend)], backend.keys)
    return reported, bad, totals


def test_a_dead_letter_stream_of_another_type_pauses_the_consumer_until_it_is_moved(
    services: Services, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys, redis = backend.keys, backend.redis
    reported, bad, totals = games_beside_a_spoilt_dlq(services, backend, monkeypatch)
    stop = threading.Event()
    consumer = EventConsumer(services, "c1", stop)
    thread = threading.Thread(target=consumer.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: reported)
        assert reported[0] == (
            f"Redis key {keys.dlq} holds another type of value than the worker writes there; "
            "rename or delete it"
        )
        assert thread.is_alive()
        redis.delete(keys.dlq)
        wait_until(
            lambda: (
                redis.exists(keys.dlq)
                and not redis.xpending(keys.update_stream, "usermgmt-events")["pending"]
            )
        )
    finally:
        stop.set()
        thread.join(30)
    assert not thread.is_alive()
    assert_exact(services, redis, keys, totals)
    assert bad in [letter["payload"] for letter in dead_letters(redis, keys)]


def test_dead_letters_refused_by_a_dlq_of_another_type_are_written_after_a_restart(
    services: Services, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker stops (or is killed) while it waits for the key to be moved: on one
    server the entries were acked with the batch, so the letters it could not write are
    kept in `um:dlq:unwritten` and written, once, when a worker starts again."""
    keys, redis = backend.keys, backend.redis
    reported, bad, totals = games_beside_a_spoilt_dlq(services, backend, monkeypatch)
    stop = threading.Event()
    thread = threading.Thread(target=EventConsumer(services, "c1", stop).run, daemon=True)
    thread.start()
    wait_until(lambda: reported)
    stop.set()
    thread.join(30)
    assert not thread.is_alive()
    assert redis.type(keys.dlq) == b"string"
    if not backend.cluster:  # acked with the batch: only the kept copy remains
        assert redis.llen(keys.dlq_unwritten) == 1
    monkeypatch.undo()
    redis.delete(keys.dlq)

    EventConsumer(services, "c1", threading.Event(), burst=True).run()

    assert [letter["payload"] for letter in dead_letters(redis, keys)] == [bad]
    assert not redis.exists(keys.dlq_unwritten)
    assert_exact(services, redis, keys, totals)


def test_a_dead_letter_refused_beside_a_spoilt_leaderboard_is_kept_and_written(
    services: Services, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both keys spoilt, met by one batch: the set is rebuilt and the refused letter is
    still kept, then written once `um:dlq` is moved (each key is handled, not the first)."""
    keys, redis = backend.keys, backend.redis
    reported, bad, totals = games_beside_a_spoilt_dlq(services, backend, monkeypatch)
    redis.set(keys.leaderboard, "not a sorted set")
    stop = threading.Event()
    thread = threading.Thread(target=EventConsumer(services, "c1", stop).run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: reported)
        if not backend.cluster:  # acked with the batch: the letter is kept meanwhile
            wait_until(lambda: redis.llen(keys.dlq_unwritten) == 1)
        redis.delete(keys.dlq)
        wait_until(
            lambda: (
                redis.exists(keys.dlq)
                and not redis.xpending(keys.update_stream, "usermgmt-events")["pending"]
                and not redis.xpending(keys.terminate_stream, "usermgmt-events")["pending"]
            )
        )
    finally:
        stop.set()
        thread.join(30)
    assert not thread.is_alive()
    assert [letter["payload"] for letter in dead_letters(redis, keys)] == [bad]
    assert not redis.exists(keys.dlq_unwritten)
    assert redis.zcard(keys.leaderboard) == len(PLAYERS)
    assert_exact(services, redis, keys, totals)


def _a_string(redis: Redis, key: str) -> None:
    redis.set(key, "written by hand")


def _a_hash_with_a_bad_number(redis: Redis, key: str) -> None:
    fields = {"id": 1, "username": "Zed", "win_count": 0, "loss_count": 0, "earnings": 0}
    redis.hset(key, mapping={**fields, "wallet": "12abc", "rank": 1})


def _a_hash_with_a_number_no_bigint_holds(redis: Redis, key: str) -> None:
    fields = {"id": 1, "username": "Zed", "win_count": 0, "loss_count": 0, "earnings": 0}
    redis.hset(key, mapping={**fields, "wallet": str(2**64), "rank": 1})


@pytest.mark.parametrize(
    "spoil", [_a_string, _a_hash_with_a_bad_number, _a_hash_with_a_number_no_bigint_holds]
)
def test_get_user_replaces_a_spoilt_user_key(
    services: Services, backend: Backend, spoil: Callable[[Redis, str], None]
) -> None:
    accounts.create_user(services.engine, "Zed", "$2b$04$" + "x" * 53, wallet=7)
    spoil(backend.redis, backend.keys.user("zed"))
    stop = threading.Event()
    thread = threading.Thread(target=AuthServer(services, "a1", stop).run, daemon=True)
    thread.start()
    try:
        user = AuthClient(backend.redis, prefix=backend.prefix, timeout=30).get_user("zed")
    finally:
        stop.set()
        thread.join(30)
    assert (user["username"], user["wallet"]) == ("Zed", 7)
    assert backend.redis.hget(backend.keys.user("zed"), "wallet") == b"7"
