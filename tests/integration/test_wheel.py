"""The built wheel adds one import name, `usermgmt`, and lives beside a game service's own
`domain`, `workers` and `migrations` packages.

The wheel is built from a copy of the sources (no build isolation, nothing downloaded)
and installed with `--no-index` into a scratch venv. That venv sees this project's
dependencies through a `.pth` line naming the development venv's site-packages (a plain
path: the editable install's own `.pth` files there are not processed, so the
repository itself stays invisible).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
# What the build needs: usermgmt/ holds symlinks to the four package folders.
BUILD_INPUTS = (
    "pyproject.toml",
    "README.md",
    "usermgmt",
    "domain",
    "persistence",
    "workers",
    "migrations",
)
SERVICE_PACKAGES = ("domain", "workers", "migrations")
PIP = (sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "-q")


def run(*args: str | Path, cwd: Path | None = None) -> str:
    done = subprocess.run(
        [str(arg) for arg in args],
        check=False,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTHONHOME"}},
    )
    assert done.returncode == 0, f"{args} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = tmp_path_factory.mktemp("source")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    for name in BUILD_INPUTS:
        path = REPO / name
        if path.is_dir() and not path.is_symlink():
            shutil.copytree(path, source / name, symlinks=True, ignore=ignore)
        else:
            shutil.copy2(path, source / name)
    dist = tmp_path_factory.mktemp("dist")
    run(*PIP, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", dist, source)
    (built,) = dist.glob("usermgmt-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A scratch venv with the wheel installed, borrowing the dependencies."""
    root = tmp_path_factory.mktemp("venv")
    run(sys.executable, "-m", "venv", "--without-pip", root)
    python = root / "bin" / "python"
    # Installed before the .pth exists, so pip sees no other usermgmt.
    run(*PIP, "--python", python, "install", "--no-deps", "--no-index", wheel)
    where = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(run(python, "-c", where).strip())
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "dev-venv-dependencies.pth").write_text("".join(f"{path}\n" for path in sorted(ours)))
    return root


def test_the_wheel_holds_one_top_level_name(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    tops = {name.split("/", 1)[0] for name in names}
    assert {top for top in tops if not top.endswith(".dist-info")} == {"usermgmt"}
    assert len(tops) == 2, tops  # usermgmt and its dist-info
    record = next(name for name in names if name.endswith(".dist-info/RECORD"))
    with zipfile.ZipFile(wheel) as archive:
        recorded = {line.split(",", 1)[0] for line in archive.read(record).decode().splitlines()}
    assert {path.split("/", 1)[0] for path in recorded} == tops
    for shipped in (
        "usermgmt/__init__.py",
        "usermgmt/domain/events.py",
        "usermgmt/persistence/keys.py",
        "usermgmt/workers/events/consumer.py",
        "usermgmt/workers/cli/main.py",
        "usermgmt/migrations/env.py",
        "usermgmt/migrations/script.py.mako",
        "usermgmt/migrations/versions/0001_initial_schema.py",
    ):
        assert shipped in names, shipped
    assert not [name for name in names if "__pycache__" in name or name.endswith(".pyc")]


def test_a_game_service_keeps_its_own_packages_beside_ours(venv: Path, tmp_path: Path) -> None:
    service = tmp_path / "game-service"
    for package in SERVICE_PACKAGES:
        (service / package).mkdir(parents=True)
        (service / package / "__init__.py").write_text(f'MARKER = "service {package}"\n')
    script = service / "check_imports.py"
    script.write_text(
        textwrap.dedent(
            """
            import importlib.util
            import sys
            from pathlib import Path

            service, venv = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()

            import domain
            import migrations
            import workers

            for module in (domain, workers, migrations):
                assert module.MARKER == f"service {module.__name__}", module
                assert Path(module.__file__).resolve().is_relative_to(service), module.__file__

            from usermgmt import AuthClient, Publisher
            import usermgmt
            import usermgmt.workers.events.consumer
            from usermgmt.persistence.db import MIGRATIONS_DIR

            ours = [
                usermgmt,
                usermgmt.workers.events.consumer,
                sys.modules[AuthClient.__module__],
                sys.modules[Publisher.__module__],
            ]
            for module in ours:
                assert Path(module.__file__).resolve().is_relative_to(venv), module.__file__
            assert MIGRATIONS_DIR.is_relative_to(venv), MIGRATIONS_DIR
            assert (MIGRATIONS_DIR / "script.py.mako").is_file()
            # The repository is not on the path: its folders are not importable here.
            assert importlib.util.find_spec("persistence") is None
            print("ok")
            """
        )
    )
    python = venv / "bin" / "python"
    assert run(python, script, service, venv, cwd=service).strip() == "ok"


def test_the_installed_console_script_migrates_a_database(venv: Path, tmp_path: Path) -> None:
    """The migrations (env.py, versions/) run from the installed copy, anywhere."""
    database = f"sqlite:///{tmp_path / 'service.db'}"
    out = run(venv / "bin" / "usermgmt", "migrate", "--database", database, cwd=tmp_path)
    assert "upgraded from empty" in out, out
    assert "usage: usermgmt" in run(venv / "bin" / "usermgmt", "--help", cwd=tmp_path)
