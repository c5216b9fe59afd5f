"""docker-compose.yml and the Dockerfile, checked without Docker.

Every `usermgmt` command the stack runs (service commands, healthchecks, the image's
CMD) must parse with the real CLI parser, so a renamed command or option breaks this
test instead of a deployment. Environment variables must be real settings.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from usermgmt.workers.cli.main import build_parser
from usermgmt.workers.runtime.settings import ENV_PREFIX, Settings

REPO = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
DOCKERFILE = (REPO / "Dockerfile").read_text()
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
APP_SERVICES = [name for name, service in SERVICES.items() if service.get("build") == "."]
SCALE = ["postgres", "migrate-pg", "events-1", "events-2", "auth"]


def argv(command: str | list[str]) -> list[str]:
    """A compose command or healthcheck test as an argument list."""
    if isinstance(command, str):
        return shlex.split(command)
    if command and command[0] == "CMD":
        return list(command[1:])
    if command and command[0] == "CMD-SHELL":
        return shlex.split(command[1])
    return list(command)


def parse_usermgmt(words: list[str]) -> argparse.Namespace:
    """Parse `usermgmt ...` with the real parser; an unknown command or option fails here.

    Options must be spelled out: argparse would accept `--metrics` for `--metrics-port`,
    and such an abbreviation breaks as soon as another option shares the start.
    """
    assert words[0] == "usermgmt", words
    parser = build_parser()
    try:
        args = parser.parse_args(words[1:])
    except SystemExit as exc:
        pytest.fail(f"`{shlex.join(words)}` is not a valid usermgmt command (exit {exc.code})")
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    known = subparsers.choices[words[1]]._option_string_actions
    for word in words[2:]:
        if word.startswith("-"):
            assert word.split("=", 1)[0] in known, f"{word} is not an option of {words[1]}"
    return args


def usermgmt_commands() -> list[tuple[str, list[str]]]:
    """Every usermgmt invocation in the compose file and the Dockerfile's CMD."""
    found = []
    for name, service in SERVICES.items():
        for key, command in (
            ("command", service.get("command")),
            ("healthcheck", (service.get("healthcheck") or {}).get("test")),
        ):
            if command and argv(command)[0] == "usermgmt":
                found.append((f"{name}.{key}", argv(command)))
    cmd = re.search(r"^CMD (\[.*\])$", DOCKERFILE, re.MULTILINE)
    assert cmd is not None, "the Dockerfile has no exec-form CMD"
    found.append(("Dockerfile CMD", json.loads(cmd.group(1))))
    return found


COMMANDS = usermgmt_commands()


@pytest.mark.parametrize(("where", "words"), COMMANDS, ids=[where for where, _ in COMMANDS])
def test_every_usermgmt_command_is_real(where: str, words: list[str]) -> None:
    args = parse_usermgmt(words)
    assert args.command == words[1], where


def test_every_app_service_runs_a_usermgmt_command() -> None:
    assert set(APP_SERVICES) == {"migrate", "worker", "simulate", *SCALE} - {"postgres"}
    for name in APP_SERVICES:
        assert argv(SERVICES[name]["command"])[0] == "usermgmt", name
        assert SERVICES[name]["image"] == "usermgmt:local"
        assert SERVICES[name]["build"] == "."


def test_redis_persists_with_aof_and_has_a_healthcheck() -> None:
    redis = SERVICES["redis"]
    words = argv(redis["command"])
    assert words[0] == "redis-server"
    assert words[words.index("--appendonly") + 1] == "yes"
    assert argv(redis["healthcheck"]["test"]) == ["redis-cli", "ping"]
    assert any(volume.endswith(":/data") for volume in redis["volumes"])
    assert "redis-data" in COMPOSE["volumes"]


def test_migrate_runs_once_and_the_worker_waits_for_it_and_for_redis() -> None:
    assert parse_usermgmt(argv(SERVICES["migrate"]["command"])).command == "migrate"
    assert SERVICES["migrate"]["restart"] == "no"
    worker = SERVICES["worker"]
    assert worker["depends_on"] == {
        "redis": {"condition": "service_healthy"},
        "migrate": {"condition": "service_completed_successfully"},
    }
    assert worker["restart"] in ("unless-stopped", "always", "on-failure")


def test_the_worker_is_checked_by_usermgmt_health_and_serves_metrics() -> None:
    worker = SERVICES["worker"]
    health = parse_usermgmt(argv(worker["healthcheck"]["test"]))
    assert health.command == "health"
    for field in ("interval", "timeout", "retries", "start_period"):
        assert field in worker["healthcheck"], field
    args = parse_usermgmt(argv(worker["command"]))
    assert args.command == "worker"
    assert args.metrics_port is not None
    assert f"{args.metrics_port}:{args.metrics_port}" in worker["ports"]
    assert f"EXPOSE {args.metrics_port}" in DOCKERFILE
    grace = int(str(worker["stop_grace_period"]).rstrip("s"))
    assert grace > args.drain_timeout  # SIGTERM drains before Docker's SIGKILL


def test_simulate_is_an_optional_profile_after_a_healthy_worker() -> None:
    simulate = SERVICES["simulate"]
    assert simulate["profiles"] == ["simulate"]
    assert parse_usermgmt(argv(simulate["command"])).command == "simulate"
    assert simulate["depends_on"] == {"worker": {"condition": "service_healthy"}}
    assert all("profiles" not in SERVICES[name] for name in ("redis", "migrate", "worker"))


def test_the_scale_profile_runs_postgres_two_event_workers_and_an_auth_worker() -> None:
    """`docker compose --profile scale up`: the default services are untouched, and the
    profile's own are PostgreSQL, its migration and three workers on it."""
    profiled = {name for name, service in SERVICES.items() if "profiles" in service}
    assert profiled == {"simulate", *SCALE}
    assert all(SERVICES[name]["profiles"] == ["scale"] for name in SCALE)
    postgres = SERVICES["postgres"]
    assert postgres["image"].startswith("postgres:")
    assert "pg_isready" in " ".join(argv(postgres["healthcheck"]["test"]))
    assert any(volume.endswith(":/var/lib/postgresql/data") for volume in postgres["volumes"])
    assert "pg-data" in COMPOSE["volumes"]
    env = postgres["environment"]
    url = f"postgresql+psycopg://{env['POSTGRES_USER']}:{env['POSTGRES_PASSWORD']}@postgres:5432/"
    for name in SCALE[1:]:
        service = SERVICES[name]
        assert service["environment"]["USERMGMT_DATABASE_URL"] == url + env["POSTGRES_DB"]
        # Keys apart from the SQLite worker's: one consumer group per database.
        assert service["environment"]["USERMGMT_KEY_PREFIX"] != "um"
    assert SERVICES["migrate-pg"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert parse_usermgmt(argv(SERVICES["migrate-pg"]["command"])).command == "migrate"
    consumers = set()
    for name, only in (("events-1", "events"), ("events-2", "events"), ("auth", "auth")):
        service = SERVICES[name]
        args = parse_usermgmt(argv(service["command"]))
        assert (args.command, args.only) == ("worker", only)
        consumers.add(args.consumer)
        assert service["depends_on"] == {
            "redis": {"condition": "service_healthy"},
            "postgres": {"condition": "service_healthy"},
            "migrate-pg": {"condition": "service_completed_successfully"},
        }
        assert parse_usermgmt(argv(service["healthcheck"]["test"])).command == "health"
        assert int(str(service["stop_grace_period"]).rstrip("s")) > args.drain_timeout
        assert "ports" not in service  # the default worker has the metrics port
    assert len(consumers) == 3


def test_the_default_services_are_unchanged_by_the_profiles() -> None:
    """`docker compose up` (no profile) starts exactly what it did before `scale` existed."""
    default = {name for name, service in SERVICES.items() if "profiles" not in service}
    assert default == {"redis", "migrate", "worker"}
    app = {
        "build": ".",
        "image": "usermgmt:local",
        "environment": {
            "USERMGMT_REDIS_URL": "redis://redis:6379/0",
            "USERMGMT_DATABASE_URL": "sqlite:////data/usermgmt.db",
            "USERMGMT_KEY_PREFIX": "um",
            "USERMGMT_LOG_FORMAT": "json",
        },
        "volumes": ["app-data:/data"],
    }
    assert SERVICES["migrate"] == {**app, "command": ["usermgmt", "migrate"], "restart": "no"}
    assert SERVICES["worker"] == {
        **app,
        "command": ["usermgmt", "worker", "--metrics-port", "9108", "--drain-timeout", "30"],
        "depends_on": {
            "redis": {"condition": "service_healthy"},
            "migrate": {"condition": "service_completed_successfully"},
        },
        "healthcheck": {
            "test": ["CMD", "usermgmt", "health", "--this-host"],
            "interval": "10s",
            "timeout": "5s",
            "retries": 3,
            "start_period": "20s",
        },
        "restart": "unless-stopped",
        "stop_grace_period": "40s",
        "ports": ["9108:9108"],
    }
    assert SERVICES["redis"]["image"] == "redis:7.2-alpine"
    assert SERVICES["redis"]["ports"] == ["6379:6379"]
    assert "depends_on" not in SERVICES["redis"]


@pytest.mark.parametrize("name", APP_SERVICES)
def test_environment_variables_are_real_settings_with_valid_values(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    image_env = dict(re.findall(r"(USERMGMT_[A-Z_]+)=(\S+)", DOCKERFILE))
    service_env = {k: str(v) for k, v in SERVICES[name]["environment"].items()}
    env = {**image_env, **service_env}  # compose's environment overrides the image's ENV
    fields = set(Settings.model_fields)
    for variable in env:
        assert variable.startswith(ENV_PREFIX)
        assert variable.removeprefix(ENV_PREFIX).lower() in fields, variable
    for variable, value in env.items():
        monkeypatch.setenv(variable, value)
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.redis_url == "redis://redis:6379/0"
    if name in SCALE:
        assert settings.database_url.startswith("postgresql+psycopg://")
        assert settings.database_url.split("@", 1)[1].startswith("postgres:5432/")
        assert settings.key_prefix == "ums"
        assert SERVICES[name]["volumes"] == []  # nothing of the SQLite volume
    else:
        assert settings.database_url == "sqlite:////data/usermgmt.db"
        assert settings.key_prefix == "um"
        # The SQLite file lives on the volume.
        assert SERVICES[name]["volumes"] == ["app-data:/data"]


def test_the_postgres_driver_is_a_dependency_of_the_image() -> None:
    """The image installs the wheel, so `postgresql+psycopg://` needs psycopg in
    pyproject's runtime dependencies (not an extra)."""
    pyproject = (REPO / "pyproject.toml").read_text()
    dependencies = re.search(r"^dependencies = \[(.*?)^\]", pyproject, re.MULTILINE | re.DOTALL)
    assert dependencies is not None
    assert re.search(r'"psycopg(\[[a-z,]+\])?>=3', dependencies.group(1))


def test_the_image_holds_every_package_and_the_build_context_keeps_them() -> None:
    for package in ("usermgmt", "domain", "persistence", "workers", "migrations"):
        assert re.search(rf"^COPY {package} ", DOCKERFILE, re.MULTILINE), package
    assert "COPY pyproject.toml README.md" in DOCKERFILE
    ignored = {
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    packages = {"usermgmt", "domain", "persistence", "workers", "migrations"}
    assert not ignored & {*packages, "README.md"}
    assert {".git", ".venv", "tests"} <= ignored
    assert re.search(r"^USER (?!root)\w+", DOCKERFILE, re.MULTILINE)
