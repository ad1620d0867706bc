# The two commands of the README: `make demo` and `make test`. Everything else is a helper.
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
PYTHON ?= python3
DEMO_MEMBERS ?= 5000
PYTEST_ARGS ?=

.PHONY: demo test lint typecheck pytest install serve bench clean constraints

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# Records the installed versions as the ones `make install` keeps to (run after upgrading + make test).
constraints: install
	{ sed -n '1,3p' constraints.txt; $(PY) -m pip freeze --exclude-editable | grep -v '^omniloyal'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

# Migrates, loads the demo retailer if the store is empty, prints an admin key, serves on :8000.
demo: install
	$(BIN)/omniloyal demo --members $(DEMO_MEMBERS)

serve: install
	$(BIN)/omniloyal serve

lint: install
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: install
	$(BIN)/mypy

pytest: install
	$(BIN)/pytest -n 2 $(PYTEST_ARGS)

test: lint typecheck pytest

bench: install
	$(PY) bench/import_members.py --members 1000000
	$(PY) bench/engine.py
	$(PY) bench/demo_purchases.py --members 100000
	$(PY) bench/pos_http.py --rate 200 --seconds 20 --find-max

clean:
	rm -rf $(VENV) data .pytest_cache .mypy_cache .ruff_cache
