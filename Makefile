# Two commands for a fresh Debian/Ubuntu machine, as root:
#   make demo   installs everything, then simulates a small night and runs it through the local stack
#   make test   installs everything, then runs the whole test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
APT_PACKAGES := source-extractor scamp missfits swarp wcstools chromium
STAMP := $(VENV)/.installed

.PHONY: setup system-deps test-deps venv demo test lint bench clean

setup: system-deps $(STAMP)

system-deps:
	@missing=""; for b in source-extractor scamp missfits SWarp imhead chromium; do command -v $$b >/dev/null || missing=1; done; \
	if [ -n "$$missing" ]; then \
	  export DEBIAN_FRONTEND=noninteractive; apt-get update -qq && apt-get install -y -qq $(APT_PACKAGES) python3-venv >/dev/null; \
	fi

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

demo: setup
	$(BIN)/gppy demo

test: setup test-deps
	$(BIN)/ruff check .
	$(BIN)/pytest -q -p no:cacheprovider

# What only the tests need: a Docker engine with Compose v2 and the debian:bookworm-slim base
# image (compose tests), installed and started when missing.
test-deps:
	bash deploy/ci-docker.sh

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python -m bench.run

clean:
	rm -rf $(VENV) demo-data
