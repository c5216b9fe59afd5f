"""`usermgmt acl` rules applied to the real Redis: each role does its job and nothing else.

The users are named after the test's key prefix and deleted afterwards; the default
user is never touched.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import orjson
import pytest
from redis import Redis
from redis.cluster import RedisCluster
from redis.exceptions import NoPermissionError, ResponseError

from tests.conftest import REDIS_URL, _delete_prefix, _real_redis
from tests.integration.helpers import drain, publish, rows
from usermgmt.persistence import accounts
from usermgmt.persistence.db import make_engine, upgrade
from usermgmt.persistence.keys import Keys
from usermgmt.workers.auth.server import AuthServer
from usermgmt.workers.client.auth import AuthClient
from usermgmt.workers.client.publisher import Publisher, PublishFailed
from usermgmt.workers.ops import acl, backup, dlq, replay, status, trim
from usermgmt.workers.runtime.bootstrap import Services
from usermgmt.workers.runtime.connections import make_redis
from usermgmt.workers.runtime.redis_info import evicting_policy
from usermgmt.workers.runtime.settings import Settings
from usermgmt.workers.runtime.streams import remove_idle_consumers

PASSWORD = "acl-test-password-1"
REPO = Path(__file__).resolve().parents[2]
RESULTS = [
    {"username": "alice", "outcome": "win", "earnings": 70},
    {"username": "bob", "outcome": "loss", "earnings": 0},
]


@pytest.fixture(params=["redis", "cluster"])
def server_url(request: pytest.FixtureRequest) -> str:
    """The real Redis, and the local cluster (where ACLs are set on every node)."""
    if request.param == "cluster":
        return str(request.getfixturevalue("redis_cluster").url)
    _real_redis().close()  # fails the test, with the reason, when it does not answer
    return REDIS_URL


def connect(url: str, **options: Any) -> Redis:
    if url == REDIS_URL:
        return Redis.from_url(url, **options)
    return cast(Redis, RedisCluster.from_url(url, **options))


def on_every_node(admin: Redis, *command: Any) -> None:
    if isinstance(admin, RedisCluster):
        admin.execute_command(*command, target_nodes=RedisCluster.ALL_NODES)
    else:
        admin.execute_command(*command)


@pytest.fixture
def admin(server_url: str, prefix: str) -> Iterator[Redis]:
    client = connect(server_url)
    yield client
    _delete_prefix(client, prefix)
    client.close()


@pytest.fixture
def clients(admin: Redis, server_url: str, prefix: str) -> Iterator[dict[str, Redis]]:
    """One connection per role, logged in as a user made from `usermgmt acl`'s rules."""
    roles = acl.roles(Keys(prefix), user_prefix=f"{prefix}-")
    connections: dict[str, Redis] = {}
    try:
        for role in roles:
            on_every_node(admin, "ACL", "SETUSER", role.user, *role.rules)
            on_every_node(admin, "ACL", "SETUSER", role.user, "on", f">{PASSWORD}")
            connections[role.role] = connect(server_url, username=role.user, password=PASSWORD)
        yield connections
    finally:
        for client in connections.values():
            client.close()
        for role in roles:
            on_every_node(admin, "ACL", "DELUSER", role.user)


def refused(call: Callable[[], Any]) -> bool:
    """Whether Redis refuses the call for lack of permission."""
    try:
        call()
    except NoPermissionError:
        return True
    except ResponseError as exc:
        return "NOPERM" in str(exc)
    return False


def test_the_rules_name_every_role_and_start_from_nothing(prefix: str) -> None:
    roles = acl.roles(Keys(prefix))
    assert [role.role for role in roles] == list(acl.ROLES)
    assert [role.user for role in roles] == [f"{prefix}-{name}" for name in acl.ROLES]
    for role in roles:
        assert role.rules[0] == "reset"
        assert all(prefix in rule for rule in role.rules if "~" in rule)
    line = roles[2].setuser()
    assert line.startswith(f"ACL SETUSER {prefix}-auth-client reset ")
    assert f'"(~{prefix}:auth:reply:* +blpop +lpop)"' in line


def test_every_role_connects_to_the_database_its_url_names_and_no_other(prefix: str) -> None:
    """A URL naming another database than 0 (`redis://…/3`) makes the client SELECT it
    on connecting: refused, no role could connect at all. Any other database stays
    refused: key patterns hold in every database, and another deployment under the same
    prefix may live in database 0. (A cluster has database 0 only: the standalone
    server is the case.)"""
    admin = _real_redis()
    roles = acl.roles(Keys(prefix), user_prefix=f"{prefix}-", database=3)
    try:
        for role in roles:
            admin.execute_command("ACL", "SETUSER", role.user, *role.rules)
            admin.execute_command("ACL", "SETUSER", role.user, "on", f">{PASSWORD}")
            url = urlsplit(REDIS_URL)._replace(path="/3").geturl()  # the same server
            other = Redis.from_url(url, username=role.user, password=PASSWORD)
            try:
                assert other.ping() is True, role.role
                assert refused(functools.partial(other.execute_command, "SELECT", "0")), role.role
                assert other.connection_pool.connection_kwargs["db"] == 3
            finally:
                other.close()
    finally:
        for role in roles:
            admin.execute_command("ACL", "DELUSER", role.user)
        admin.close()


def test_matchmaking_may_only_publish_updates_and_read_users_and_sessions(
    clients: dict[str, Redis], admin: Redis, prefix: str
) -> None:
    keys = Keys(prefix)
    matchmaking = clients["matchmaking"]
    admin.hset(keys.user("alice"), mapping={"username": "alice", "wallet": 5})
    admin.hset(keys.session("s1"), mapping={"status": "in_progress"})

    assert matchmaking.ping()
    assert matchmaking.xadd(keys.update_stream, {"payload": b"{}"})
    assert matchmaking.hgetall(keys.user("alice"))[b"wallet"] == b"5"
    assert matchmaking.hget(keys.session("s1"), "status") == b"in_progress"
    assert matchmaking.exists(keys.user("alice")) == 1

    assert refused(lambda: matchmaking.xadd(keys.terminate_stream, {"payload": b"{}"}))
    assert refused(lambda: matchmaking.xadd(keys.user("mallory"), {"payload": b"{}"}))
    assert refused(lambda: matchmaking.hset(keys.user("alice"), "wallet", 1_000_000))
    assert refused(lambda: matchmaking.delete(keys.session("s1")))
    assert refused(lambda: matchmaking.xrange(keys.update_stream))
    assert refused(lambda: matchmaking.xadd(keys.auth_requests, {"payload": b"{}"}))
    assert refused(lambda: matchmaking.keys(f"{prefix}:*"))
    assert refused(lambda: matchmaking.hgetall(f"{prefix}x:user:alice"))
    assert admin.hget(keys.user("alice"), "wallet") == b"5"
    assert not admin.exists(keys.terminate_stream)


def test_a_game_server_may_only_publish_results(
    clients: dict[str, Redis], admin: Redis, prefix: str
) -> None:
    keys = Keys(prefix)
    game_server = clients["game-server"]
    admin.hset(keys.user("alice"), "wallet", 5)

    assert game_server.xadd(keys.terminate_stream, {"payload": b"{}"})
    assert refused(lambda: game_server.xadd(keys.update_stream, {"payload": b"{}"}))
    assert refused(lambda: game_server.hgetall(keys.user("alice")))
    assert refused(lambda: game_server.xadd(keys.dlq, {"payload": b"{}"}))
    assert refused(lambda: game_server.xgroup_destroy(keys.terminate_stream, "usermgmt-events"))
    assert refused(lambda: game_server.xdel(keys.terminate_stream, "0-1"))
    assert not admin.exists(keys.update_stream)


def as_role(server_url: str, user: str) -> str:
    """The Redis URL logged in as `user`."""
    return server_url.replace("redis://", f"redis://{user}:{PASSWORD}@", 1)


def event_ids(admin: Redis, stream: str) -> list[str]:
    return [str(orjson.loads(fields[b"payload"])["event_id"]) for _, fields in admin.xrange(stream)]


def publish_as(
    server_url: str, user: str, prefix: str, tmp_path: Path, kind: str, lines: list[Any]
) -> subprocess.CompletedProcess[str]:
    """`usermgmt publish KIND FILE` as a process logged in as `user`, FILE holding `lines`."""
    file = tmp_path / f"{kind}-{uuid.uuid4().hex[:6]}.jsonl"
    file.write_bytes(b"\n".join(orjson.dumps(line) for line in lines))
    env = {
        **os.environ,
        "USERMGMT_REDIS_URL": as_role(server_url, user),
        "USERMGMT_DATABASE_URL": f"sqlite:///{tmp_path / 'unused.db'}",
        "USERMGMT_KEY_PREFIX": prefix,
        "PYTHONPATH": str(REPO),
    }
    return subprocess.run(
        [sys.executable, "-m", "usermgmt.workers.cli.main", "publish", kind, str(file)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("role", "kind", "event"),
    [
        ("matchmaking", "update", {"session_id": "p1", "players": ["alice", "bob"]}),
        ("game-server", "terminate", {"session_id": "p1", "results": RESULTS}),
    ],
)
def test_a_producer_role_can_publish_with_the_bundled_client_and_the_cli(
    clients: dict[str, Redis],
    admin: Redis,
    server_url: str,
    prefix: str,
    tmp_path: Path,
    role: str,
    kind: str,
    event: dict[str, Any],
) -> None:
    # Both wrap their XADDs in MULTI/EXEC: a role without them had the XADDs run one
    # by one outside the refused transaction, and the publisher told it had failed.
    keys = Keys(prefix)
    stream = keys.event_stream(kind)
    by_client = Publisher(clients[role], prefix=prefix)
    first = by_client.publish(kind, event)
    with by_client.batch() as batch:
        batch.add(kind, event)
        batch.add(kind, event)
    assert len(batch.entry_ids) == 2

    lines = [{**event, "event_id": str(uuid.uuid4())} for _ in range(2)]
    result = publish_as(server_url, f"{prefix}-{role}", prefix, tmp_path, kind, lines)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"published 2 {kind} event(s) to {stream}"
    assert result.stderr == ""
    sent = event_ids(admin, stream)
    assert len(sent) == 5
    assert sent[0] == str(first.event_id)
    assert sent[1:3] == [str(added.event_id) for added in batch.events]
    assert sent[3:] == [line["event_id"] for line in lines]


UPDATE = {"session_id": "p2", "players": ["alice", "bob"]}
TERMINATE = {"session_id": "p2", "results": RESULTS}


@pytest.fixture
def without_multi(admin: Redis, prefix: str) -> Iterator[str]:
    """A user with the matchmaking role's rules less MULTI/EXEC/DISCARD (as they were)."""
    (role,) = [role for role in acl.roles(Keys(prefix)) if role.role == "matchmaking"]
    user = f"{prefix}-nomulti"
    rules = [rule for rule in role.rules if rule not in ("+multi", "+exec", "+discard")]
    on_every_node(admin, "ACL", "SETUSER", user, *rules, "on", f">{PASSWORD}")
    try:
        yield user
    finally:
        on_every_node(admin, "ACL", "DELUSER", user)


def test_a_refused_multi_is_one_line_saying_the_events_may_have_been_published(
    without_multi: str, admin: Redis, server_url: str, prefix: str, tmp_path: Path
) -> None:
    stream = Keys(prefix).update_stream
    result = publish_as(server_url, without_multi, prefix, tmp_path, "update", [UPDATE] * 2)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"usermgmt: Redis refused the publish to {stream}: ")
    assert "'multi'" in result.stderr
    assert "0 of 2 event(s) were published and the next 2 may have been" in result.stderr
    assert admin.xlen(stream) == 2  # which is why "may have been"

    client = connect(server_url, username=without_multi, password=PASSWORD)
    try:
        with (
            pytest.raises(PublishFailed) as failed,
            Publisher(client, prefix=prefix).batch() as batch,
        ):
            batch.add("update", UPDATE)
        assert failed.value.published == []
        assert failed.value.unknown == batch.events
    finally:
        client.close()


def test_a_command_refused_in_the_transaction_is_one_line_saying_nothing_was_published(
    clients: dict[str, Redis], admin: Redis, server_url: str, prefix: str, tmp_path: Path
) -> None:
    keys = Keys(prefix)
    # A matchmaker may not publish results: Redis refuses the XADD as it is queued and
    # discards the whole transaction.
    user = f"{prefix}-matchmaking"
    result = publish_as(server_url, user, prefix, tmp_path, "terminate", [TERMINATE] * 2)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.rstrip().endswith("nothing was published")
    assert not admin.exists(keys.terminate_stream)
    with (
        pytest.raises(PublishFailed) as failed,
        Publisher(clients["matchmaking"], prefix=prefix).batch() as batch,
    ):
        batch.add("update", UPDATE)
        batch.add("terminate", TERMINATE)
    assert failed.value.published == failed.value.unknown == []
    assert not admin.exists(keys.update_stream)


def test_a_command_failing_in_the_transaction_says_which_events_were_published(
    clients: dict[str, Redis], admin: Redis, server_url: str, prefix: str, tmp_path: Path
) -> None:
    keys = Keys(prefix)
    # An update stream whose ids are exhausted: each XADD fails as EXEC runs it, and
    # Redis keeps what the others did.
    admin.xadd(
        keys.update_stream, {"payload": b"{}"}, id="18446744073709551615-18446744073709551615"
    )
    result = publish_as(
        server_url, f"{prefix}-matchmaking", prefix, tmp_path, "update", [UPDATE] * 2
    )
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1, result.stderr
    assert "exhausted the last possible ID" in result.stderr
    assert result.stderr.rstrip().endswith("nothing was published")
    assert admin.xlen(keys.update_stream) == 1

    with pytest.raises(PublishFailed) as failed, Publisher(admin, prefix=prefix).batch() as batch:
        batch.add("update", UPDATE)
        done = batch.add("terminate", TERMINATE)
    assert failed.value.published == [done]
    assert failed.value.unknown == []
    assert event_ids(admin, keys.terminate_stream) == [str(done.event_id)]
    assert "1 of 2 event(s) were published" in str(failed.value)


def test_an_auth_client_may_only_send_requests_and_pop_replies(
    clients: dict[str, Redis], admin: Redis, prefix: str
) -> None:
    keys = Keys(prefix)
    client = clients["auth-client"]
    reply_key = keys.reply(uuid.uuid4())
    admin.lpush(reply_key, b'{"ok": true}')
    admin.hset(keys.user("alice"), "wallet", 5)

    assert client.xadd(keys.auth_requests, {"payload": b"{}"})
    assert client.blpop([reply_key], timeout=1) == (reply_key.encode(), b'{"ok": true}')
    assert client.lpop(reply_key) is None
    assert refused(lambda: client.xadd(reply_key, {"payload": b"{}"}))
    assert refused(lambda: client.lpush(reply_key, b"forged"))
    assert refused(lambda: client.hgetall(keys.user("alice")))
    assert refused(lambda: client.xadd(keys.update_stream, {"payload": b"{}"}))
    assert refused(lambda: client.xrange(keys.auth_requests))
    assert refused(lambda: client.get(keys.token("0" * 64)))
    assert not admin.exists(keys.update_stream)


def test_the_worker_role_runs_the_worker_and_nothing_outside_the_prefix(
    clients: dict[str, Redis], admin: Redis, server_url: str, prefix: str, tmp_path: Path
) -> None:
    keys = Keys(prefix)
    database_url = f"sqlite:///{tmp_path / 'usermgmt.db'}"
    upgrade(database_url)
    settings = Settings(
        redis_url=server_url,
        database_url=database_url,
        key_prefix=prefix,
        bcrypt_rounds=4,
        retry_delay_ms=50,
        auth_concurrency=2,
    )
    services = Services(settings, clients["worker"], make_engine(database_url), keys)
    # The worker's own connection (USERMGMT_REDIS_CLUSTER=auto) tells a cluster from a
    # single server without INFO, which the role denies.
    credentials = server_url.replace("redis://", f"redis://{prefix}-worker:{PASSWORD}@", 1)
    own = make_redis(credentials)
    try:
        assert isinstance(own, RedisCluster) == (server_url != REDIS_URL)
        assert own.set(f"{prefix}:probe", 1) and own.delete(f"{prefix}:probe")
    finally:
        own.close()
    try:
        for name in ("alice", "bob"):
            accounts.create_user(services.engine, name, "x" * 60, wallet=0)
        # Producers publish through their own roles; the worker applies as the worker role.
        publish(clients["matchmaking"], keys, "update", session_id="g1", players=["alice", "bob"])
        publish(clients["game-server"], keys, "terminate", session_id="g1", results=RESULTS)
        publish(clients["game-server"], keys, "terminate", session_id="nope", results=RESULTS)
        drain(services, consumer="acl-worker")
        assert rows(services, "SELECT wallet FROM users ORDER BY username") == [(70,), (0,)]
        assert admin.zscore(keys.leaderboard, "alice") == 70

        # Auth round trip: the client role asks, the worker role answers.
        stop = threading.Event()
        server = AuthServer(services, "acl-worker", stop)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        try:
            user = AuthClient(clients["auth-client"], prefix=prefix).register("carol", PASSWORD)
            assert user["username"] == "carol"
        finally:
            stop.set()
            thread.join(15)

        # Operator work with the same role: status, dead letters, idle consumers, heartbeat.
        worker = clients["worker"]
        worker.set(keys.heartbeat("acl-worker"), orjson.dumps({"at": 0}), ex=15)
        report = status.collect(worker, services.engine, keys, database_url)
        assert {s.name for s in report.streams} >= {"update", "terminate", "auth_requests"}
        assert [w.consumer for w in report.workers] == ["acl-worker"]
        remove_idle_consumers(worker, keys.update_stream, "usermgmt-events", 10**9)
        assert dlq.purge(worker, keys) == report.dlq_length
        assert {plan.stream for plan in trim.trim_streams(services, retention_s=0)} >= {
            keys.update_stream,
            keys.terminate_stream,
        }
        assert replay.rebuild_caches(services.engine, worker, keys)
        assert admin.zscore(keys.leaderboard, "alice") == 70  # rebuilt as the worker
        saved = backup.backup(services, tmp_path / "backup.db")
        assert saved.marks_note is None  # the replay marks were read as the worker
        assert (tmp_path / "backup.db").stat().st_size > 0

        assert refused(lambda: worker.set("elsewhere:key", 1))
        assert refused(lambda: worker.get(f"{prefix}x:user:alice"))
        assert refused(lambda: worker.keys("*"))
        assert refused(lambda: worker.config_get("maxmemory"))
        assert evicting_policy(worker) is None  # INFO is allowed: the policy is readable
        assert "maxmemory_policy" in worker.info("memory")
        assert refused(lambda: worker.execute_command("ACL", "LIST"))
        # Server-wide code (Lua scripts and function libraries other applications on
        # the same Redis may rely on), messages to anyone, other databases: harmless
        # calls are made, the others checked with a dry run only.
        assert refused(lambda: worker.function_delete(f"{prefix}-no-such-library"))
        assert refused(lambda: worker.eval("return 1", 0))
        assert refused(lambda: worker.fcall(f"{prefix}_no_such_function", 0))
        assert refused(lambda: worker.publish(f"{prefix}-channel", "hello"))
        assert refused(lambda: worker.move(f"{prefix}:nothing", 9))
        assert refused(lambda: worker.copy(f"{prefix}:{{c}}a", f"{prefix}:{{c}}b", 9))
        user = f"{prefix}-worker"
        for command in (
            ["FLUSHALL"],
            ["FLUSHDB"],
            ["SHUTDOWN"],
            ["DEBUG", "SLEEP", "0"],
            ["FUNCTION", "FLUSH"],
            ["FUNCTION", "LOAD", "REPLACE", "#!lua name=probe\nredis.register_function('p', f)"],
            ["FUNCTION", "RESTORE", "payload", "REPLACE"],
            ["SCRIPT", "FLUSH"],
            ["SCRIPT", "LOAD", "return 1"],
            ["SWAPDB", "0", "1"],
        ):
            verdict = admin.execute_command("ACL", "DRYRUN", user, *command)
            assert b"no permissions" in verdict, command
        assert (
            admin.execute_command("ACL", "DRYRUN", user, "XADD", keys.dlq, "*", "a", "1") == b"OK"
        )
    finally:
        services.engine.dispose()
