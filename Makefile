# Every target sets up .venv when it is missing; Python 3.11+ and make are all it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint bench chaos clean

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is needed"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/python -m examples

test: $(STAMP) lint
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

bench: $(STAMP)
	$(BIN)/python benchmarks/bench.py

# The full chaos runs (tests/chaos): one nats-server, then a three-node cluster; both always run.
chaos: $(STAMP)
	$(BIN)/python -m tests.chaos.harness --workflows 2000 --duration 120 --settle-timeout 180; \
	single=$$?; \
	$(BIN)/python -m tests.chaos.harness --workflows 2000 --duration 120 --settle-timeout 180 \
		--cluster --nats-kills 1; \
	cluster=$$?; \
	test $$single -eq 0 && test $$cluster -eq 0

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
