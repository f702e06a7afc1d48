# Set-up and entry points. `make study` and `make test` each create .venv and install the
# pinned dependencies on first use (pip on Python 3.11 takes torch 2.14.1 / torchvision 0.29.1
# from this machine's disk; elsewhere it downloads them).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PARAMS ?= params/default.yaml
STAMP  := $(VENV)/.installed

.PHONY: setup browser study smoke test lab clean-runs

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	$(VENV)/bin/prunestudy kernel
	@$(MAKE) --no-print-directory browser
	touch $(STAMP)

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

test: $(STAMP)
	$(PY) -m pytest -q

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks/

clean-runs:
	rm -rf runs/
