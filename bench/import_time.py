"""What `from usermgmt import Publisher, AuthClient` costs a game service.

Each run is a fresh interpreter that times the import with `time.perf_counter()` and
lists which of the worker's heavy dependencies (SQLAlchemy, Alembic, bcrypt, psycopg)
it loaded: none should be. `python -m bench.import_time [--runs N]` prints the
milliseconds of every run and their median; tests/unit/test_client_imports.py runs
the same probe once.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from dataclasses import dataclass

HEAVY = ("sqlalchemy", "alembic", "bcrypt", "psycopg")

PROBE = f"""
import json, sys, time
started = time.perf_counter()
from usermgmt import AuthClient, AuthError, Publisher
elapsed_ms = (time.perf_counter() - started) * 1000
heavy = sorted(
    name for name in sys.modules
    if any(name == h or name.startswith(h + ".") for h in {HEAVY!r})
)
print(json.dumps({{"ms": elapsed_ms, "heavy": heavy}}))
"""


@dataclass(frozen=True)
class ImportProbe:
    """One fresh interpreter's import of the client API."""

    ms: float
    heavy: list[str]  # heavy modules (or their submodules) the import loaded


def probe(python: str = sys.executable, cwd: str | None = None) -> ImportProbe:
    """Import the client API in a new interpreter; its time and what it loaded."""
    done = subprocess.run(
        [python, "-c", PROBE], capture_output=True, text=True, check=True, cwd=cwd, timeout=60
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return ImportProbe(ms=float(result["ms"]), heavy=list(result["heavy"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5, help="fresh interpreters (default 5)")
    args = parser.parse_args(argv)
    times = []
    for run in range(1, args.runs + 1):
        result = probe()
        times.append(result.ms)
        loaded = ", ".join(result.heavy) or "none"
        print(f"run {run}: {result.ms:.1f} ms (heavy modules loaded: {loaded})")
    print(f"median: {statistics.median(times):.1f} ms over {len(times)} runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
