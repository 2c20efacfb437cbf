# vlpipe — every target installs the project into .venv/ on first use (see `make install`).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PYTHONHASHSEED := 0
# Keep all local state (MLflow store, demo data, checkpoints, bench results) under .vlpipe/.
export VLPIPE_HOME ?= $(CURDIR)/.vlpipe

.PHONY: install run test test-fast compile bench lint clean

install: $(STAMP)

# torch is pinned (constraints.txt) to the 2.13.0 CPU wheel found locally; an unpinned torch would pull
# gigabytes of CUDA wheels on a CPU-only machine.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=24" 2>&1 | grep -v "^WARNING: Location" || true
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" ; test $${PIPESTATUS[0]} -eq 0
	$(PY) -m pip check
	touch $(STAMP)

run: install
	$(VENV)/bin/vlpipe run --local --recipe tiny --summary-json $(VLPIPE_HOME)/run/summary.json

test: install
	$(PY) -m pytest -q -m "not integration" tests

test-fast: install
	$(PY) -m pytest -q -m "not integration and not slow" tests

compile: install
	$(VENV)/bin/vlpipe compile --out $(VLPIPE_HOME)/compiled

bench: install
	$(VENV)/bin/vlpipe bench --out $(VLPIPE_HOME)/bench

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VLPIPE_HOME) .pytest_cache .ruff_cache
