"""Settings: defaults, and one clear line naming the variable for any bad value.

See docs/protocol.md, "Settings".
"""

from __future__ import annotations

from pathlib import Path

import pytest
from redis.exceptions import ResponseError

from usermgmt.workers.runtime.settings import (
    BIGINT_MAX,
    ConfigError,
    Settings,
    load_settings,
    missing_redis_database,
)

VARIABLES = (
    "REDIS_URL",
    "DATABASE_URL",
    "KEY_PREFIX",
    "BCRYPT_ROUNDS",
    "USER_CACHE_TTL",
    "MAX_DELIVERIES",
    "CLAIM_IDLE_MS",
    "STARTING_WALLET",
    "LOG_FORMAT",
    "LOG_LEVEL",
    "RANK_REFRESH_S",
    "BATCH_SIZE",
    "AUTH_CONCURRENCY",
    "AUTH_NICE",
    "RETRY_DELAY_MS",
    "CONSUMER_IDLE_REMOVE_S",
    "MAX_WAIT_S",
    "SESSION_TIMEOUT_S",
    "STREAM_RETENTION_S",
    "TRIM_INTERVAL_S",
    "REDIS_CLUSTER",
)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No USERMGMT_* variable from the caller's shell leaks into these tests."""
    for name in VARIABLES:
        monkeypatch.delenv(f"USERMGMT_{name}", raising=False)


def load(**overrides: object) -> Settings:
    return load_settings(_env_file=None, **overrides)


def test_defaults_follow_the_spec() -> None:
    settings = load()
    assert settings.redis_url == "redis://localhost:6379/0"
    assert settings.database_url == "sqlite:///usermgmt.db"
    assert settings.key_prefix == "um"
    assert settings.bcrypt_rounds == 12
    assert settings.user_cache_ttl == 300
    assert settings.max_deliveries == 5
    assert settings.claim_idle_ms == 30_000
    assert settings.starting_wallet == 0
    assert settings.log_format is None  # decided by whether stderr is a terminal
    assert settings.auth_concurrency >= 1
    assert settings.auth_nice == "idle"


@pytest.mark.parametrize(("given", "read"), [("idle", "idle"), ("0", 0), ("10", 10), ("19", 19)])
def test_the_auth_threads_priority_is_idle_or_a_nice_value(
    monkeypatch: pytest.MonkeyPatch, given: str, read: object
) -> None:
    monkeypatch.setenv("USERMGMT_AUTH_NICE", given)
    assert load().auth_nice == read


def test_every_spec_variable_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    values = {
        "REDIS_URL": "redis://cache.internal:6380/2",
        "DATABASE_URL": "postgresql://game@db.internal/users",
        "KEY_PREFIX": "game-7",
        "BCRYPT_ROUNDS": "4",
        "USER_CACHE_TTL": "60",
        "MAX_DELIVERIES": "3",
        "CLAIM_IDLE_MS": "5000",
        "STARTING_WALLET": "100",
        "LOG_FORMAT": "console",
        "AUTH_CONCURRENCY": "3",
    }
    for name, value in values.items():
        monkeypatch.setenv(f"USERMGMT_{name}", value)
    settings = load()
    assert settings.redis_url == values["REDIS_URL"]
    assert settings.database_url == values["DATABASE_URL"]
    assert settings.key_prefix == "game-7"
    assert settings.bcrypt_rounds == 4
    assert settings.user_cache_ttl == 60
    assert settings.max_deliveries == 3
    assert settings.claim_idle_ms == 5000
    assert settings.starting_wallet == 100
    assert settings.log_format == "console"
    assert settings.auth_concurrency == 3


def test_a_dotenv_file_sets_variables(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("USERMGMT_BCRYPT_ROUNDS=5\nUSERMGMT_KEY_PREFIX=fromfile\n")
    settings = load_settings(_env_file=env_file)
    assert (settings.bcrypt_rounds, settings.key_prefix) == (5, "fromfile")


def test_a_bad_value_in_a_dotenv_file_names_the_variable(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("USERMGMT_USER_CACHE_TTL=soon\n")
    with pytest.raises(ConfigError, match=r"^invalid setting USERMGMT_USER_CACHE_TTL\b"):
        load_settings(_env_file=env_file)


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b"USERMGMT_KEY_PREFIX=caf\xe9\n", "USERMGMT_KEY_PREFIX in"),
        (b"USERMGMT_BATCH_SIZE=10\n\xff\xfe\n", "(line 2)"),
    ],
)
def test_a_dotenv_file_that_is_not_utf8_is_one_line(
    tmp_path: Path, content: bytes, says: str
) -> None:
    env_file = tmp_path / ".env"
    env_file.write_bytes(content)
    with pytest.raises(ConfigError) as caught:
        load_settings(_env_file=env_file)
    assert str(caught.value).startswith("invalid setting ")
    assert says in str(caught.value) and str(env_file) in str(caught.value)
    assert "not UTF-8" in str(caught.value) and "\n" not in str(caught.value)


HUGE = "9" * 20  # spelled out: beyond any signed 64-bit integer
DB = "redis://cache.internal:6379"

# Values a consumer cannot hold (Redis PX/EX, a `threading` wait, SQL BIGINT) or that
# are not finite, with what the one-line message must say (the bound, or the reason).
OUT_OF_RANGE = [
    ("DATABASE_URL", "sqlite://", "an in-memory SQLite database ends with its connection"),
    ("DATABASE_URL", "sqlite:///:memory:", "give a file, e.g. sqlite:///usermgmt.db"),
    ("DATABASE_URL", "sqlite:///file::memory:?cache=shared&uri=true", "in-memory SQLite"),
    ("DATABASE_URL", "sqlite:///file:x?mode=memory&uri=true", "in-memory SQLite"),
    ("REDIS_URL", f"{DB}/abc", "database 'abc' is not a number"),
    ("REDIS_URL", f"{DB}/-1", "database '-1' is not a number"),
    ("REDIS_URL", f"{DB}/1/2", "database '1/2' is not a number"),
    ("REDIS_URL", f"{DB}/ 3", "database ' 3' is not a number"),
    ("REDIS_URL", f"{DB}/2147483647", "from 0 to 2147483646"),
    ("REDIS_URL", f"{DB}/{HUGE}", "from 0 to 2147483646"),
    ("REDIS_URL", f"{DB}/0?db=-1", "db must be from 0 to 2147483646"),
    ("REDIS_URL", "unix:///run/redis.sock?db=-2", "db must be from 0 to 2147483646"),
    ("REDIS_URL", f"{DB}/0?socket_timeout=inf", "socket_timeout must be seconds"),
    ("REDIS_URL", f"{DB}/0?socket_timeout=nan", "socket_timeout must be seconds"),
    ("REDIS_URL", f"{DB}/0?socket_timeout=-1", "socket_timeout must be seconds"),
    ("REDIS_URL", f"{DB}/0?socket_timeout=0", "socket_timeout must be seconds"),
    ("REDIS_URL", f"{DB}/0?socket_connect_timeout=1e10", "<= 86400"),
    ("REDIS_URL", f"{DB}/0?max_connections=-1", "max_connections must be from 1"),
    ("REDIS_URL", f"{DB}/0?max_connections=0", "max_connections must be from 1"),
    ("REDIS_URL", f"{DB}/0?health_check_interval=-5", "health_check_interval must be"),
    ("REDIS_URL", f"{DB}/0?sockettimeout=5", "unknown option 'sockettimeout'"),
    ("REDIS_URL", f"{DB}/0?ssl_cert_reqs=none", "unknown option 'ssl_cert_reqs'"),
    ("REDIS_URL", f"{DB}/0?protocol=9", "protocol must be either 2 or 3"),
    ("REDIS_URL", f"{DB}/0?protocol=3", "protocol must be 2 (RESP2)"),
    ("REDIS_URL", f"{DB}/0?encoding=bogus", "unknown encoding 'bogus'"),
    ("REDIS_URL", f"{DB}/0?encoding_errors=bogus", "unknown encoding_errors handler"),
    ("REDIS_URL", f"{DB}/0?client_name=a%20b", "client_name must be printable"),
    ("REDIS_URL", f"{DB}/0?retry=3", "option 'retry' cannot be set in the URL"),
    ("REDIS_URL", f"{DB}/0?credential_provider=x", "cannot be set in the URL"),
    ("USER_CACHE_TTL", "31536001", "less than or equal to 31536000"),
    ("USER_CACHE_TTL", HUGE, "less than or equal to 31536000"),
    ("USER_CACHE_TTL", "1e20", "valid integer"),
    ("MAX_DELIVERIES", "1000001", "less than or equal to 1000000"),
    ("MAX_DELIVERIES", HUGE, "less than or equal to 1000000"),
    ("MAX_DELIVERIES", "1e20", "valid integer"),
    ("MAX_WAIT_S", "inf", "finite number"),
    ("MAX_WAIT_S", "-inf", "finite number"),
    ("MAX_WAIT_S", "nan", "finite number"),
    ("MAX_WAIT_S", "1e400", "finite number"),
    ("MAX_WAIT_S", "3153600001", "less than or equal to 3153600000"),
    ("MAX_WAIT_S", "0", "greater than 0"),
    ("SESSION_TIMEOUT_S", "inf", "finite number"),
    ("SESSION_TIMEOUT_S", "nan", "finite number"),
    ("SESSION_TIMEOUT_S", "3153600001", "less than or equal to 3153600000"),
    ("SESSION_TIMEOUT_S", "-1", "greater than or equal to 0"),
    ("CLAIM_IDLE_MS", HUGE, "less than or equal to 86400000"),
    ("CLAIM_IDLE_MS", "86400001", "less than or equal to 86400000"),
    ("STARTING_WALLET", str(2**63), f"less than or equal to {BIGINT_MAX}"),
    ("STARTING_WALLET", "99999999999999999999999", f"less than or equal to {BIGINT_MAX}"),
    ("RANK_REFRESH_S", "inf", "finite number"),
    ("RANK_REFRESH_S", "nan", "finite number"),
    ("RANK_REFRESH_S", "86401", "less than or equal to 86400"),
    ("BATCH_SIZE", "10001", "less than or equal to 10000"),
    ("AUTH_CONCURRENCY", "1025", "less than or equal to 1024"),
    ("RETRY_DELAY_MS", "3600001", "less than or equal to 3600000"),
    ("RETRY_DELAY_MS", HUGE, "less than or equal to 3600000"),
    ("CONSUMER_IDLE_REMOVE_S", "inf", "finite number"),
    ("CONSUMER_IDLE_REMOVE_S", "31536001", "less than or equal to 31536000"),
    ("STREAM_RETENTION_S", "inf", "finite number"),
    ("STREAM_RETENTION_S", "3153600001", "less than or equal to 3153600000"),
    ("STREAM_RETENTION_S", "-1", "greater than or equal to 0"),
    ("TRIM_INTERVAL_S", "inf", "finite number"),
    ("TRIM_INTERVAL_S", "nan", "finite number"),
    ("TRIM_INTERVAL_S", "604801", "less than or equal to 604800"),
    ("TRIM_INTERVAL_S", "-1", "greater than or equal to 0"),
]

BAD_VALUES = [(name, value) for name, value, _ in OUT_OF_RANGE] + [
    ("REDIS_URL", "http://localhost:6379"),
    ("REDIS_URL", "localhost:6379"),
    ("REDIS_URL", "redis://localhost:port/0"),
    ("DATABASE_URL", "mysql://user@host/db"),
    ("DATABASE_URL", "not a url"),
    ("KEY_PREFIX", ""),
    ("KEY_PREFIX", "um prefix"),
    ("KEY_PREFIX", "um:{x}"),
    ("KEY_PREFIX", "p" * 33),
    ("BCRYPT_ROUNDS", "abc"),
    ("BCRYPT_ROUNDS", "3"),
    ("BCRYPT_ROUNDS", "32"),
    ("BCRYPT_ROUNDS", "12.5"),
    ("BCRYPT_ROUNDS", ""),
    ("USER_CACHE_TTL", "0"),
    ("USER_CACHE_TTL", "-5"),
    ("USER_CACHE_TTL", "five"),
    ("MAX_DELIVERIES", "0"),
    ("MAX_DELIVERIES", "many"),
    ("CLAIM_IDLE_MS", "10"),
    ("CLAIM_IDLE_MS", "30s"),
    ("STARTING_WALLET", "-1"),
    ("STARTING_WALLET", "lots"),
    ("LOG_FORMAT", "xml"),
    ("LOG_FORMAT", "JSON "),
    ("LOG_LEVEL", "loud"),
    ("RANK_REFRESH_S", "0"),
    ("BATCH_SIZE", "0"),
    ("AUTH_CONCURRENCY", "0"),
    ("AUTH_CONCURRENCY", "two"),
    ("AUTH_NICE", "20"),
    ("AUTH_NICE", "-1"),
    ("AUTH_NICE", "lazy"),
    ("AUTH_NICE", "1.5"),
    ("RETRY_DELAY_MS", "1"),
    ("CONSUMER_IDLE_REMOVE_S", "-1"),
    ("REDIS_CLUSTER", "yes"),
]


@pytest.mark.parametrize(("name", "value"), BAD_VALUES, ids=lambda v: str(v)[:20])
def test_every_bad_value_is_one_line_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(f"USERMGMT_{name}", value)
    with pytest.raises(ConfigError) as caught:
        load()
    message = str(caught.value)
    assert message.startswith(f"invalid setting USERMGMT_{name}")
    assert "\n" not in message
    assert "Traceback" not in message
    assert len(message) < 300
    assert caught.value.__suppress_context__  # `from None`: no chained pydantic dump


@pytest.mark.parametrize(("name", "value", "said"), OUT_OF_RANGE, ids=lambda v: str(v)[:30])
def test_a_value_out_of_range_or_not_finite_is_refused_with_its_bound(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, said: str
) -> None:
    monkeypatch.setenv(f"USERMGMT_{name}", value)
    with pytest.raises(ConfigError) as caught:
        load()
    message = str(caught.value)
    assert message.startswith(f"invalid setting USERMGMT_{name}="), message
    assert said in message, message
    assert "\n" not in message


# The largest values each setting accepts, and other large but reasonable ones.
LARGE_VALUES = [
    ("REDIS_URL", "redis_url", f"{DB}/15", f"{DB}/15"),
    ("REDIS_URL", "redis_url", f"{DB}/2147483646", f"{DB}/2147483646"),
    ("REDIS_URL", "redis_url", f"{DB}/", f"{DB}/"),
    ("REDIS_URL", "redis_url", DB, DB),
    (
        "REDIS_URL",
        "redis_url",
        f"{DB}/0?db=3&socket_timeout=86400",
        f"{DB}/0?db=3&socket_timeout=86400",
    ),
    ("REDIS_URL", "redis_url", "unix:///run/redis.sock?db=3", "unix:///run/redis.sock?db=3"),
    (
        "REDIS_URL",
        "redis_url",
        "rediss://u:p@cache/7?socket_connect_timeout=2.5",
        "rediss://u:p@cache/7?socket_connect_timeout=2.5",
    ),
    ("USER_CACHE_TTL", "user_cache_ttl", "31536000", 31_536_000),
    ("MAX_DELIVERIES", "max_deliveries", "1000000", 1_000_000),
    ("MAX_WAIT_S", "max_wait_s", "3153600000", 3_153_600_000.0),
    ("MAX_WAIT_S", "max_wait_s", "1e9", 1e9),  # "never", as some tests use it
    ("MAX_WAIT_S", "max_wait_s", "0.001", 0.001),
    ("SESSION_TIMEOUT_S", "session_timeout_s", "3153600000", 3_153_600_000.0),
    ("SESSION_TIMEOUT_S", "session_timeout_s", "0", 0.0),
    ("CLAIM_IDLE_MS", "claim_idle_ms", "86400000", 86_400_000),
    ("STARTING_WALLET", "starting_wallet", str(BIGINT_MAX), BIGINT_MAX),
    ("STARTING_WALLET", "starting_wallet", "1000000000000", 10**12),
    ("RANK_REFRESH_S", "rank_refresh_s", "86400", 86_400.0),
    ("RANK_REFRESH_S", "rank_refresh_s", "0.5", 0.5),
    ("BATCH_SIZE", "batch_size", "10000", 10_000),
    ("AUTH_CONCURRENCY", "auth_concurrency", "1024", 1_024),
    ("RETRY_DELAY_MS", "retry_delay_ms", "3600000", 3_600_000),
    ("CONSUMER_IDLE_REMOVE_S", "consumer_idle_remove_s", "31536000", 31_536_000.0),
    ("STREAM_RETENTION_S", "stream_retention_s", "3153600000", 3_153_600_000.0),
    ("STREAM_RETENTION_S", "stream_retention_s", "0", 0.0),
    ("TRIM_INTERVAL_S", "trim_interval_s", "604800", 604_800.0),
    ("TRIM_INTERVAL_S", "trim_interval_s", "0", 0.0),
]


@pytest.mark.parametrize(
    ("name", "field", "value", "read"), LARGE_VALUES, ids=lambda v: str(v)[:30]
)
def test_large_but_reasonable_values_are_accepted(
    monkeypatch: pytest.MonkeyPatch, name: str, field: str, value: str, read: object
) -> None:
    monkeypatch.setenv(f"USERMGMT_{name}", value)
    assert getattr(load(), field) == read


def test_the_longest_waits_convert_to_milliseconds() -> None:
    settings = load(max_wait_s="3153600000", session_timeout_s="3153600000")
    limits = settings.limits()
    assert limits.max_wait_ms == limits.session_timeout_ms == 3_153_600_000_000 < 2**63


@pytest.mark.parametrize(("timeout_s", "timeout_ms"), [("0", 0), ("0.0001", 1), ("1.5", 1_500)])
def test_a_tiny_session_timeout_does_not_round_to_never(timeout_s: str, timeout_ms: int) -> None:
    """0 means sessions never expire; a positive timeout stays at least 1 ms."""
    limits = load(session_timeout_s=timeout_s, max_wait_s="0.0001").limits()
    assert (limits.session_timeout_ms, limits.max_wait_ms) == (timeout_ms, 1)


def test_the_default_auth_concurrency_stays_within_its_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: 4_096)
    assert load().auth_concurrency == 1_024


def test_a_database_redis_does_not_have_is_one_line_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Only the server knows how many databases it has: its refusal becomes a setting error."""
    monkeypatch.chdir(tmp_path)  # no .env of the caller's
    monkeypatch.setenv("USERMGMT_REDIS_URL", "redis://:hunter2-secret@cache:6379/99")
    error = missing_redis_database(ResponseError("DB index is out of range"))
    assert error is not None
    message = str(error)
    assert message.startswith("invalid setting USERMGMT_REDIS_URL='redis://:***@cache:6379/99'")
    assert "DB index is out of range" in message
    assert "hunter2-secret" not in message
    assert "\n" not in message
    assert missing_redis_database(ResponseError("WRONGTYPE Operation against a key")) is None


def test_every_variable_has_a_bad_value_case() -> None:
    assert {name for name, _ in BAD_VALUES} == set(VARIABLES)


def test_a_value_with_a_newline_stays_on_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("USERMGMT_BCRYPT_ROUNDS", "4\nUSERMGMT_OTHER=1")
    with pytest.raises(ConfigError) as caught:
        load()
    assert "\n" not in str(caught.value)
    assert "USERMGMT_BCRYPT_ROUNDS" in str(caught.value)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("REDIS_URL", "redis://:hunter2-secret@cache:port/0"),
        ("REDIS_URL", "redis://user:hunter2-secret@cache/0?socket_timeout=soon"),
        ("DATABASE_URL", "mysql://game:hunter2-secret@db/users"),
        ("REDIS_URL", "redis://:hunter2-secret@cache/abc"),
        ("REDIS_URL", "redis://:hunter2-secret@cache/0?socket_timeout=inf"),
    ],
)
def test_a_bad_url_is_shown_without_its_password(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(f"USERMGMT_{name}", value)
    with pytest.raises(ConfigError) as caught:
        load()
    assert f"USERMGMT_{name}" in str(caught.value)
    assert "hunter2-secret" not in str(caught.value)


def test_an_override_is_reported_with_its_own_value(monkeypatch: pytest.MonkeyPatch) -> None:
    """`--database bad` must not be reported as the (valid) environment value."""
    monkeypatch.setenv("USERMGMT_DATABASE_URL", "sqlite:///fine.db")
    with pytest.raises(ConfigError) as caught:
        load(database_url="oracle://db/users")
    assert "oracle://db/users" in str(caught.value)
    assert "fine.db" not in str(caught.value)


def test_sqlite_and_postgresql_urls_are_accepted() -> None:
    for url in (
        "sqlite:///relative.db",
        "sqlite:////abs/path.db",
        "postgresql://u:p@h:5432/db",
        "postgresql+psycopg://u@h/db",
    ):
        assert load(database_url=url).database_url == url


@pytest.mark.parametrize(
    "url",
    [
        "redis://user:secret@cache:6379/3?socket_timeout=5&client_name=worker-1",
        "redis://cache/0?encoding=latin-1&encoding_errors=replace&health_check_interval=30",
        "rediss://cache:6380/0?ssl_cert_reqs=required&ssl_ca_certs=/etc/ca.pem",
        "unix:///run/redis.sock?db=2&socket_connect_timeout=1",
    ],
)
def test_redis_urls_with_options_redis_py_takes_from_text_are_accepted(url: str) -> None:
    assert load(redis_url=url).redis_url == url
