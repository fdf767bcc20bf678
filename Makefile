# zmqfed developer tasks. From a fresh clone only python3 (>= 3.10) and make are
# needed: the first target that needs the venv creates it and installs everything.
#
#   make test            full test suite (what .ci/run runs)
#   make demo ARGS=...   python -m zmqfed.demo
#   make lint | type     ruff (lint + format check) | mypy
#   make bench           benchmarks (installs the [bench] extra)
#   make clean | distclean

VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CONSTRAINTS := constraints/cpu.txt
STAMP := $(VENV)/.installed
ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install test demo lint format type bench clean distclean

help:
	@sed -n '1,/^$$/p' Makefile | sed 's/^# \{0,1\}//'

install: $(STAMP)

# torch is installed FIRST and on its own, pinned by $(CONSTRAINTS) to the CPU
# wheel on disk: with no torch present, the project's `torch>=2.1,<3` range would
# otherwise resolve to a multi-GB CUDA build. The stamp is redone when
# pyproject.toml or the constraints change.
$(STAMP): pyproject.toml $(CONSTRAINTS)
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null || { \
	  echo "error: zmqfed needs Python >= 3.10, but '$(PYTHON)' is $$($(PYTHON) -V 2>&1 || echo missing)." >&2; \
	  echo "       Run with PYTHON=/path/to/python3.10+ (e.g. make PYTHON=python3.11 test)." >&2; \
	  exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install -c $(CONSTRAINTS) torch==2.13.0
	# [bench] (grpcio for the Flower baseline) too: the suite smoke-tests the benchmarks
	$(PIP) install -c $(CONSTRAINTS) -e '.[test,dev,bench]'
	@touch $@

test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest $(ARGS)

demo: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m zmqfed.demo $(ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

type: $(STAMP)
	$(PY) -m mypy zmqfed

$(VENV)/.installed-bench: $(STAMP)
	$(PIP) install -c $(CONSTRAINTS) -e '.[bench,test,dev]'
	@touch $@

bench: $(VENV)/.installed-bench
	@test -f tools/bench/run.py || { echo "error: tools/bench/run.py is not written yet" >&2; exit 2; }
	OMP_NUM_THREADS=1 $(PY) tools/bench/run.py $(ARGS)

clean:
	rm -rf build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis .coverage .coverage.* htmlcov
	find . -path ./$(VENV) -prune -o -path ./.tox -prune -o -type d -name __pycache__ -exec rm -rf {} +

# clean, and also drop the venv and tox envs (the next make target rebuilds them)
distclean: clean
	rm -rf $(VENV) .tox
