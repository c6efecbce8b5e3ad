# Everyday commands for dbpool.  Needs only make and python3 on PATH.
#
#   make demo    create .venv, install dbpool, run the bench on a SQLite file here
#   make test    install the test extras into .venv and run the whole test suite
#   make lint    install the lint extra; ruff (lint, format check), mypy --strict, typing test
#   make docs    install the docs extra and build the HTML docs (warnings are errors)
#   make bench   install the bench extra, compare dbpool with its peers, profile its
#                checkout line by line and count instructions with valgrind (docs/benchmarks/)
#   make test-pythons  run the cross-version tests under the oldest and newest Python dbpool
#                supports, through tox, each where its interpreter is found (PATH or pyenv)
#   make clean   remove build output, caches and the demo's SQLite files
#
# Extra arguments: make test PYTEST_ARGS="-x -k fifo"
#                  make test-pythons TOX_ENVS=py310,py312 CROSS_TESTS="tests/test_pool.py"
#                  make demo DEMO_ARGS="--threads 8 --seconds 3"
#                  make bench BENCH_ARGS="--quick --scenarios cycle,storm" PROFILE_ARGS="--quick"
#                  make bench INSTRUCTIONS_ARGS="--quick"

PYTHON ?= python3
VENV ?= .venv
PYTEST_ARGS ?=
DEMO_ARGS ?=
BENCH_ARGS ?=
PROFILE_ARGS ?=
INSTRUCTIONS_ARGS ?=
SPHINXOPTS ?= -W --keep-going
# The interpreters `make test-pythons` runs (tox environment names), and what it runs there:
# the suite's files that exercise the standard library and the drivers where they differ
# between Python versions (URL and error handling, sqlite3, signals, the DB-API surface).
# The whole suite runs on any of them with: .venv/bin/tox run -e py39
TOX_ENVS ?= py39,py313
CROSS_TESTS ?= tests/test_url.py tests/test_bad_input.py tests/test_pool.py tests/test_dialects.py \
	tests/test_dialect_edges.py tests/test_transactions.py tests/test_interrupts.py \
	tests/test_framework_edges.py tests/test_secrets.py tests/test_integration.py \
	tests/test_mysqlclient_edges.py
# pyenv's interpreters, for tox to find as python3.X (only for tox: each bin also has a python3)
PYENV_ROOT ?= $(HOME)/.pyenv
empty :=
space := $(empty) $(empty)
PYENV_BINS := $(wildcard $(PYENV_ROOT)/versions/3.*/bin)
TOX_PATH := $(if $(PYENV_BINS),$(subst $(space),:,$(strip $(PYENV_BINS))):)$(PATH)

VPY := $(VENV)/bin/python
PIP := $(VPY) -m pip --disable-pip-version-check --no-input
PIP_INSTALL := $(PIP) install --progress-bar off

# Each stamp records that an extra was installed from the current pyproject.toml;
# editing pyproject.toml makes the next run reinstall.
DEMO_STAMP := $(VENV)/.installed-demo
TEST_STAMP := $(VENV)/.installed-test
DOCS_STAMP := $(VENV)/.installed-docs
BENCH_STAMP := $(VENV)/.installed-bench
LINT_STAMP := $(VENV)/.installed-lint
TOX_STAMP := $(VENV)/.installed-tox

.DELETE_ON_ERROR:
.PHONY: help venv demo test test-pythons lint docs bench clean distclean

help:
	@echo "make demo       run 'python -m dbpool bench' on a SQLite file in this directory"
	@echo "make test       run the test suite (PYTEST_ARGS=... passes arguments to pytest)"
	@echo "make lint       ruff check, ruff format --check, mypy --strict and the typing test"
	@echo "make docs       build the HTML documentation into docs/_build/html"
	@echo "make bench      compare dbpool with its peers, profile its checkout, count instructions,"
	@echo "                into docs/benchmarks (BENCH_ARGS=, PROFILE_ARGS=, INSTRUCTIONS_ARGS=)"
	@echo "make test-pythons  the cross-version tests on Python 3.9 and 3.13 (TOX_ENVS=,"
	@echo "                CROSS_TESTS=), through tox, each where its interpreter is found"
	@echo "make venv       create $(VENV) and install dbpool with its test extras"
	@echo "make clean      remove build output, caches and the demo's SQLite files"
	@echo "make distclean  clean, and remove $(VENV) too"

venv: $(TEST_STAMP)

$(VPY):
	$(PYTHON) -m venv $(VENV)

# The demo needs dbpool alone (sqlite3 is in the standard library): the test extras build
# mysqlclient from source, which needs a compiler and the MySQL client headers.
$(DEMO_STAMP): pyproject.toml | $(VPY)
	$(PIP_INSTALL) -e .
	touch $@

$(TEST_STAMP): pyproject.toml | $(VPY)
	$(PIP_INSTALL) -e '.[test]'
	touch $@

$(DOCS_STAMP): pyproject.toml | $(VPY)
	$(PIP_INSTALL) -e '.[docs]'
	touch $@

$(TOX_STAMP): pyproject.toml | $(VPY)
	$(PIP_INSTALL) -e '.[tox]'
	touch $@

$(BENCH_STAMP): pyproject.toml | $(VPY)
	$(PIP_INSTALL) -e '.[bench]'
	touch $@

# The typing test (tests/test_typing.py) runs under pytest, from the test extras: those go in
# first, also so that the two installs never run at once under make -j.
$(LINT_STAMP): pyproject.toml | $(TEST_STAMP)
	$(PIP_INSTALL) -e '.[lint]'
	touch $@

demo: $(DEMO_STAMP)
	$(VPY) -m dbpool bench $(DEMO_ARGS)

test: venv
	$(VPY) -m pytest $(PYTEST_ARGS)

# tox builds each environment afresh when pyproject.toml changes; a missing interpreter is
# reported as skipped, not failed (this machine may have no Python 3.9); with none of them
# found, tox fails, having run nothing.
test-pythons: $(TOX_STAMP)
	PATH="$(TOX_PATH)" $(VENV)/bin/tox run -e $(TOX_ENVS) --skip-missing-interpreters true \
		-- -p no:cacheprovider $(CROSS_TESTS) $(PYTEST_ARGS)

lint: $(LINT_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy --strict dbpool
	$(VPY) -m pytest -q tests/test_typing.py

docs: $(DOCS_STAMP)
	$(VENV)/bin/sphinx-build $(SPHINXOPTS) -b html docs docs/_build/html

bench: $(BENCH_STAMP)
	$(VPY) benchmarks/compare.py $(BENCH_ARGS)
	$(VPY) benchmarks/profile_checkout.py $(PROFILE_ARGS)
	@if command -v valgrind >/dev/null; then \
		$(VPY) benchmarks/instructions.py $(INSTRUCTIONS_ARGS); \
	else \
		echo "valgrind not installed (apt-get install valgrind): instruction counts skipped"; \
	fi

clean:
	rm -rf docs/_build .pytest_cache .hypothesis .tox .mypy_cache .ruff_cache build dist \
		./*.egg-info
	find . -path ./$(VENV) -prune -o -path ./.git -prune -o \
		-type d -name __pycache__ -prune -exec rm -rf {} +
	rm -f ./*.sqlite3 ./*.sqlite3-journal ./*.sqlite3-wal ./*.sqlite3-shm \
		./*.db ./*.db-journal ./*.db-wal ./*.db-shm

distclean: clean
	rm -rf $(VENV)
