"""Settings: defaults, and one clear line naming the variable for any bad value.

See docs/protocol.md, "Settings".
"""

from __future__ import annotations

from pathlib import Path

import pytest

from usermgmt.workers.runtime.settings import ConfigError, Settings, load_settings

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


BAD_VALUES = [
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
        "sqlite://",
        "postgresql://u:p@h:5432/db",
        "postgresql+psycopg://u@h/db",
    ):
        assert load(database_url=url).database_url == url
