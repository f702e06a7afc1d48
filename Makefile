# Set-up and entry points. `make study` and `make test` each create .venv and install the
# pinned dependencies on first use (pip on Python 3.11 takes torch 2.14.1 / torchvision 0.29.1
# from this machine's disk; elsewhere it downloads them).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PARAMS ?= params/default.yaml
STAMP  := $(VENV)/.installed

.PHONY: setup study smoke test lab clean-runs

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	$(VENV)/bin/prunestudy kernel
	touch $(STAMP)

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
