# spectransfer: `make demo` and `make test` work on a fresh machine with nothing else run first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo-output

.PHONY: setup browser test test-slow lint demo experiment bench clean

# The virtual environment is rebuilt only when pyproject.toml changes. torch is installed first
# as torch==2.13.0, the CPU build on these machines: a plain `torch` would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

# Debian chromium for the browser tests (playwright drives /usr/bin/chromium; no browser download).
browser:
	@command -v chromium >/dev/null 2>&1 || test -x /usr/bin/chromium || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

test: setup browser lint
	$(PY) -m pytest -q

test-slow: setup browser
	$(PY) -m pytest -q -m slow

# ruff (lint rules in pyproject.toml [tool.ruff]) and mypy on the package ([tool.mypy]).
lint: setup
	$(PY) -m ruff check src tests bench scripts
	$(PY) -m ruff format --check src tests bench scripts
	$(PY) -m mypy

demo: setup
	$(VENV)/bin/spectransfer demo --out $(DEMO_DIR)

# Transfer vs scratch vs zero-shot learning curve and the active-learning curve -> EXPERIMENT_DIR/experiment.html (resumable);
# once complete, the README's two figures and the JSON behind each -> EXPERIMENT_DOCS (EXPERIMENT_DOCS= to skip).
EXPERIMENT_DIR ?= experiment-output
EXPERIMENT_DOCS ?= docs
experiment: setup
	$(VENV)/bin/spectransfer experiment --out $(EXPERIMENT_DIR) $(if $(EXPERIMENT_DOCS),--docs $(EXPERIMENT_DOCS))

bench: setup
	for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
