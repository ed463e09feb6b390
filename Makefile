# meshblock developer targets. `make test` works from a fresh clone as root:
# it installs the Debian packages the tests need, builds .venv, lints, then runs pytest.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.meshblock-installed

# Debian packages the test suite needs. postgresql: the tests start their own server
# with the binaries under /usr/lib/postgresql/*/bin (no system cluster is used).
APT_PACKAGES := postgresql qemu-utils libnbd-bin nbdkit fio prometheus prometheus-alertmanager chromium

# Per-test limit (seconds); the whole suite must stay well under CI's 90 minutes.
PYTEST_TIMEOUT ?= 300
PYTEST_ARGS ?=

SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: help venv deps lint test run stop clean

help:
	@echo "make venv   build .venv (python3 -m venv, pip install -e '.[test]')"
	@echo "make deps   apt-get install what the tests need ($(APT_PACKAGES))"
	@echo "make lint   ruff check, ruff format --check, mypy"
	@echo "make test   deps + venv + lint, then pytest"
	@echo "make run    quick start: a whole cluster on loopback (meshctl lab up) and an NBD client on it"
	@echo "make stop   stop the lab that 'make run' started (meshctl lab down)"
	@echo "make clean  remove .venv, ./run/ and caches"

venv: $(STAMP)

# Rebuilt only when pyproject.toml changes (or .venv is gone).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q -e '.[test]'
	touch $@

# Skip apt entirely when every package is installed, so local runs stay fast. Run
# `apt-get update` only when the package lists are empty or the install fails.
deps:
	@missing=""; \
	for pkg in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}\n' "$$pkg" 2>/dev/null | grep -q '^install ok installed$$' \
			|| missing="$$missing $$pkg"; \
	done; \
	if [ -z "$$missing" ]; then echo "deps: installed ($(APT_PACKAGES))"; exit 0; fi; \
	echo "deps: installing$$missing"; \
	export DEBIAN_FRONTEND=noninteractive; \
	if ! ls /var/lib/apt/lists/ 2>/dev/null | grep -q '_Packages'; then \
		$(SUDO) apt-get update -q; \
	fi; \
	if ! $(SUDO) apt-get install -y -q --no-install-recommends $$missing; then \
		$(SUDO) apt-get update -q; \
		$(SUDO) apt-get install -y -q --no-install-recommends $$missing; \
	fi

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy daemons/meshblock

test: deps venv lint
	$(BIN)/pytest -W error --timeout=$(PYTEST_TIMEOUT) tests/ $(PYTEST_ARGS)

# The quick start: `meshctl lab up` (MDM, 3 SDSs, SDC on loopback in ./run/lab), then
# qemu-io and nbdinfo on its volume. Needs the Debian packages (qemu-io, nbdinfo) too.
run: deps venv
	scripts/quickstart.sh

# meshctl lab down: stops the lab's processes; its data stays in ./run/lab.
stop:
	scripts/quickstart.sh stop

clean:
	-[ -x scripts/quickstart.sh ] && scripts/quickstart.sh stop
	rm -rf $(VENV) run build dist .pytest_cache .mypy_cache .ruff_cache .hypothesis
	rm -rf daemons/*.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
