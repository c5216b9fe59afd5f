# The verbs people type. Everything installs into .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.install-stamp

.PHONY: install test lint format demo bench bench-full soak clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest

# The whole loop: worker + simulated games + leaderboard. Sizes and the rest:
# make demo DEMO_ARGS="--players 50 --games 300"   (python -m usermgmt.workers.sim.demo --help)
demo: install
	$(BIN)/python -m usermgmt.workers.sim.demo $(DEMO_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# The benchmark suite (issue 4), apart from `make test`: quick mode takes a few minutes;
# bench-full runs 1M players and 1M events. Reports land in bench/results/, raw runs in bench/runs/.
bench: install
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	$(BIN)/python -m bench.run

bench-full: install
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	$(BIN)/python -m bench.run --full

# The soak test, apart from `make test`: real producers, worker SIGKILLs and Redis restarts,
# on SQLite then PostgreSQL (a few minutes each). Tables in bench/results/soak-latest.md.
# make soak SOAK_ARGS="--events 20000 --hostile 1000 --kills 4"   (python -m bench.soak --help)
soak: install
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	$(BIN)/python -m bench.soak $(SOAK_ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
