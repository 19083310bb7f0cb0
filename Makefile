# carpool: `make demo` and `make test` are the two entry points (run as root on Debian 12).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMPS := .setup

.PHONY: setup demo demo-lb demo-carp soak test lint typecheck unit integration clean-lab clean

setup: $(STAMPS)/apt $(STAMPS)/venv

# Installs the Debian packages of deps/apt.txt that are missing; runs `apt-get update` once.
$(STAMPS)/apt: deps/apt.txt
	@mkdir -p $(STAMPS)
	@missing=$$(grep -v '^\s*#' deps/apt.txt | grep -v '^\s*$$' | while read -r p; do \
	    dpkg-query -W -f='$${Status}\n' "$$p" 2>/dev/null | grep -q 'install ok installed' || echo "$$p"; done); \
	if [ -n "$$missing" ]; then \
	    echo "setup: installing Debian packages:" $$missing; \
	    [ -f $(STAMPS)/apt-updated ] || { apt-get update -qq && touch $(STAMPS)/apt-updated; }; \
	    guard=; if [ ! -e /usr/sbin/policy-rc.d ]; then \
	        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && guard=1; fi; \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	    status=$$?; [ -z "$$guard" ] || rm -f /usr/sbin/policy-rc.d; [ $$status -eq 0 ] || exit $$status; \
	fi
	@bash deps/after-apt.sh
	@touch $@

$(STAMPS)/venv: pyproject.toml
	@mkdir -p $(STAMPS)
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	@touch $@

demo: setup
	$(PY) -m carpool.demo

demo-lb: setup
	$(PY) -m carpool.demo_lb

demo-carp: setup
	$(PY) -m carpool.demo_carp

soak: setup
	$(PY) -m carpool.scenarios.soak

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks

typecheck: setup
	$(VENV)/bin/mypy --strict src

test: lint typecheck
	$(VENV)/bin/carpool lab clean --stale
	$(PY) -m pytest tests

unit: setup
	$(PY) -m pytest tests/unit

clean-lab: setup
	$(VENV)/bin/carpool lab clean --all

clean:
	rm -rf $(VENV) $(STAMPS) .mypy_cache .ruff_cache .pytest_cache .hypothesis
