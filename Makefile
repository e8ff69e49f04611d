# fanout: every target bootstraps its own virtual environment.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)
AZURITE := .tools/node_modules/.bin/azurite
AZURITE_VERSION := 3.37.0

.PHONY: run test lint bench demo tools clean venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@$(PY) -m pip install -q -e '.[dev]'
	@rm -f $(VENV)/.installed-* && touch $@

## run: start the daemon (embedded default when no Azure settings are given)
run: $(STAMP)
	$(VENV)/bin/fanout run

## test: the whole suite, offline; local peers (Azurite, Batch, Service Bus) start themselves
test: $(STAMP) tools
	$(PY) -m pytest -q

## tools: node packages the tests start (Azurite), installed under .tools/
tools: $(AZURITE) .tools/node_modules/@kubernetes-models/prometheus-operator

.tools/node_modules/@kubernetes-models/prometheus-operator: # CRD validators for tests/deploy
	npm install --prefix .tools --no-audit --no-fund --loglevel=error @kubernetes-models/keda@2.0.0 @kubernetes-models/prometheus-operator@6.0.0

$(AZURITE):
	@if command -v npm >/dev/null; then \
	  npm install --prefix .tools --no-audit --no-fund --loglevel=error azurite@$(AZURITE_VERSION); \
	else echo "npm not found: the Azurite tests will fail; install Node.js and npm" >&2; exit 1; fi

## demo: send the README's 20-task pi sweep to the daemon `make run` started
demo: $(STAMP)
	$(VENV)/bin/fanout send -H sweep -p program=pi -p 'parameters.samples=[20000]' \
	  -p 'parameters.seed={"start":0,"stop":20}' -p 'aggregate={"program":"pi-summary"}'
	@echo "sent; watch it with: $(VENV)/bin/fanout status --watch"

## lint: ruff and mypy --strict
lint: $(STAMP)
	$(VENV)/bin/ruff check worker handlers tests
	$(VENV)/bin/mypy

## bench: benchmarks as ratios against baselines; writes bench-results.json
bench: $(STAMP)
	$(PY) -m tests.bench

clean:
	rm -rf $(VENV) .tools .fanout .pytest_cache .mypy_cache
