# dtake — top-level entry points. `make demo` and `make test` set up everything they
# need themselves (Debian packages, virtualenv) and are safe to run again.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Debian packages the lab, the tests and the benchmarks need (ruby: the Vagrantfile is
# evaluated against a stub Vagrant in tests/unit/test_playbooks_vagrant.py; libxml2-utils:
# xmllint, which ocf-tester needs in tests/cluster/test_ocf_tester.py).
APT_PACKAGES := pacemaker pacemaker-cli-utils corosync resource-agents fence-agents \
	rsync lsyncd openssh-server openssh-client iproute2 procps psmisc util-linux \
	python3-venv attr acl btrfs-progs lvm2 thin-provisioning-tools nftables ruby libxml2-utils
PYTEST_ARGS ?=

.PHONY: help deps venv lint typecheck test test-unit test-integration test-cluster test-infra demo demo-loopback bench clean

help:
	@echo "make demo   - set up and run the lab demo (the main job)"
	@echo "make demo-loopback - the loopback replication demo (no cluster)"
	@echo "make test   - set up and run every test layer (unit, integration, cluster, infra)"
	@echo "make bench  - run the benchmarks in bench/ (prints tables, writes bench/results/*.json)"

# Installs only the packages that are missing; apt-get update runs once, only if needed.
deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" != 0 ]; then echo "dtake: missing Debian packages: $$missing (run as root or install them)"; exit 1; fi; \
	  echo "==> installing Debian packages: $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	  systemctl disable --now corosync pacemaker >/dev/null 2>&1 || true; \
	fi

$(VENV)/.stamp: pyproject.toml
	@echo "==> virtualenv $(VENV)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@$(PY) -m pip install -q -e '.[dev]'
	@touch $@

venv: $(VENV)/.stamp

lint: venv
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: deps venv lint
	$(VENV)/bin/pytest $(PYTEST_ARGS) tests/unit tests/integration tests/cluster tests/infra

test-unit: venv
	$(VENV)/bin/pytest $(PYTEST_ARGS) tests/unit

test-integration: venv
	$(VENV)/bin/pytest $(PYTEST_ARGS) tests/integration

test-cluster: deps venv
	$(VENV)/bin/pytest $(PYTEST_ARGS) tests/cluster

test-infra: deps venv
	$(VENV)/bin/pytest $(PYTEST_ARGS) tests/infra

# The end-to-end demo (docs/demo.md): 3-node lab, install through the playbooks, failover,
# online pending. Needs root. The loopback demo (no cluster) stays as demo-loopback.
demo: deps venv
	$(PY) -m playbooks.demo

demo-loopback: venv
	$(PY) -m dtake.demo

bench: deps venv
	$(PY) -m bench

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache *.egg-info
