# metarun: every target that needs the virtualenv creates it first, so `make run` and
# `make test` work on a fresh clone with nothing but python3 and the package registries.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WHEELHOUSE := .wheelhouse
STAMP := $(VENV)/.installed
PIP := $(PY) -m pip install --disable-pip-version-check -q -c constraints.txt
# pytest-xdist workers for `make test` (the suite is CPU-bound, one thread per test process).
TEST_WORKERS ?= 2

.DEFAULT_GOAL := help
.PHONY: help install run test test-all lint clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-9s %s\n", $$1, $$2}'

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml constraints.txt scripts/build_learn2learn_wheel.py | $(PY)
	$(PIP) pip setuptools wheel Cython
	$(PY) scripts/build_learn2learn_wheel.py --wheelhouse $(WHEELHOUSE)
	$(PIP) --find-links $(WHEELHOUSE) -e ".[dev,sweeps]"
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install metarun with pinned dependencies

run: $(STAMP)  ## meta-train the embedded default job (MAML on generated glyphs), offline
	WANDB_MODE=offline $(VENV)/bin/metarun

test: $(STAMP)  ## the default test suite (CPU, a few minutes; TEST_WORKERS=2 processes)
	$(PY) -m pytest -n $(TEST_WORKERS)

test-all: $(STAMP)  ## every test, slow learning runs included
	$(PY) -m pytest -n $(TEST_WORKERS) -m ""

lint: $(STAMP)  ## ruff
	$(PY) -m ruff check src tests scripts

clean:  ## remove the virtualenv, wheelhouse and run outputs
	rm -rf $(VENV) $(WHEELHOUSE) outputs multirun
