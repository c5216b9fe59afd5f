"""The auth request/reply server (docs/protocol.md, "Accounts") on every backend, driven in-process.

The server runs in a thread exactly as the worker runs it; requests go in through the
stream and replies come back on the reply keys, as any client in any language sees them.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import bcrypt
import orjson
import pytest
import sqlalchemy as sa
import structlog
from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from structlog.testing import capture_logs

from tests.conftest import Backend, make_settings
from tests.integration.helpers import dead_letters, rows
from usermgmt.domain.auth import WITHHELD, GetUserRequest, RegisterRequest, parse_request
from usermgmt.persistence import accounts, auth_store, cache
from usermgmt.persistence.db import make_engine
from usermgmt.persistence.keys import AUTH_GROUP, Keys
from usermgmt.workers.auth import server as auth_server
from usermgmt.workers.auth.handlers import Handlers
from usermgmt.workers.auth.server import AuthServer
from usermgmt.workers.client.auth import AuthClient, AuthError
from usermgmt.workers.runtime.bootstrap import Services

PASSWORD = "Correct-Horse-9"
USER_FIELDS = {"id", "username", "wallet", "win_count", "loss_count", "earnings", "rank"}


# -- harness ------------------------------------------------------------------------------


@contextmanager
def running(services: Services, consumer: str = "c1") -> Iterator[AuthServer]:
    """Run `AuthServer.run()` in a thread; stop it and check it ended cleanly."""
    stop = threading.Event()
    server = AuthServer(services, consumer, stop)
    crashed: list[BaseException] = []

    def target() -> None:
        try:
            server.run()
        except BaseException as exc:
            crashed.append(exc)

    thread = threading.Thread(target=target, name=f"auth-{consumer}", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        stop.set()
        thread.join(15)
    assert not thread.is_alive(), "the auth server did not stop"
    assert not crashed, f"the auth server crashed: {crashed!r}"


def with_settings(services: Services, backend: Backend, **overrides: object) -> Services:
    return dataclasses.replace(services, settings=make_settings(backend, **overrides))


def raw_request(redis: Redis, keys: Keys, timeout: float = 10, **fields: Any) -> dict[str, Any]:
    """Publish one request as any client would and BLPOP its reply (the whole JSON object)."""
    request_id = fields.setdefault("request_id", str(uuid.uuid4()))
    redis.xadd(keys.auth_requests, {"payload": orjson.dumps(fields)})
    popped = redis.blpop([keys.reply(uuid.UUID(request_id))], timeout=timeout)
    assert popped is not None, f"no reply to {fields.get('op')} within {timeout} s"
    reply: dict[str, Any] = orjson.loads(popped[1])
    return reply


def poll(condition: Callable[[], Any], timeout: float = 10.0) -> Any:
    """Wait until `condition()` is truthy (the server works in other threads)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"condition not met within {timeout} s")


def stream_is_clean(redis: Redis, keys: Keys) -> bool:
    """Every entry acked and deleted: nothing left in the stream, nothing pending."""
    pending = redis.xpending(keys.auth_requests, AUTH_GROUP)["pending"]
    return redis.xlen(keys.auth_requests) == 0 and pending == 0


def dump_everything(redis: Redis, prefix: str) -> dict[bytes, bytes]:
    """Every key under `prefix` with all of its content serialised, whatever its type."""
    contents: dict[bytes, bytes] = {}
    for key in redis.scan_iter(match=f"{prefix}:*", count=1000):
        kind = redis.type(key)
        kind = kind.decode() if isinstance(kind, bytes) else kind
        value: Any
        if kind == "string":
            value = redis.get(key)
        elif kind == "hash":
            value = redis.hgetall(key)
        elif kind == "list":
            value = redis.lrange(key, 0, -1)
        elif kind == "set":
            value = redis.smembers(key)
        elif kind == "zset":
            value = redis.zrange(key, 0, -1, withscores=True)
        elif kind == "stream":
            value = redis.xrange(key)
        else:
            raise AssertionError(f"unexpected key type {kind} for {key!r}")
        contents[key] = repr(value).encode()
    return contents


def user_rows(services: Services) -> list[tuple[Any, ...]]:
    return rows(
        services,
        "SELECT u.username, s.win_count, s.loss_count, s.earnings, l.rank, l.earnings "
        "FROM users u JOIN stats s ON s.user_id = u.id "
        "JOIN leaderboard l ON l.stats_id = s.id ORDER BY u.id",
    )


def table_counts(services: Services) -> tuple[int, int, int]:
    (counts,) = rows(
        services,
        "SELECT (SELECT COUNT(*) FROM users), (SELECT COUNT(*) FROM stats), "
        "(SELECT COUNT(*) FROM leaderboard)",
    )
    return counts  # type: ignore[return-value]


@pytest.fixture(autouse=True)
def short_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Block 0.1 s per read instead of 1 s, so a stopping server notices sooner."""
    monkeypatch.setattr(auth_server, "BLOCK_MS", 100)


@pytest.fixture
def client(backend: Backend) -> AuthClient:
    return AuthClient(backend.redis, prefix=backend.prefix, timeout=10)


# -- reply shapes (docs/protocol.md, "Replies") ---------------------------------------------


def test_register_replies_with_the_public_user_and_creates_all_three_rows(
    services: Services, backend: Backend
) -> None:
    services = with_settings(services, backend, starting_wallet=250)
    request_id = str(uuid.uuid4())
    with running(services):
        reply = raw_request(
            backend.redis,
            backend.keys,
            request_id=request_id,
            op="register",
            username="Alice",
            password=PASSWORD,
        )
    assert reply == {
        "request_id": request_id,
        "ok": True,
        "user": {
            "id": reply["user"]["id"],
            "username": "Alice",
            "wallet": 250,
            "win_count": 0,
            "loss_count": 0,
            "earnings": 0,
            "rank": 1,
        },
    }
    assert isinstance(reply["user"]["id"], int)
    assert user_rows(services) == [("Alice", 0, 0, 0, 1, 0)]
    ((stored_hash, wallet),) = rows(services, "SELECT password_hash, wallet FROM users")
    assert wallet == 250
    assert stored_hash != PASSWORD
    assert stored_hash.startswith("$2")  # a bcrypt hash
    assert bcrypt.checkpw(PASSWORD.encode(), stored_hash.encode())
    assert backend.redis.zscore(backend.keys.leaderboard, "Alice") == 0
    assert stream_is_clean(backend.redis, backend.keys)


def test_login_replies_with_the_user_and_a_token_that_verifies(
    services: Services, backend: Backend
) -> None:
    keys = backend.keys
    with running(services):
        registered = raw_request(
            backend.redis, keys, op="register", username="Alice", password=PASSWORD
        )
        request_id = str(uuid.uuid4())
        login = raw_request(
            backend.redis,
            keys,
            request_id=request_id,
            op="login",
            username="alice",
            password=PASSWORD,
        )
        verified = raw_request(backend.redis, keys, op="verify_token", token=login["token"])
        found = raw_request(backend.redis, keys, op="get_user", username="ALICE")
    assert set(login) == {"request_id", "ok", "user", "token"}
    assert login["request_id"] == request_id
    assert login["ok"] is True
    assert login["user"] == registered["user"]
    assert login["user"]["username"] == "Alice"  # kept as first written
    token = login["token"]
    assert isinstance(token, str)
    assert len(token) >= 43  # 32 random bytes, base64url
    assert set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    for reply in (verified, found):
        assert set(reply) == {"request_id", "ok", "user"}
        assert reply["ok"] is True
        assert reply["user"] == registered["user"]
        assert set(reply["user"]) == USER_FIELDS


def test_each_login_issues_a_new_token_valid_for_24_hours(
    services: Services, backend: Backend, client: AuthClient
) -> None:
    with running(services):
        client.register("alice", PASSWORD)
        _, first = client.login("alice", PASSWORD)
        _, second = client.login("alice", PASSWORD)
        assert first != second
        assert client.verify_token(first)["username"] == "alice"
        assert client.verify_token(second)["username"] == "alice"
    ttl = backend.redis.ttl(backend.keys.token(auth_store.token_digest(first)))
    assert 24 * 3600 - 60 <= ttl <= 24 * 3600


def test_error_replies_have_the_spec_shape(services: Services, backend: Backend) -> None:
    keys = backend.keys
    cases = [
        ({"op": "get_user", "username": "nobody"}, "not_found"),
        ({"op": "verify_token", "token": "not-a-real-token-" + "x" * 30}, "invalid_token"),
        ({"op": "login", "username": "nobody", "password": PASSWORD}, "invalid_credentials"),
        ({"op": "register", "username": "a!", "password": PASSWORD}, "invalid_request"),
        ({"op": "register", "username": "alice", "password": "short"}, "invalid_request"),
        ({"op": "get_user"}, "invalid_request"),
        ({"op": "fly"}, "invalid_request"),
    ]
    with running(services):
        for fields, code in cases:
            request_id = str(uuid.uuid4())
            reply = raw_request(backend.redis, keys, request_id=request_id, **fields)
            assert set(reply) == {"request_id", "ok", "error"}, fields
            assert reply["request_id"] == request_id
            assert reply["ok"] is False
            assert set(reply["error"]) == {"code", "message"}
            assert reply["error"]["code"] == code, fields
            assert isinstance(reply["error"]["message"], str)
            assert reply["error"]["message"]
    assert table_counts(services) == (0, 0, 0)
    assert stream_is_clean(backend.redis, keys)


def test_the_reply_expires_after_60_seconds(services: Services, backend: Backend) -> None:
    keys = backend.keys
    request_id = uuid.uuid4()
    payload = {"request_id": str(request_id), "op": "get_user", "username": "nobody"}
    with running(services):
        backend.redis.xadd(keys.auth_requests, {"payload": orjson.dumps(payload)})
        poll(lambda: backend.redis.exists(keys.reply(request_id)))
    assert 0 < backend.redis.ttl(keys.reply(request_id)) <= 60
    assert backend.redis.llen(keys.reply(request_id)) == 1


def test_the_client_raises_a_typed_error_carrying_the_code(
    services: Services, client: AuthClient
) -> None:
    with running(services):
        client.register("alice", PASSWORD)
        with pytest.raises(AuthError) as caught:
            client.register("ALICE", PASSWORD)
        assert caught.value.code == "username_taken"
        with pytest.raises(AuthError) as caught:
            client.get_user("bob")
        assert caught.value.code == "not_found"


# -- usernames ----------------------------------------------------------------------------


def test_usernames_are_unique_case_insensitively(
    services: Services, backend: Backend, client: AuthClient
) -> None:
    with running(services):
        client.register("Alice", PASSWORD)
        for other in ("alice", "ALICE", "aLiCe"):
            reply = raw_request(
                backend.redis, backend.keys, op="register", username=other, password="Other-pass-1"
            )
            assert reply["ok"] is False
            assert reply["error"]["code"] == "username_taken"
        # The first registration stands: its password still works, the others' do not.
        user, _ = client.login("ALICE", PASSWORD)
        with pytest.raises(AuthError) as caught:
            client.login("alice", "Other-pass-1")
        assert caught.value.code == "invalid_credentials"
    assert user["username"] == "Alice"
    assert table_counts(services) == (1, 1, 1)


@pytest.mark.parametrize("names", [("racer", "racer"), ("Racer", "rACER")])
def test_two_racing_registrations_of_one_name_have_exactly_one_winner(
    services: Services, monkeypatch: pytest.MonkeyPatch, names: tuple[str, str]
) -> None:
    """Both pass the "is it free?" check before either inserts: the database decides."""
    server = AuthServer(services, "racer", threading.Event())
    both_checked = threading.Barrier(2, timeout=10)
    real_hashpw = bcrypt.hashpw

    def hashpw_after_both_checked(password: bytes, salt: bytes) -> bytes:
        both_checked.wait()  # both threads are past find_credentials now
        return real_hashpw(password, salt)

    monkeypatch.setattr(bcrypt, "hashpw", hashpw_after_both_checked)
    replies: list[dict[str, Any]] = []

    def register(name: str, password: str) -> None:
        request = parse_request(
            orjson.dumps(
                {
                    "request_id": str(uuid.uuid4()),
                    "op": "register",
                    "username": name,
                    "password": password,
                }
            )
        )
        pipe = server.redis.pipeline(transaction=False)
        replies.append(server.handlers.answer(request, pipe, f"{name}-entry"))

    threads = [
        threading.Thread(target=register, args=(names[0], "Password-one")),
        threading.Thread(target=register, args=(names[1], "Password-two")),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    server.pool.shutdown()
    assert len(replies) == 2
    outcomes = sorted("ok" if reply["ok"] else reply["error"]["code"] for reply in replies)
    assert outcomes == ["ok", "username_taken"]
    assert table_counts(services) == (1, 1, 1)


def test_a_reply_that_cannot_be_encoded_is_still_answered_as_internal(
    services: Services, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug that builds a reply orjson refuses (an int past 64 bits) must not leave the
    client without its one reply, nor the request pending for ever."""

    def unencodable(_self: Handlers, request: Any) -> dict[str, Any]:
        return {"request_id": str(request.request_id), "ok": True, "user": {"wallet": 2**64}}

    monkeypatch.setattr(Handlers, "get_user", unencodable)
    with running(services):
        reply = raw_request(backend.redis, backend.keys, op="get_user", username="alice")
        poll(lambda: stream_is_clean(backend.redis, backend.keys))
    assert (reply["ok"], reply["error"]["code"]) == (False, "internal")


def test_register_is_one_transaction(services: Services, backend: Backend) -> None:
    """A failure on the last insert (leaderboard) leaves no users or stats row behind."""

    def fail_on_leaderboard(_conn, _cursor, statement, *_args) -> None:  # type: ignore[no-untyped-def]
        if statement.lstrip().upper().startswith("INSERT INTO LEADERBOARD"):
            raise sa.exc.OperationalError(statement, {}, Exception("disk I/O error (injected)"))

    sa.event.listen(services.engine, "before_cursor_execute", fail_on_leaderboard)
    try:
        with running(services):
            reply = raw_request(
                backend.redis, backend.keys, op="register", username="alice", password=PASSWORD
            )
    finally:
        sa.event.remove(services.engine, "before_cursor_execute", fail_on_leaderboard)
    assert reply["ok"] is False
    assert reply["error"]["code"] == "internal"
    assert table_counts(services) == (0, 0, 0)
    assert not backend.redis.exists(backend.keys.user("alice"))
    # Nothing half-made blocks the name: it can be registered now.
    with running(services):
        reply = raw_request(
            backend.redis, backend.keys, op="register", username="alice", password=PASSWORD
        )
    assert reply["ok"] is True
    assert table_counts(services) == (1, 1, 1)


# -- credentials and lockout ---------------------------------------------------------------


def test_unknown_user_and_wrong_password_get_the_same_answer_and_the_same_work(
    services: Services, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_checkpw = bcrypt.checkpw
    checks: list[str] = []

    def counting_checkpw(password: bytes, hashed: bytes) -> bool:
        checks.append(threading.current_thread().name)
        return real_checkpw(password, hashed)

    with running(services):
        raw_request(backend.redis, backend.keys, op="register", username="alice", password=PASSWORD)
        monkeypatch.setattr(bcrypt, "checkpw", counting_checkpw)
        wrong = raw_request(
            backend.redis, backend.keys, op="login", username="alice", password="Wrong-pass-1"
        )
        wrong_checks = len(checks)
        unknown = raw_request(
            backend.redis, backend.keys, op="login", username="nobody", password="Wrong-pass-1"
        )
    assert wrong["ok"] is unknown["ok"] is False
    assert wrong["error"] == unknown["error"]
    assert wrong["error"]["code"] == "invalid_credentials"
    assert "alice" not in wrong["error"]["message"]
    # One bcrypt check each: an unknown user costs as much as a wrong password.
    assert wrong_checks == 1
    assert len(checks) == 2


def test_a_login_upgrades_a_hash_of_another_cost_to_the_configured_one(
    services: Services, backend: Backend
) -> None:
    """After `USERMGMT_BCRYPT_ROUNDS` changes, each account's next right login re-hashes
    its password at the new cost, so an old account's login takes as long as an unknown
    name's (checked against a hash of today's cost); a wrong password changes nothing."""

    def stored_hash() -> str:
        (row,) = rows(services, "SELECT password_hash FROM users WHERE username_key = 'alice'")
        return str(row[0])

    with running(services):
        raw_request(backend.redis, backend.keys, op="register", username="alice", password=PASSWORD)
    old = stored_hash()
    assert old.startswith("$2b$04$")
    services = with_settings(services, backend, bcrypt_rounds=5)
    with running(services):
        assert code(login(backend.redis, backend.keys, "alice", "Wrong-pass-1")) == (
            "invalid_credentials"
        )
        assert stored_hash() == old
        assert code(login(backend.redis, backend.keys, "ALICE", PASSWORD)) == "ok"
        upgraded = stored_hash()
        assert upgraded.startswith("$2b$05$")
        assert bcrypt.checkpw(PASSWORD.encode(), upgraded.encode())
        assert code(login(backend.redis, backend.keys, "alice", PASSWORD)) == "ok"
        assert stored_hash() == upgraded  # already at the configured cost: kept


def login(redis: Redis, keys: Keys, username: str, password: str) -> dict[str, Any]:
    return raw_request(redis, keys, op="login", username=username, password=password)


def code(reply: dict[str, Any]) -> str:
    return "ok" if reply["ok"] else str(reply["error"]["code"])


def test_five_failures_lock_the_account_even_for_the_right_password(
    services: Services, backend: Backend
) -> None:
    redis, keys = backend.redis, backend.keys
    with running(services):
        raw_request(redis, keys, op="register", username="alice", password=PASSWORD)
        raw_request(redis, keys, op="register", username="bob", password=PASSWORD)
        # Failures count per username, whatever its case.
        failures = [
            code(login(redis, keys, name, "Wrong-pass-1"))
            for name in ("alice", "Alice", "ALICE", "alice", "aLiCe")
        ]
        assert failures == ["invalid_credentials"] * 5
        assert code(login(redis, keys, "alice", PASSWORD)) == "locked"
        assert code(login(redis, keys, "ALICE", PASSWORD)) == "locked"
        assert code(login(redis, keys, "alice", "Wrong-pass-1")) == "locked"
        # Another account is not affected.
        assert code(login(redis, keys, "bob", PASSWORD)) == "ok"
        locked = login(redis, keys, "alice", PASSWORD)
    assert "15 minutes" in locked["error"]["message"]
    lock_ttl = redis.ttl(keys.login_lock("alice"))
    assert 15 * 60 - 60 <= lock_ttl <= 15 * 60


def test_four_failures_do_not_lock_and_a_success_resets_the_count(
    services: Services, backend: Backend
) -> None:
    redis, keys = backend.redis, backend.keys
    with running(services):
        raw_request(redis, keys, op="register", username="alice", password=PASSWORD)
        for _ in range(4):
            assert code(login(redis, keys, "alice", "Wrong-pass-1")) == "invalid_credentials"
        assert code(login(redis, keys, "alice", PASSWORD)) == "ok"
        for _ in range(4):
            assert code(login(redis, keys, "alice", "Wrong-pass-1")) == "invalid_credentials"
        assert code(login(redis, keys, "alice", PASSWORD)) == "ok"


def test_failures_older_than_the_window_do_not_count(
    services: Services, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    redis, keys = backend.redis, backend.keys
    now = [time.time()]

    class Clock:
        @staticmethod
        def time() -> float:
            return now[0]

    monkeypatch.setattr(auth_store, "time", Clock)
    with running(services):
        raw_request(redis, keys, op="register", username="alice", password=PASSWORD)
        for _ in range(4):
            assert code(login(redis, keys, "alice", "Wrong-pass-1")) == "invalid_credentials"
        now[0] += 15 * 60 + 1  # the four fall out of the 15-minute window
        for _ in range(4):
            assert code(login(redis, keys, "alice", "Wrong-pass-1")) == "invalid_credentials"
        assert code(login(redis, keys, "alice", PASSWORD)) == "ok"
        # Five within the window do lock.
        for _ in range(5):
            login(redis, keys, "alice", "Wrong-pass-1")
        now[0] += 60
        assert code(login(redis, keys, "alice", PASSWORD)) == "locked"


def test_logins_sent_side_by_side_get_at_most_five_passwords_checked(
    services: Services, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Eleven wrong passwords and then the right one, in one pipelined burst, to a
    server checking eight at a time (as several workers would): at most five are checked
    and the account ends locked, as when they come one by one."""
    redis, keys = backend.redis, backend.keys
    real_checkpw = bcrypt.checkpw
    checked: list[bytes] = []

    def slow_checkpw(password: bytes, hashed: bytes) -> bool:
        checked.append(password)
        time.sleep(0.05)  # a real cost-12 check takes longer: the race only widens
        return real_checkpw(password, hashed)

    with running(with_settings(services, backend, auth_concurrency=8)):
        raw_request(redis, keys, op="register", username="alice", password=PASSWORD)
        monkeypatch.setattr(bcrypt, "checkpw", slow_checkpw)
        passwords = [f"Wrong-pass-{n}" for n in range(11)] + [PASSWORD]
        ids = [str(uuid.uuid4()) for _ in passwords]
        burst = redis.pipeline(transaction=False)
        for request_id, password in zip(ids, passwords, strict=True):
            payload = {"request_id": request_id, "op": "login", "username": "alice"}
            burst.xadd(
                keys.auth_requests, {"payload": orjson.dumps({**payload, "password": password})}
            )
        burst.execute()
        codes = []
        for request_id in ids:
            popped = redis.blpop([keys.reply(uuid.UUID(request_id))], timeout=30)
            assert popped is not None
            codes.append(code(orjson.loads(popped[1])))
        after = code(login(redis, keys, "alice", PASSWORD))
    assert len(checked) <= 5
    assert len([c for c in codes if c != "locked"]) == len(checked)
    if "ok" not in codes:  # five wrong ones were checked: locked, as one by one
        assert len(checked) == 5 and after == "locked"


def test_a_login_that_saw_no_lock_yet_is_refused_once_the_name_locks(
    services: Services, backend: Backend
) -> None:
    """The lock and the count are two keys (two nodes of a cluster): a login can find
    no lock, then count its check once the fifth failure has locked the name. It must
    still be refused: the count says locked, not only the lock key."""
    redis, keys = backend.redis, backend.keys
    for n in range(auth_store.LOCKOUT_MAX_FAILURES - 1):
        assert not auth_store.record_failure(redis, keys, "alice", f"1-{n}")
    late = redis.pipeline(transaction=False)
    auth_store.queue_is_locked(late, keys, "alice")
    assert late.execute() == [0]  # the late login looked: not locked yet
    assert auth_store.record_failure(redis, keys, "alice", "2-0")  # the fifth locks
    count = redis.pipeline(transaction=False)
    auth_store.queue_attempt(count, keys, "alice", "3-0")  # then it counts its check
    attempts = auth_store.Attempts.of(count.execute()[2])
    assert attempts.locks
    assert redis.exists(keys.login_lock("alice"))


def test_a_success_whose_check_began_before_the_failures_leaves_them_counted(
    services: Services, backend: Backend
) -> None:
    """A success forgets the attempts it was counted beside, not failures that came
    later: a slow right-password login that ends after five failures locked the name
    must leave them, or a login that saw no lock yet counts its check in an empty set
    and is checked, a sixth guess (the lock and the count are two keys, two nodes of a
    cluster)."""
    redis, keys = backend.redis, backend.keys

    def admit(entry_id: str) -> list[Any]:
        """A login's check counted as running, as `Handlers.begin_check` admits it."""
        pipe = redis.pipeline(transaction=False)
        auth_store.queue_attempt(pipe, keys, "alice", entry_id)
        members: list[Any] = pipe.execute()[2]
        attempts = auth_store.Attempts.of(members)
        assert not (attempts.locks or attempts.too_many_at_once)
        return members

    def succeed(counted: list[Any]) -> None:
        """A right password: the token and the reply's commands, as `Handlers.login`."""
        pipe = redis.pipeline(transaction=False)
        auth_store.queue_session(pipe, keys, "alice", 1, counted)
        pipe.execute()

    slow = admit("1-0")  # a right password, slow to check (a loaded worker)
    succeed(admit("1-1"))  # another right one, quick: it forgets the count so far
    for n in range(auth_store.LOCKOUT_MAX_FAILURES - 1):
        admit(f"2-{n}")
        assert not auth_store.record_failure(redis, keys, "alice", f"2-{n}")
    late = redis.pipeline(transaction=False)
    auth_store.queue_is_locked(late, keys, "alice")
    assert late.execute() == [0]  # a late login looked: not locked yet
    admit("3-0")
    assert auth_store.record_failure(redis, keys, "alice", "3-0")  # the fifth locks
    succeed(slow)  # the slow one ends
    count = redis.pipeline(transaction=False)
    auth_store.queue_attempt(count, keys, "alice", "4-0")  # the late login counts
    assert auth_store.Attempts.of(count.execute()[2]).locks


@pytest.mark.parametrize("right_at", [0, 2, 4])
def test_four_failures_beside_a_success_never_lock(
    services: Services, backend: Backend, monkeypatch: pytest.MonkeyPatch, right_at: int
) -> None:
    """The right password and four wrong ones side by side: four failures, whatever
    order they are counted in, so the right password still logs in afterwards."""
    redis, keys = backend.redis, backend.keys
    real_checkpw = bcrypt.checkpw

    def slow_checkpw(password: bytes, hashed: bytes) -> bool:
        time.sleep(0.05)  # all five checks overlap
        return real_checkpw(password, hashed)

    with running(with_settings(services, backend, auth_concurrency=8)):
        raw_request(redis, keys, op="register", username="alice", password=PASSWORD)
        monkeypatch.setattr(bcrypt, "checkpw", slow_checkpw)
        passwords = [f"Wrong-pass-{n}" for n in range(4)]
        passwords.insert(right_at, PASSWORD)
        codes = burst_of_logins(redis, keys, "alice", passwords)
        assert sorted(codes) == ["invalid_credentials"] * 4 + ["ok"]
        assert code(login(redis, keys, "alice", PASSWORD)) == "ok"


def test_checks_left_by_a_stalled_worker_stop_counting_after_a_while(
    services: Services, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Five right-password logins stuck in a worker that hangs (or was killed while
    hashing): they count as running checks for `CHECK_MAX_S`, then no more, and no
    failure ever happened, so nobody is locked out."""
    monkeypatch.setattr(auth_store, "CHECK_MAX_S", 1)
    redis, keys = backend.redis, backend.keys
    real_checkpw = bcrypt.checkpw
    calls: list[bytes] = []
    stuck = threading.Event()

    def hanging_checkpw(password: bytes, hashed: bytes) -> bool:
        calls.append(password)
        if len(calls) <= 5:  # the stalled worker's five
            stuck.wait(30)
        return real_checkpw(password, hashed)

    try:
        with running(with_settings(services, backend, auth_concurrency=5), "stalls"):
            raw_request(redis, keys, op="register", username="alice", password=PASSWORD)
            monkeypatch.setattr(bcrypt, "checkpw", hanging_checkpw)
            # Five hashing, five more queued behind them: every slot of the worker taken.
            ids = send_logins(redis, keys, "alice", [PASSWORD] * 10)
            poll(
                lambda: (
                    len(calls) == 5
                    and redis.xpending(keys.auth_requests, AUTH_GROUP)["pending"] == 10
                )
            )
            with running(services, "healthy"):
                started = time.monotonic()
                assert code(login(redis, keys, "alice", PASSWORD)) == "ok"
                assert time.monotonic() - started < 5
            assert not redis.exists(*[keys.reply(uuid.UUID(i)) for i in ids])
            stuck.set()
    finally:
        stuck.set()


def send_logins(redis: Redis, keys: Keys, username: str, passwords: list[str]) -> list[str]:
    """Publish logins in one pipelined burst; returns their request ids."""
    ids = [str(uuid.uuid4()) for _ in passwords]
    burst = redis.pipeline(transaction=False)
    for request_id, password in zip(ids, passwords, strict=True):
        request = {"request_id": request_id, "op": "login", "username": username}
        burst.xadd(keys.auth_requests, {"payload": orjson.dumps({**request, "password": password})})
    burst.execute()
    return ids


def burst_of_logins(redis: Redis, keys: Keys, username: str, passwords: list[str]) -> list[str]:
    """The reply codes of logins published in one pipelined burst, in order."""
    codes = []
    for request_id in send_logins(redis, keys, username, passwords):
        popped = redis.blpop([keys.reply(uuid.UUID(request_id))], timeout=30)
        assert popped is not None
        codes.append(code(orjson.loads(popped[1])))
    return codes


def test_unknown_usernames_are_locked_out_too(services: Services, backend: Backend) -> None:
    """Guessing at a name that does not exist gets the same treatment as a real one."""
    redis, keys = backend.redis, backend.keys
    with running(services):
        for _ in range(5):
            assert code(login(redis, keys, "ghost", "Wrong-pass-1")) == "invalid_credentials"
        assert code(login(redis, keys, "ghost", "Wrong-pass-1")) == "locked"


# -- secrets in Redis ------------------------------------------------------------------------


def test_no_password_or_token_is_left_anywhere_in_redis(
    services: Services, backend: Backend, client: AuthClient
) -> None:
    redis, keys = backend.redis, backend.keys
    secrets = ["First-Secret-Pw1", "Second-Secret-Pw2", "Wrong-Secret-Pw3"]
    with running(services):
        client.register("alice", secrets[0])
        client.register("bob", secrets[1])
        _, token_a = client.login("alice", secrets[0])
        _, token_b = client.login("bob", secrets[1])
        client.verify_token(token_a)
        with pytest.raises(AuthError):
            client.login("alice", secrets[2])
        client.get_user("alice")
        # Junk carrying a password is dead-lettered without it.
        redis.xadd(
            keys.auth_requests,
            {"payload": orjson.dumps({"request_id": "x", "password": secrets[0]})},
        )
        redis.xadd(keys.auth_requests, {"payload": b"password=" + secrets[1].encode()})
        redis.xadd(
            keys.auth_requests,
            {"payload": orjson.dumps([{"op": "login", "password": secrets[2]}])},
        )
        poll(lambda: stream_is_clean(redis, keys) and len(dead_letters(redis, keys)) == 3)
    everything = dump_everything(redis, backend.prefix)
    assert keys.token(auth_store.token_digest(token_a)).encode() in everything
    for secret in [*secrets, token_a, token_b]:
        for key, content in everything.items():
            assert secret.encode() not in key, key
            assert secret.encode() not in content, key
    # The stored form of a token is its SHA-256 digest, pointing at the user id.
    (alice_id,) = rows(services, "SELECT id FROM users WHERE username = 'alice'")[0]
    assert redis.get(keys.token(auth_store.token_digest(token_a))) == str(alice_id).encode()


# -- get_user and its cache ----------------------------------------------------------------


def test_get_user_fills_the_cache_with_public_fields_and_the_configured_ttl(
    services: Services, backend: Backend, client: AuthClient
) -> None:
    services = with_settings(services, backend, user_cache_ttl=123)
    redis, keys = backend.redis, backend.keys
    with running(services):
        registered = client.register("Alice", PASSWORD)
        redis.delete(keys.user("alice"))
        found = client.get_user("alice")
    assert found == registered
    cached = {k.decode(): v.decode() for k, v in redis.hgetall(keys.user("alice")).items()}
    assert set(cached) == USER_FIELDS  # public fields only: no password_hash, no token
    assert cached["username"] == "Alice"
    assert cached["id"] == str(registered["id"])
    assert 0 < redis.ttl(keys.user("alice")) <= 123
    for value in cached.values():
        assert not value.startswith("$2")


def test_a_get_user_fill_racing_a_newer_write_leaves_no_stale_hash(
    services: Services, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A `get_user` that missed the cache reads the account from SQL, then writes the
    hash. A game applied in between (its commit, then its hash written) must not be
    undone by that late fill: the hash would show the old wallet for the whole TTL."""
    redis, keys = backend.redis, backend.keys
    accounts.create_user(services.engine, "alice", "$2b$04$" + "x" * 53, wallet=0)
    real_load_user = accounts.load_user

    def load_then_a_game_commits(*args: Any, **kwargs: Any) -> Any:
        seen = real_load_user(*args, **kwargs)  # the request read the account
        with services.engine.begin() as conn:  # then a game's win commits ...
            conn.execute(sa.text("UPDATE users SET wallet = wallet + 150"))
        newer = real_load_user(services.engine, username="alice")
        assert newer is not None and newer.wallet == 150
        batch = cache.CommandBatch()  # ... and its worker writes the hash
        cache.queue_user(batch, keys, newer, services.settings.user_cache_ttl)
        batch.send(redis).wait()
        return seen

    monkeypatch.setattr(accounts, "load_user", load_then_a_game_commits)
    handlers = Handlers(services, structlog.get_logger())
    request = GetUserRequest(request_id=uuid.uuid4(), op="get_user", username="alice")
    handlers.answer(request, redis.pipeline(transaction=False), "1-0")
    cached = cache.read_user(redis, keys, "alice")
    assert cached is None or cached.wallet == 150


def test_a_registration_racing_its_players_first_game_leaves_no_stale_hash(
    services: Services, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A registration commits the account, then caches it. A game applied for the new
    player in between (a producer that did not wait for the reply) wrote a newer hash
    and score after its commit: the registration must not put the old record back."""
    redis, keys = backend.redis, backend.keys
    real_create_user = accounts.create_user

    def create_then_a_game_commits(*args: Any, **kwargs: Any) -> Any:
        created = real_create_user(*args, **kwargs)
        with services.engine.begin() as conn:  # a win of the new player commits ...
            conn.execute(sa.text("UPDATE users SET wallet = wallet + 150"))
            conn.execute(sa.text("UPDATE stats SET win_count = 1, earnings = 150"))
        newer = accounts.load_user(services.engine, username="alice")
        assert newer is not None and newer.wallet == 150
        batch = cache.CommandBatch()  # ... and its worker writes the caches
        cache.queue_user(batch, keys, newer, services.settings.user_cache_ttl)
        cache.queue_leaderboard_scores(batch, keys, {"alice": 150})
        batch.send(redis).wait()
        return created

    monkeypatch.setattr(accounts, "create_user", create_then_a_game_commits)
    handlers = Handlers(services, structlog.get_logger())
    request = RegisterRequest(
        request_id=uuid.uuid4(), op="register", username="alice", password=PASSWORD
    )
    reply = handlers.answer(request, redis.pipeline(transaction=False), "1-0")
    assert reply["ok"] and reply["user"]["wallet"] == 150
    cached = cache.read_user(redis, keys, "alice")
    assert cached is None or (cached.wallet, cached.win_count) == (150, 1)
    assert redis.zscore(keys.leaderboard, "alice") == 150


def test_get_user_reads_the_cache_first(
    services: Services, backend: Backend, client: AuthClient
) -> None:
    redis, keys = backend.redis, backend.keys
    with running(services):
        client.register("alice", PASSWORD)
        redis.delete(keys.user("alice"))
        client.get_user("alice")  # fills the cache from SQL
        redis.hset(keys.user("alice"), "wallet", 777)  # only the cache knows this
        found = client.get_user("ALICE")
    assert found["wallet"] == 777
    assert rows(services, "SELECT wallet FROM users") == [(0,)]


# -- the stream: acks, deletes, staleness, the group -----------------------------------------


def test_every_answered_entry_is_acked_and_deleted(
    services: Services, backend: Backend, client: AuthClient
) -> None:
    redis, keys = backend.redis, backend.keys
    with running(services):
        client.register("alice", PASSWORD)
        client.login("alice", PASSWORD)
        with pytest.raises(AuthError):
            client.login("alice", "Wrong-pass-1")
        client.get_user("alice")
        with pytest.raises(AuthError):
            client.call("nonsense")
        poll(lambda: stream_is_clean(redis, keys))
    assert redis.xlen(keys.auth_requests) == 0
    assert redis.xpending(keys.auth_requests, AUTH_GROUP)["pending"] == 0


def test_requests_older_than_30_seconds_are_dropped_unanswered(
    services: Services, backend: Backend, client: AuthClient
) -> None:
    redis, keys = backend.redis, backend.keys
    now_s, micros = redis.time()
    now_ms = int(now_s) * 1000 + int(micros) // 1000
    stale_id = uuid.uuid4()
    fresh_id = uuid.uuid4()
    for entry_id, request_id, name in (
        (f"{now_ms - 60_000}-0", stale_id, "stale"),
        (f"{now_ms - 20_000}-0", fresh_id, "fresh"),
    ):
        request = {
            "request_id": str(request_id),
            "op": "register",
            "username": name,
            "password": PASSWORD,
        }
        redis.xadd(keys.auth_requests, {"payload": orjson.dumps(request)}, id=entry_id)
    with running(services):
        popped = redis.blpop([keys.reply(fresh_id)], timeout=10)
        assert popped is not None  # 20 s old: still served
        client.get_user("fresh")
        poll(lambda: stream_is_clean(redis, keys))
        assert not redis.exists(keys.reply(stale_id))
    assert [name for name, *_ in user_rows(services)] == ["fresh"]
    assert dead_letters(redis, keys) == []


def test_a_request_published_before_the_worker_first_ran_is_served(
    services: Services, backend: Backend
) -> None:
    redis, keys = backend.redis, backend.keys
    assert not redis.exists(keys.auth_requests)
    request_id = uuid.uuid4()
    request = {
        "request_id": str(request_id),
        "op": "register",
        "username": "early",
        "password": PASSWORD,
    }
    redis.xadd(keys.auth_requests, {"payload": orjson.dumps(request)})
    with running(services):
        popped = redis.blpop([keys.reply(request_id)], timeout=10)
        assert popped is not None
        assert orjson.loads(popped[1])["ok"] is True
        groups = redis.xinfo_groups(keys.auth_requests)
    assert [group["name"] for group in groups] in ([AUTH_GROUP.encode()], [AUTH_GROUP])
    assert table_counts(services) == (1, 1, 1)


def test_the_group_is_created_with_its_stream_when_missing(
    services: Services, backend: Backend, client: AuthClient
) -> None:
    redis, keys = backend.redis, backend.keys
    with running(services):
        poll(lambda: redis.exists(keys.auth_requests))
        client.register("alice", PASSWORD)
    groups = redis.xinfo_groups(keys.auth_requests)
    assert len(groups) == 1


def test_an_upper_case_request_id_is_answered_on_the_key_of_that_text(
    services: Services, backend: Backend
) -> None:
    """Swift's `UUID().uuidString` is upper case: the client waits on that key."""
    redis, keys = backend.redis, backend.keys
    request_id = str(uuid.uuid4()).upper()
    with running(services):
        raw_request(redis, keys, op="register", username="alice", password=PASSWORD)
        payload = {"request_id": request_id, "op": "get_user", "username": "alice"}
        redis.xadd(keys.auth_requests, {"payload": orjson.dumps(payload)})
        popped = redis.blpop([f"{backend.prefix}:auth:reply:{request_id}"], timeout=10)
    assert popped is not None
    reply = orjson.loads(popped[1])
    assert (reply["request_id"], reply["ok"], reply["user"]["username"]) == (
        request_id,
        True,
        "alice",
    )


def test_a_request_with_a_lone_surrogate_gets_its_one_invalid_request_reply(
    services: Services, backend: Backend
) -> None:
    """A password string a JavaScript client broke (`JSON.stringify` escapes a lone
    surrogate): answered, not left for the client to time out on, and not kept."""
    redis, keys = backend.redis, backend.keys
    request_id = str(uuid.uuid4())
    raw = b'{"request_id": "%s", "op": "login", "username": "alice", "password": "Pw-%s-123"}'
    with running(services):
        redis.xadd(keys.auth_requests, {"payload": raw % (request_id.encode(), rb"\ud83d")})
        popped = redis.blpop([keys.reply(uuid.UUID(request_id))], timeout=10)
        assert popped is not None, "no reply"
        assert poll(lambda: stream_is_clean(redis, keys))
    reply = orjson.loads(popped[1])
    assert (reply["ok"], reply["error"]["code"]) == (False, "invalid_request")
    assert "surrogate" in reply["error"]["message"]
    assert redis.xlen(keys.dlq) == 0


# -- junk ----------------------------------------------------------------------------------

JUNK: list[tuple[str, dict[bytes | str, bytes | str], str]] = [
    ("not JSON", {"payload": b"hello there"}, "invalid_json"),
    ("not JSON with a secret", {"payload": b"op=login&password=Junk-Secret-1"}, "invalid_json"),
    ("no payload field", {"data": b"{}", "password": b"Junk-Secret-2"}, "invalid_request"),
    (
        "request_id not a UUID",
        {
            "payload": orjson.dumps(
                {
                    "request_id": "../../um:leaderboard",
                    "op": "register",
                    "username": "mallory",
                    "password": "Junk-Secret-3",
                }
            )
        },
        "invalid_request",
    ),
    (
        "a JSON list",
        {
            "payload": orjson.dumps(
                [{"request_id": str(uuid.uuid4()), "op": "login", "password": "Junk-Secret-4"}]
            )
        },
        "invalid_request",
    ),
    ("a JSON string", {"payload": b'"Junk-Secret-5"'}, "invalid_request"),
    ("no request_id", {"payload": b'{"op": "get_user", "username": "alice"}'}, "invalid_request"),
]


def test_junk_is_dead_lettered_without_secrets_and_never_stops_the_server(
    services: Services, backend: Backend, client: AuthClient
) -> None:
    redis, keys = backend.redis, backend.keys
    with running(services):
        poll(lambda: redis.exists(keys.auth_requests))
        before = set(redis.scan_iter(match=f"{backend.prefix}:*"))
        entry_ids = [redis.xadd(keys.auth_requests, fields) for _, fields, _ in JUNK]
        # A request with a UUID but a bad body is answered on its own reply key.
        answered_id = uuid.uuid4()
        bad_body = {"request_id": str(answered_id), "op": "drop_tables"}
        bad_body["password"] = "Junk-Secret-6"
        redis.xadd(keys.auth_requests, {"payload": orjson.dumps(bad_body)})
        poll(lambda: stream_is_clean(redis, keys) and len(dead_letters(redis, keys)) == len(JUNK))
        written = set(redis.scan_iter(match=f"{backend.prefix}:*")) - before
        assert written == {keys.dlq.encode(), keys.reply(answered_id).encode()}
        reply = orjson.loads(redis.lpop(keys.reply(answered_id)))
        assert reply["error"]["code"] == "invalid_request"
        # Still serving.
        assert client.register("alice", PASSWORD)["username"] == "alice"
    # Served concurrently, so the dead letters may be in any order: match them by entry id.
    letters = {letter["entry_id"]: letter for letter in dead_letters(redis, keys)}
    expected = {
        entry_id.decode() if isinstance(entry_id, bytes) else entry_id: reason
        for entry_id, (_, _, reason) in zip(entry_ids, JUNK, strict=True)
    }
    assert {entry_id: letter["reason"] for entry_id, letter in letters.items()} == expected
    by_name = {
        name: letters[entry_id] for entry_id, (name, _, _) in zip(expected, JUNK, strict=True)
    }
    for letter in letters.values():
        assert letter["stream"] == keys.auth_requests
        assert letter["message"]
        assert {"payload", "deliveries", "failed_at"} <= set(letter)
        assert "password" not in letter["payload"]
    raw_dlq = repr(redis.xrange(keys.dlq)).encode()
    for number in range(1, 7):
        assert f"Junk-Secret-{number}".encode() not in raw_dlq
    # What can be kept safely is kept, so an operator can see what arrived.
    assert orjson.loads(by_name["request_id not a UUID"]["payload"]) == {
        "request_id": "../../um:leaderboard",
        "op": "register",
        "username": "mallory",
    }
    assert by_name["not JSON"]["payload"] == (
        "[not JSON, 11 bytes; withheld because it may contain a secret]"
    )
    assert orjson.loads(by_name["a JSON string"]["payload"]) == WITHHELD
    assert by_name["no payload field"]["payload"] == ""


# -- concurrency ---------------------------------------------------------------------------


def test_logins_hash_concurrently_up_to_the_configured_limit(
    services: Services, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With auth_concurrency=2, two logins are inside bcrypt together, never three."""
    services = with_settings(services, backend, auth_concurrency=2)
    real_checkpw = bcrypt.checkpw
    pair = threading.Barrier(2, timeout=10)  # passes only when two checks overlap
    lock = threading.Lock()
    inside = [0]
    peak = [0]

    def overlapping_checkpw(password: bytes, hashed: bytes) -> bool:
        with lock:
            inside[0] += 1
            peak[0] = max(peak[0], inside[0])
        try:
            pair.wait()
            return real_checkpw(password, hashed)
        finally:
            with lock:
                inside[0] -= 1

    client = AuthClient(backend.redis, prefix=backend.prefix, timeout=20)
    with running(services):
        for name in ("player1", "player2", "player3", "player4"):
            client.register(name, PASSWORD)
        monkeypatch.setattr(bcrypt, "checkpw", overlapping_checkpw)
        outcomes: dict[str, str] = {}

        def log_in(name: str) -> None:
            try:
                outcomes[name] = client.login(name, PASSWORD)[0]["username"]
            except AuthError as exc:
                outcomes[name] = exc.code

        threads = [
            threading.Thread(target=log_in, args=(n,))
            for n in ("player1", "player2", "player3", "player4")
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    assert outcomes == {name: name for name in ("player1", "player2", "player3", "player4")}
    assert peak[0] == 2


def test_a_slow_login_does_not_stall_other_requests(
    services: Services, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_checkpw = bcrypt.checkpw
    entered = threading.Event()
    release = threading.Event()

    def slow_checkpw(password: bytes, hashed: bytes) -> bool:
        entered.set()
        release.wait(20)
        return real_checkpw(password, hashed)

    redis, keys = backend.redis, backend.keys
    client = AuthClient(redis, prefix=backend.prefix, timeout=10)
    with running(services):
        client.register("slow", PASSWORD)
        client.register("quick", PASSWORD)
        monkeypatch.setattr(bcrypt, "checkpw", slow_checkpw)
        slow_id = uuid.uuid4()
        request = {
            "request_id": str(slow_id),
            "op": "login",
            "username": "slow",
            "password": PASSWORD,
        }
        redis.xadd(keys.auth_requests, {"payload": orjson.dumps(request)})
        assert entered.wait(10)
        # While the login is stuck inside bcrypt, other requests are answered.
        assert client.get_user("quick")["username"] == "quick"
        with pytest.raises(AuthError):
            client.verify_token("no-such-token-" + "x" * 30)
        assert not redis.exists(keys.reply(slow_id))
        release.set()
        popped = redis.blpop([keys.reply(slow_id)], timeout=10)
    assert popped is not None
    assert orjson.loads(popped[1])["ok"] is True


def test_a_slow_request_is_served_once_while_other_servers_reclaim_idle_ones(
    services: Services, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request still in flight is busy, not abandoned: the server keeps it fresh, so
    neither its own reclaim nor another server's serves it again (a second reply, a
    failed login counted twice towards the lockout)."""
    # Kept fresh every 100 ms; a loop turn on the test cluster took up to 115 ms.
    services = with_settings(services, backend, claim_idle_ms=300)
    real_checkpw = bcrypt.checkpw
    calls: list[bytes] = []
    release = threading.Event()

    def slow_checkpw(password: bytes, hashed: bytes) -> bool:
        calls.append(password)
        release.wait(20)
        return real_checkpw(password, hashed)

    redis, keys = backend.redis, backend.keys
    client = AuthClient(redis, prefix=backend.prefix, timeout=10)
    with running(services, "c1"), running(services, "c2"):
        client.register("slow", PASSWORD)
        monkeypatch.setattr(bcrypt, "checkpw", slow_checkpw)
        slow_id = uuid.uuid4()
        request = {
            "request_id": str(slow_id),
            "op": "login",
            "username": "slow",
            "password": "a wrong password",
        }
        entry_id = redis.xadd(keys.auth_requests, {"payload": orjson.dumps(request)})
        poll(lambda: bool(calls))
        # Five times the claim idle time: both servers' reclaims look (every 150 ms)
        # and would find it idle, were it not kept fresh.
        time.sleep(1.5)
        pending = redis.xpending_range(
            keys.auth_requests, AUTH_GROUP, min=entry_id, max=entry_id, count=1
        )
        assert [row["times_delivered"] for row in pending] == [1]
        release.set()
        poll(lambda: stream_is_clean(redis, keys))
        replies = redis.lrange(keys.reply(slow_id), 0, -1)
    # The servers have stopped and their pools are drained: count what really ran.
    assert len(calls) == 1
    assert [orjson.loads(reply)["error"]["code"] for reply in replies] == ["invalid_credentials"]
    assert redis.zcard(keys.login_failures("slow")) == 1


# -- resilience ----------------------------------------------------------------------------


def test_the_server_keeps_serving_after_redis_errors(
    services: Services, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dropped connection while reading must not leave the server unable to read again."""
    redis = backend.redis
    real_read_new = auth_server.read_new
    failures = [0]

    def flaky_read_new(*args: Any, **kwargs: Any) -> Any:
        if failures[0] < 2:
            failures[0] += 1
            raise RedisConnectionError("connection reset by peer (injected)")
        return real_read_new(*args, **kwargs)

    monkeypatch.setattr(auth_server, "read_new", flaky_read_new)
    client = AuthClient(redis, prefix=backend.prefix, timeout=15)
    with running(services):
        assert client.register("alice", PASSWORD)["username"] == "alice"
        assert client.get_user("alice")["username"] == "alice"
    assert failures[0] == 2


def test_several_servers_share_the_stream_and_each_request_is_answered_once(
    services: Services, backend: Backend
) -> None:
    redis, keys = backend.redis, backend.keys
    request_ids = [uuid.uuid4() for _ in range(12)]
    with running(services, "c1"), running(services, "c2"):
        for index, request_id in enumerate(request_ids):
            request = {
                "request_id": str(request_id),
                "op": "register",
                "username": f"user{index}",
                "password": PASSWORD,
            }
            redis.xadd(keys.auth_requests, {"payload": orjson.dumps(request)})
        for request_id in request_ids:
            popped = redis.blpop([keys.reply(request_id)], timeout=10)
            assert popped is not None
            assert orjson.loads(popped[1])["ok"] is True
        poll(lambda: stream_is_clean(redis, keys))
    assert table_counts(services) == (12, 12, 12)
    assert all(not redis.exists(keys.reply(request_id)) for request_id in request_ids)


def test_a_request_whose_read_reply_was_lost_is_still_answered(
    services: Services, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connection drops after XREADGROUP ran: the request is pending on this server,
    which never saw it (redis-py read again). It is taken back within seconds, not left
    for `claim_idle_ms` (30 s by default, when the client has long given up)."""
    redis = backend.redis
    real_read_new = auth_server.read_new
    lost: list[int] = []

    def lossy_read_new(*args: Any, **kwargs: Any) -> Any:
        entries = real_read_new(*args, **kwargs)
        if entries and not lost:
            lost.append(len(entries))
            return []  # as if the reply never arrived
        return entries

    monkeypatch.setattr(auth_server, "read_new", lossy_read_new)
    client = AuthClient(redis, prefix=backend.prefix, timeout=5)
    with running(services):
        started = time.monotonic()
        assert client.register("alice", PASSWORD)["username"] == "alice"
        assert time.monotonic() - started < 4
        poll(lambda: stream_is_clean(redis, backend.keys))
    assert lost == [1]


def test_requests_taken_over_from_a_dead_worker_are_answered_once(
    services: Services, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker died holding twelve logins. Two live servers, each with one hashing
    thread, reclaim them: each takes only what it can start at once and keeps those
    fresh, so neither takes over what the other holds (two replies, two tokens)."""
    services = with_settings(services, backend, claim_idle_ms=300, auth_concurrency=1)
    redis, keys = backend.redis, backend.keys
    client = AuthClient(redis, prefix=backend.prefix, timeout=10)
    names = [f"player{n}" for n in range(12)]
    with running(services, "setup"):
        for name in names:
            client.register(name, PASSWORD)
    real_checkpw = bcrypt.checkpw

    def slow_checkpw(password: bytes, hashed: bytes) -> bool:
        time.sleep(0.15)  # twelve of them outlast the claim idle time many times over
        return real_checkpw(password, hashed)

    monkeypatch.setattr(bcrypt, "checkpw", slow_checkpw)
    ids = [uuid.uuid4() for _ in names]
    for request_id, name in zip(ids, names, strict=True):
        request = {"request_id": str(request_id), "op": "login", "username": name}
        redis.xadd(keys.auth_requests, {"payload": orjson.dumps({**request, "password": PASSWORD})})
    redis.xreadgroup(AUTH_GROUP, "dead", {keys.auth_requests: ">"})  # and then it died
    with running(services, "c1"), running(services, "c2"):
        poll(lambda: all(redis.exists(keys.reply(i)) for i in ids), timeout=20)
        poll(lambda: stream_is_clean(redis, keys))
        time.sleep(0.5)  # a second reply would have come by now
    assert [redis.llen(keys.reply(i)) for i in ids] == [1] * len(ids)
    assert all(orjson.loads(redis.lindex(keys.reply(i), 0))["ok"] for i in ids)


def test_a_request_the_parser_fails_on_unexpectedly_is_dead_lettered_once(
    services: Services, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug reading one request must not leave it failing (and its password in the
    stream) until it turns stale: it is dead-lettered without its password, once."""
    real_parse = auth_server.parse_request

    def fragile_parse(payload: Any) -> Any:
        if b"fragile" in payload:
            raise RecursionError("maximum recursion depth exceeded")
        return real_parse(payload)

    monkeypatch.setattr(auth_server, "parse_request", fragile_parse)
    redis, keys = backend.redis, backend.keys
    client = AuthClient(redis, prefix=backend.prefix, timeout=10)
    request = {"request_id": str(uuid.uuid4()), "op": "login", "username": "fragile"}
    redis.xadd(keys.auth_requests, {"payload": orjson.dumps({**request, "password": PASSWORD})})
    with running(services):
        assert client.register("alice", PASSWORD)["username"] == "alice"
        poll(lambda: stream_is_clean(redis, keys))
        time.sleep(1.5)  # a take-back would have served it again by now
    (letter,) = dead_letters(redis, keys)
    assert letter["reason"] == "invalid_request"
    assert letter["message"] == "the request could not be read (RecursionError)"
    assert PASSWORD not in letter["payload"]


def test_a_database_outage_is_logged_once_not_once_a_request(
    services: Services, backend: Backend
) -> None:
    """Every request is answered `internal` while the database is away; the outage is
    one error line (and a reminder a minute), as the other parts of the worker say it."""
    away = dataclasses.replace(
        services, engine=make_engine("postgresql+psycopg://postgres@127.0.0.1:1/test")
    )
    redis, keys = backend.redis, backend.keys
    with capture_logs() as logs, running(away) as server:
        server.handlers.log = structlog.get_logger()
        codes = [
            code(raw_request(redis, keys, op="get_user", username=f"user{n}")) for n in range(5)
        ]
    assert codes == ["internal"] * 5
    said = [line for line in logs if line["event"].startswith("cannot use the database")]
    assert [line["log_level"] for line in said if line["log_level"] != "debug"] == ["error"]


def test_a_registration_whose_reply_redis_refused_is_answered_as_created(
    services: Services, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis fails after the account is committed: the request is served again, and
    answered as the account it created, not as `username_taken` for it."""
    real_rank = Handlers.with_live_rank
    failed: list[bool] = []

    def flaky_rank(handlers: Handlers, user: Any) -> Any:
        if not failed:
            failed.append(True)
            raise RedisConnectionError("connection reset by peer (injected)")
        return real_rank(handlers, user)

    monkeypatch.setattr(Handlers, "with_live_rank", flaky_rank)
    redis, keys = backend.redis, backend.keys
    with running(services):
        reply = raw_request(redis, keys, op="register", username="alice", password=PASSWORD)
    assert failed == [True]
    assert reply["ok"] is True and reply["user"]["username"] == "alice"
    assert table_counts(services) == (1, 1, 1)


def send_with_one_request_id(
    redis: Redis, keys: Keys, request_id: str, requests: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Publish `requests`, all under one `request_id`, one after the other, each reply
    popped before the next is sent (their reply key is the same)."""
    replies = []
    for fields in requests:
        redis.xadd(
            keys.auth_requests, {"payload": orjson.dumps({"request_id": request_id, **fields})}
        )
        popped = redis.blpop([keys.reply(uuid.UUID(request_id))], timeout=10)
        assert popped is not None, f"no reply to {fields['op']}"
        replies.append(orjson.loads(popped[1]))
    return replies


def test_failed_logins_sent_again_under_one_request_id_each_count(
    services: Services, backend: Backend
) -> None:
    """A client that reuses one `request_id` still gets five guesses a window: each
    request is its own stream entry, and the lockout counts entries."""
    redis, keys = backend.redis, backend.keys
    with running(services):
        raw_request(redis, keys, op="register", username="alice", password=PASSWORD)
        guesses = [
            {"op": "login", "username": "alice", "password": f"Wrong-pass-{n}"} for n in range(6)
        ]
        guesses.append({"op": "login", "username": "alice", "password": PASSWORD})
        replies = send_with_one_request_id(redis, keys, str(uuid.uuid4()), guesses)
    assert [code(reply) for reply in replies] == ["invalid_credentials"] * 5 + ["locked"] * 2


def test_registrations_sent_under_one_request_id_each_get_their_own_answer(
    services: Services, backend: Backend
) -> None:
    redis, keys = backend.redis, backend.keys
    with running(services):
        replies = send_with_one_request_id(
            redis,
            keys,
            str(uuid.uuid4()),
            [
                {"op": "register", "username": "first", "password": PASSWORD},
                {"op": "register", "username": "second", "password": PASSWORD},
                {"op": "register", "username": "first", "password": PASSWORD},
            ],
        )
    assert [code(reply) for reply in replies] == ["ok", "ok", "username_taken"]
    assert [reply["user"]["username"] for reply in replies[:2]] == ["first", "second"]
    assert [row[0] for row in user_rows(services)] == ["first", "second"]
