# Two commands on a fresh machine: `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-dev
RUN_STAMP := $(VENV)/.installed
APT_PACKAGES := busybox-static prometheus shellcheck faketime debootstrap iptables iproute2 e2fsprogs postgresql curl nginx-light
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: run test test-systemd faults lint bench gpu-check venv dev-venv system-deps test-image proto clean

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
# systemd-analyze, debootstrap for test-systemd's root filesystem). Installed only
# when missing; needs root or passwordless sudo.
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
	$(PY) -m pytest -m "not faults and not systemd"

# The provider install under a real systemd (tests/test_systemd_install.py): a
# debootstrap root filesystem booted in Docker. The first run builds the rootfs and
# a wheelhouse under build/systemd-test (needs root, debootstrap, the apt mirror and
# PyPI); later runs reuse them. About 5 minutes cold.
test-systemd: system-deps dev-venv test-image
	$(PY) -m pytest -m systemd tests/test_systemd_install.py

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

# The hardware check (docs/gpu-check.md): on a machine with an NVIDIA GPU and a system
# Python with torch and/or CuPy, plus the wheels in ./wheelhouse (benchmarks/gpucheck/wheels.sh).
# Without a GPU it says so in one line and exits 2. No venv needed: this tree on PYTHONPATH.
GPU_CHECK_PYTHON ?= $(if $(wildcard $(PY)),$(PY),python3)
GPU_CHECK_DEPS := .gpucheck-deps
GPU_CHECK_ARGS ?=
gpu-check:
	@if [ -d wheelhouse ] && [ ! -f $(GPU_CHECK_DEPS)/.installed ]; then \
	  $(GPU_CHECK_PYTHON) -m pip install -q --no-index --find-links wheelhouse \
	    --target $(GPU_CHECK_DEPS) -r benchmarks/gpucheck/requirements.txt && touch $(GPU_CHECK_DEPS)/.installed; \
	fi
	@PYTHONPATH=$(CURDIR):$(CURDIR)/$(GPU_CHECK_DEPS)$${PYTHONPATH:+:$$PYTHONPATH} \
	  $(GPU_CHECK_PYTHON) -m benchmarks.gpucheck --out gpu-check-report $(GPU_CHECK_ARGS)

proto: dev-venv
	$(PY) -m gpuagent.protogen

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache bench-results.json .run $(GPU_CHECK_DEPS)
