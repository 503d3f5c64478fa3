# The two commands of a fresh machine (README): `make book` and `make test`.
# Both create or reuse the virtualenv .venv; set-up runs again only when pyproject.toml changes.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := book

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
PRESET ?= tiny
PYTEST_ARGS ?=
SETUP_FREE_GIB ?= 3
SETUP_KEY := $(shell sha256sum pyproject.toml | cut -c1-16)
STAMP := $(VENV)/.crosslib-setup-$(SETUP_KEY)

.PHONY: book test check-suite screenshots setup check-disk clean-book

## setup: create/reuse .venv and install crosslib with its test tools (torch pinned, CPU build)
setup: $(STAMP)

$(STAMP): pyproject.toml
	@$(MAKE) --no-print-directory check-disk
	@test -x $(BIN)/python || { echo "creating $(VENV) with $(PYTHON)"; $(PYTHON) -m venv $(VENV); }
	@echo "torch==2.13.0" > $(VENV)/constraints.txt
	@echo "installing crosslib and its dependencies into $(VENV) (a few minutes the first time)"
	$(BIN)/python -m pip install -qq --disable-pip-version-check -c $(VENV)/constraints.txt -e '.[dev]'
	@$(BIN)/python -c 'import torch, sys; v = torch.__version__; sys.exit(0 if v.startswith("2.13.0") else "torch " + v + " != 2.13.0")'
	$(BIN)/crosslib fetch
	@rm -f $(VENV)/.crosslib-setup-*
	@touch $@

## check-disk: refuse set-up before it installs anything when the virtualenv's disk or pip's temporary
## folder has under $(SETUP_FREE_GIB) GiB free (a fresh set-up takes ~2.5 GiB: torch's unpacked wheel, then .venv)
check-disk:
	@need_kib=$$(( $(SETUP_FREE_GIB) * 1048576 )); \
	venv_disk="$(VENV)"; while [ ! -e "$$venv_disk" ]; do venv_disk=$$(dirname "$$venv_disk"); done; \
	for dir in "$$venv_disk" "$${TMPDIR:-/tmp}"; do \
	  free_kib=$$(df -Pk "$$dir" | awk 'NR == 2 { print $$4 }'); \
	  if [ "$$free_kib" -lt "$$need_kib" ]; then \
	    echo "not enough free disk for set-up: it needs about $(SETUP_FREE_GIB) GiB in $$dir" \
	      "and there are $$(( free_kib / 1024 )) MiB. Free some space, or point VENV=... or TMPDIR=... at a bigger disk." >&2; \
	    exit 1; \
	  fi; \
	done

## book: execute the chapters (preset $(PRESET)) and build the HTML into book/_build/html
book: setup
	$(BIN)/crosslib book --preset $(PRESET)

## test: unit tests and the end-to-end ones (smoke book, headless chromium)
test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

## check-suite: train the tiny suite under this CPU's kernels and capped at AVX2 (~25 min) and check that
## an induction head forms in both (slow, so not part of `make test`)
check-suite: setup
	$(BIN)/python -m pytest -m check_suite tests/models/test_suite_robustness.py $(PYTEST_ARGS)

## screenshots: full-page screenshots of the built book's pages (headless chromium), to look at
screenshots: setup
	$(BIN)/python tests/screenshots.py book/_build/html book/_build/screenshots

## clean-book: remove the executed chapters and the built HTML (not the data/ cache)
clean-book:
	rm -rf book/chapters book/_build
