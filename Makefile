# lbd — see README.md. Development runs from ./.venv, which `make setup` creates;
# `make install` installs for production (docs/operations.md).
PY      := .venv/bin/python
PYTEST  := .venv/bin/pytest
FUZZ_INPUTS ?= 100000

# Where `make install` puts things; DESTDIR=<dir> stages it all under <dir>.
DESTDIR    ?=
PREFIX     ?= /opt/lbd
BINDIR     ?= /usr/local/bin
UNITDIR    ?= /etc/systemd/system
SYSCONFDIR ?= /etc/lbd
STATEDIR   ?= /var/lib/lbd
NATIVE     ?= 1

.DEFAULT_GOAL := help
.PHONY: help setup install native test unit netns lab bench lint fuzz

help:  ## show this help
	@awk 'BEGIN{FS=":.*## "} /^[a-z]+:.*## /{printf "  make %-8s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

setup:  ## developer setup (root): apt packages, ./.venv with test tools; stops keepalived etc.
	./scripts/setup.sh

install:  ## production install (root, or DESTDIR=dir): /opt/lbd, lbd/lbctl, unit, /etc/lbd
	DESTDIR="$(DESTDIR)" PREFIX="$(PREFIX)" BINDIR="$(BINDIR)" UNITDIR="$(UNITDIR)" \
	SYSCONFDIR="$(SYSCONFDIR)" STATEDIR="$(STATEDIR)" NATIVE="$(NATIVE)" ./scripts/install.sh

# The hot-path modules compiled by mypyc into lbd-native/ (lb/native.py); a no-op when that
# holds a build of exactly this source. Tests run on the compiled build (LBD_NATIVE=require:
# a missing or stale one fails instead of quietly testing pure Python), the unit tests a
# second time on pure Python.
native:  ## compile the hot-path modules with mypyc into lbd-native/ (if stale)
	$(PY) scripts/build_native.py --if-stale

test: lint native  ## lint, unit and namespace tests (root), compiled and pure; what CI runs
	LBD_NATIVE=require $(PYTEST) -q tests
	LBD_NATIVE=pure $(PYTEST) -q tests/unit --deselect tests/unit/test_install.py

unit: native  ## unit tests of the pure cores only (no root needed), compiled and pure
	LBD_NATIVE=require $(PYTEST) -q tests/unit
	LBD_NATIVE=pure $(PYTEST) -q tests/unit --deselect tests/unit/test_install.py

netns:  ## namespace tests only (root)
	$(PYTEST) -q tests/netns

lab:  ## the namespace lab: clients, lbd, real servers; shows what lbd does (root)
	$(PY) -m lab

bench:  ## benchmarks in namespaces: ratios against the kernel and HAProxy (root)
	$(PY) -m bench

lint:  ## ruff and mypy --strict
	.venv/bin/ruff check lb ha lab tests bench scripts
	.venv/bin/mypy

fuzz:  ## fuzz every parser of outside input (atheris), FUZZ_INPUTS=100000 inputs per target
	$(PY) -m tests.fuzz --inputs $(FUZZ_INPUTS)
