# Two entry points: `make demo` and `make test`. Both create .venv if missing and install what they need
# (idempotent: a stamp file keyed on pyproject.toml skips the install when nothing changed).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-12)
# The registry's torchvision/torchaudio/torchcodec do not load beside torch 2.13.0+cpu and break transformers.
CONFLICTING := torchvision torchaudio torchcodec

.PHONY: install system-deps demo test test-fast clean-cluster bench

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing heteroscale-ray into $(VENV) (first time: ~3 min, ~4.5 GB)"
	@$(PY) -m pip install -q --upgrade pip
	@$(PY) -m pip install -q -e ".[cpu,dev]"
	@$(PY) -m pip uninstall -q -y $(CONFLICTING) 2>/dev/null || true
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

# System packages the project uses: Debian's prometheus (`heteroscale up --prometheus`, the metrics tests) and
# redis-server (GCS fault tolerance of the local cluster: `head.redis_port`, the head-restart test).
system-deps:
	@missing=""; command -v prometheus >/dev/null || test -x /usr/bin/prometheus || missing=" prometheus"; \
	command -v redis-server >/dev/null || test -x /usr/bin/redis-server || missing="$$missing redis-server"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then echo "installing Debian's$$missing (apt-get)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null \
	    || { echo "error: apt-get install$$missing failed" >&2; exit 1; }; \
	  else echo "warning:$$missing not installed and this is not root: run 'sudo apt-get install$$missing'" \
	    "(prometheus: heteroscale up --prometheus; redis-server: head.redis_port; both: their tests)" >&2; fi; fi

install: $(STAMP) system-deps

demo: install
	@$(VENV)/bin/heteroscale demo

test: install
	@$(PY) -m pytest -q --durations=25 tests

test-fast: install
	@$(PY) -m pytest -q tests -m "not e2e"

bench: install
	@$(PY) bench/scripts/router_overhead.py

clean-cluster:
	@$(VENV)/bin/heteroscale down
