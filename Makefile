# Two commands do everything on a fresh machine: `make demo` and `make test` (`make test-fast`: the fast tier;
# `make lint`: ruff).
# Both create/refresh .venv idempotently (re-installs only when pyproject.toml changes).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast bench lint clean-venv

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,cnclip]'
	@touch $(STAMP)

demo: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash scripts/demo.sh

# one pytest worker per core, each test file whole on one worker (its module fixtures are built once)
PYTEST := $(PY) -m pytest -q -n auto --dist loadfile

test: $(STAMP)
	$(PYTEST)

# the fast tier: everything but the end-to-end runs marked slow
test-fast: $(STAMP)
	$(PYTEST) -m "not slow"

bench: $(STAMP)
	$(PY) bench/run_all.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean-venv:
	rm -rf $(VENV)
