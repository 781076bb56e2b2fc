# lbd — see README.md. Everything runs from ./.venv, which `make install` creates.
PY      := .venv/bin/python
PYTEST  := .venv/bin/pytest
FUZZ_INPUTS ?= 100000

.DEFAULT_GOAL := help
.PHONY: help install test unit netns lab bench lint fuzz

help:  ## show this help
	@awk 'BEGIN{FS=":.*## "} /^[a-z]+:.*## /{printf "  make %-8s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

install:  ## install system packages (apt-get) and the venv with lbd and its test tools (root)
	./scripts/setup.sh

test: lint  ## lint, unit and namespace tests (root); after scripts/setup.sh; what CI runs
	$(PYTEST) -q tests

unit:  ## unit tests of the pure cores only (no root needed)
	$(PYTEST) -q tests/unit

netns:  ## namespace tests only (root)
	$(PYTEST) -q tests/netns

lab:  ## the namespace lab: clients, lbd, real servers; shows what lbd does (root)
	$(PY) -m lab

bench:  ## benchmarks in namespaces: ratios against the kernel and HAProxy (root)
	$(PY) -m bench

lint:  ## ruff and mypy --strict
	.venv/bin/ruff check lb ha lab tests bench
	.venv/bin/mypy

fuzz:  ## fuzz every parser of outside input (atheris), FUZZ_INPUTS=100000 inputs per target
	$(PY) -m tests.fuzz --inputs $(FUZZ_INPUTS)
