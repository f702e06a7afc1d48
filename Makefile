# Set-up and entry points. `make study` and `make test` each create .venv and install the locked
# dependencies (requirements.lock: every package, its exact version and hashes) on first use: with uv,
# or pip where uv cannot be installed. On Python 3.11 here torch 2.14.1 / torchvision 0.29.1 and
# their CUDA wheels come from this machine's disk (elsewhere they are downloaded).
# docs/setup.md: the set-up timings and how to refresh the lock (`make lock`).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PARAMS ?= params/default.yaml
STAMP  := $(VENV)/.installed
LOCK   := requirements.lock

# The installer: uv (the default: the faster, docs/setup.md) or pip (`make setup INSTALLER=pip`).
INSTALLER  ?= uv
UV_VERSION := 0.13.8
# uv is a standalone binary; it lives in a folder of its own inside .venv, not among the packages,
# so the venv holds the lock's packages and nothing else (tests/test_lock.py checks them).
UV_DIR := $(VENV)/uv-$(UV_VERSION)
UV     := $(UV_DIR)/bin/uv
# uv ignores pip's configuration: hand it the local sources pip uses here (find-links /opt/wheels and
# pip.conf's extra indexes) so that torch and the CUDA wheels come from disk. They are PyPI's files
# (the lock holds PyPI's hashes, and theirs are among them); with every version pinned and hashed, uv
# may take each file from whichever source has it first (unsafe-best-match). --compile-bytecode: uv
# installs no .pyc by default (pip does), and where PYTHONDONTWRITEBYTECODE is set (CI, containers)
# Python never writes them either: every kernel and subprocess would compile torch, pandas and
# seaborn from source again (an import of the stack: 8.0 s instead of 3.2 s here).
UV_SOURCES = $(if $(wildcard /opt/wheels),--find-links /opt/wheels) \
	$(foreach url,$(shell $(PYTHON) -m pip config get global.extra-index-url 2>/dev/null),--extra-index-url $(url)) \
	--index-strategy unsafe-best-match
# `make lock` (re)writes the lock from pyproject.toml; it keeps the current pins unless told otherwise:
# `make lock LOCK_FLAGS=--upgrade` (everything) or `LOCK_FLAGS="--upgrade-package numpy"`.
LOCK_FLAGS ?=

.PHONY: setup lock browser study smoke test test-fast lint lab clean-runs

setup: $(STAMP)

$(STAMP): $(LOCK) pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@if [ "$(INSTALLER)" = uv ] && { test -x $(UV) || $(MAKE) --no-print-directory $(UV); }; then \
	  echo "uv pip sync --compile-bytecode $(LOCK) && uv pip install --no-deps -e ."; \
	  $(UV) pip sync --quiet --python $(PY) --compile-bytecode --require-hashes $(UV_SOURCES) $(LOCK) && \
	  $(UV) pip install --quiet --python $(PY) --no-deps -e . ; \
	else \
	  if [ "$(INSTALLER)" = uv ]; then echo "make: uv could not be installed: pip installs $(LOCK)"; fi; \
	  echo "pip install --require-hashes -r $(LOCK) && pip install --no-deps -e ."; \
	  $(PY) -m pip install --quiet --disable-pip-version-check --require-hashes -r $(LOCK) && \
	  $(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e . ; \
	fi
	$(VENV)/bin/prunestudy kernel
	@$(MAKE) --no-print-directory browser
	touch $(STAMP)

$(UV):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --target $(UV_DIR) uv==$(UV_VERSION)

# Resolves against PyPI alone (no local sources), so the lock holds PyPI's hashes of every file.
lock: $(UV)
	$(UV) pip compile --quiet pyproject.toml --extra test --extra dev --extra ray --python-version 3.11 --generate-hashes \
	  $(LOCK_FLAGS) -o $(LOCK)
	@git diff --stat -- $(LOCK) 2>/dev/null || true

# Debian's Chromium for the report's browser test (Playwright drives it; it downloads no browser).
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	    else echo "make: Chromium not installed (needs root and apt-get): the browser tests will skip"; fi; }

study: $(STAMP)
	$(VENV)/bin/prunestudy run -f $(PARAMS) --run-dir runs/default

smoke: $(STAMP)
	$(VENV)/bin/prunestudy run -f params/smoke.yaml --run-dir runs/smoke

# The tests run on TEST_JOBS pytest-xdist workers, a group of tests per worker at a time (a group is a
# file, or a part of one: tests/conftest.py, which also puts the longest first). Most of the suite is
# whole runs and sweeps that spend part of their time waiting on kernels and subprocesses: 3 workers
# keep this machine's 2 cores busiest (docs/timings.md). `make test TEST_JOBS=0` runs it in one process.
TEST_JOBS ?= 3

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_JOBS) --dist loadgroup

# Everything but the end-to-end tests (marked e2e: whole runs, killed subprocesses, Chromium, torchrun).
test-fast: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_JOBS) --dist loadgroup -m "not e2e"

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

# JupyterLab on a run folder's working copies of the notebooks (RUN/lab/, RUN default runs/default:
# `make lab RUN=runs/smoke`), with the prunestudy kernel; as root (containers, CI) and as a user.
# `prunestudy lab --source` opens the tracked notebooks/ instead.
lab: $(STAMP)
	$(VENV)/bin/prunestudy lab $(RUN)

clean-runs:
	rm -rf runs/
