# Two commands on a fresh machine: `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-dev
RUN_STAMP := $(VENV)/.installed
APT_PACKAGES := busybox-static prometheus shellcheck faketime iptables iproute2 e2fsprogs
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: run test faults lint bench venv dev-venv system-deps test-image proto clean

$(RUN_STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@ $(RUN_STAMP)

venv: $(RUN_STAMP)
dev-venv: $(STAMP)

# Host tools the tests drive for real (busybox for the test image, promtool,
# systemd-analyze). Installed only when missing; needs root or passwordless sudo.
system-deps:
	@missing=""; \
	for pkg in $(APT_PACKAGES); do dpkg -s $$pkg >/dev/null 2>&1 || missing="$$missing $$pkg"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] && echo "" || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

test-image: system-deps dev-venv
	$(PY) -m tests.images build

run: venv
	$(PY) -m agent.demo

test: system-deps dev-venv test-image
	$(PY) -m pytest -m "not faults"

# The fault suite (docs/faults.md): real processes killed, partitioned, starved.
# About 4 minutes; CI runs it after `make test`. FAULTS_CHURN_SECONDS lengthens scenario 2.
faults: system-deps dev-venv test-image
	$(PY) -m pytest -m faults tests/faults

lint: dev-venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: dev-venv
	$(PY) -m benchmarks.run

proto: dev-venv
	$(PY) -m gpuagent.protogen

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache bench-results.json .run
