# vlpipe — every target installs the project into .venv/ on first use (see `make install`).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PYTHONHASHSEED := 0
# Keep all local state (MLflow store, demo data, checkpoints, bench results) under .vlpipe/.
export VLPIPE_HOME ?= $(CURDIR)/.vlpipe

.PHONY: install run test test-fast test-integration platform-up platform-down images compile bench gpu-check lint clean

install: $(STAMP)

# torch is pinned (constraints.txt) to the 2.13.0 CPU wheel found locally; an unpinned torch would pull
# gigabytes of CUDA wheels on a CPU-only machine.
$(STAMP): pyproject.toml setup.py constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=24" 2>&1 | grep -v "^WARNING: Location" || true
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" ; test $${PIPESTATUS[0]} -eq 0
	$(PY) -m pip check
	touch $(STAMP)

run: install
	$(VENV)/bin/vlpipe run --local --recipe tiny --summary-json $(VLPIPE_HOME)/run/summary.json

test: install
	$(PY) -m pytest -q -m "not integration" tests

# The integration test runs the tiny recipe against the local platform (`make platform-up`); without a running
# platform it starts (and stops) its own.
test-integration: install
	VLPIPE_PLATFORM_HOME=$(VLPIPE_HOME) $(PY) -m pytest -q -m integration tests/integration

# An MLflow tracking server (basic auth, artifacts proxied to S3) and an S3 store (moto), on loopback only.
platform-up: install
	$(VENV)/bin/vlpipe platform up

platform-down: install
	$(VENV)/bin/vlpipe platform down

# Needs a container engine (docker daemon, podman or buildah); CI has none.
images:
	bash infra/docker/build.sh

test-fast: install
	$(PY) -m pytest -q -m "not integration and not slow" tests

compile: install
	$(VENV)/bin/vlpipe compile --out $(VLPIPE_HOME)/compiled

bench: install
	$(VENV)/bin/vlpipe bench --out $(VLPIPE_HOME)/bench

# Not part of CI. On a GPU: bf16 packed = per-sample logits (SDPA, flash-attention varlen), a `1b` training step
# with MFU and peak memory, a 2-GPU NCCL all-reduce; on a CPU the same checks reduced (tiny, fp32, SDPA, gloo).
# Exit 1 when a check failed; a skipped check (flash_attn missing, one GPU) does not fail it. See README.
gpu-check: install
	$(VENV)/bin/vlpipe gpu-check --out $(VLPIPE_HOME)/gpu-check

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VLPIPE_HOME) .pytest_cache .ruff_cache
