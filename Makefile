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
# iproute2: the fault tests cut an SDS off in a network namespace of their own;
# systemd: systemd-analyze verifies the Ansible roles' units.
APT_PACKAGES := postgresql qemu-utils libnbd-bin nbdkit fio prometheus prometheus-alertmanager chromium iproute2 nftables systemd
# The host lab (lab/hostlab.py, docs/hostlab.md): images, containers, the VM, ssh.
LAB_APT_PACKAGES := debootstrap systemd-container qemu-system-x86 iproute2 e2fsprogs openssh-client

# Per-test limit (seconds); the whole suite must stay well under CI's 90 minutes.
PYTEST_TIMEOUT ?= 300
PYTEST_ARGS ?=

SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: help venv deps lab-deps lint test test-quick test-lab run stop clean

help:
	@echo "make venv   build .venv (python3 -m venv, pip install -e '.[test]')"
	@echo "make deps   apt-get install what the tests need ($(APT_PACKAGES))"
	@echo "make lint   ruff check, ruff format --check, mypy (strict, on daemons/meshblock and tests/)"
	@echo "make test   deps + venv + lint, then every test (the host lab's included); the unit"
	@echo "           tier and IO-bound modules on two pytest-xdist workers, the rest one at a time"
	@echo "make test-quick  the unit tier only (no subprocess, no socket), under 60 s: the inner loop"
	@echo "make run    quick start: a whole cluster on loopback (meshctl lab up) and an NBD client on it"
	@echo "make stop   stop the lab that 'make run' started (meshctl lab down)"
	@echo "make clean  remove .venv, ./run/ and caches"
	@echo "make lab       the host lab: nspawn hosts and a QEMU VM in a network namespace, deployed"
	@echo "               with ansible-playbook playbooks/site.yml (docs/hostlab.md)"
	@echo "make lab-down  stop the host lab (the cached images stay)"
	@echo "make test-lab  only the host lab's tests"

venv: $(STAMP)

# Rebuilt only when pyproject.toml changes (or .venv is gone).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q -e '.[test]'
	touch $@

# Install the Debian packages $(1) that are missing. apt is skipped entirely when
# every one is installed, so local runs stay fast; `apt-get update` runs only when the
# package lists are empty or the install fails.
define apt_install
	@missing=""; \
	for pkg in $(1); do \
		dpkg-query -W -f='$${Status}\n' "$$pkg" 2>/dev/null | grep -q '^install ok installed$$' \
			|| missing="$$missing $$pkg"; \
	done; \
	if [ -z "$$missing" ]; then echo "deps: installed ($(1))"; exit 0; fi; \
	echo "deps: installing$$missing"; \
	export DEBIAN_FRONTEND=noninteractive; \
	if ! ls /var/lib/apt/lists/ 2>/dev/null | grep -q '_Packages'; then \
		$(SUDO) apt-get update -q; \
	fi; \
	if ! $(SUDO) apt-get install -y -q --no-install-recommends $$missing; then \
		$(SUDO) apt-get update -q; \
		$(SUDO) apt-get install -y -q --no-install-recommends $$missing; \
	fi
endef

deps:
	$(call apt_install,$(APT_PACKAGES))

lab-deps:
	$(call apt_install,$(LAB_APT_PACKAGES))

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# Every test, the host lab's (tests/test_deploy_lab.py, which builds the lab image on
# first use) included. Without the lab: make test PYTEST_ARGS=--ignore=tests/test_deploy_lab.py
# Two runs (tests/conftest.py): the unit tier and the modules marked `parallel` (IO-bound,
# independent of timing) on PYTEST_WORKERS pytest-xdist workers, a module per worker at a
# time; then the timing-sensitive cluster tests and the lab one at a time. Both always
# run; the target fails if either failed (exit code 5, nothing selected, is no failure).
# The serial run prints its 30 slowest tests: it is most of the time of the whole target.
PYTEST_WORKERS ?= 2
PYTEST := $(BIN)/pytest -W error --timeout=$(PYTEST_TIMEOUT)
test: deps lab-deps venv lint
	@rc=0; \
	$(PYTEST) -n $(PYTEST_WORKERS) --dist loadfile -m "unit or parallel" tests/ $(PYTEST_ARGS) \
		|| { r=$$?; [ $$r -eq 5 ] || rc=$$r; }; \
	$(PYTEST) --durations=30 -m "not unit and not parallel" tests/ $(PYTEST_ARGS) \
		|| { r=$$?; [ $$r -eq 5 ] || rc=$$r; }; \
	exit $$rc

# The unit tier (tests/conftest.py: in-process tests, no subprocess, no socket): under
# a minute; needs neither the Debian packages nor the lint.
test-quick: venv
	$(PYTEST) -m unit tests/ $(PYTEST_ARGS)

# The host lab end to end: image, hosts, site.yml twice, units, the VM's block
# device, an alert in MGMT, add_sds.yml and molecule per role (docs/hostlab.md).
test-lab: deps lab-deps venv
	$(BIN)/pytest -W error tests/test_deploy_lab.py $(PYTEST_ARGS)

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

# The host lab (docs/hostlab.md): systemd-nspawn hosts and a QEMU VM on a bridge in
# network namespace meshblock-lab, deployed with Ansible from inside the namespace.
.PHONY: lab lab-down lab-image
LAB := $(SUDO) $(PYTHON) lab/hostlab.py

# The cached images (in /var/cache/meshblock-lab): rebuilt only when their package
# lists change.
lab-image: lab-deps
	$(LAB) image

# Image, hosts, the wheelhouse (built out here: the namespace has no way out), then
# site.yml from inside the namespace, then a volume written and read back on sdc1.
lab: deps lab-deps venv lab-image
	$(LAB) up
	$(LAB) wheelhouse --python $(BIN)/python
	$(SUDO) ip netns exec meshblock-lab $(BIN)/ansible-playbook -i inventory/lab playbooks/site.yml
	$(LAB) smoke --meshctl $(BIN)/meshctl

# Stops every lab host and removes the namespace and the hosts' state; the images stay.
lab-down:
	$(LAB) down
