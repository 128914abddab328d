# Quick start: `make demo` (set up, then RD vs CDD on the embedded benchmark) and `make test`.
VENV ?= .venv
PYTHON ?= python3
BIN = $(VENV)/bin
STAMP = $(VENV)/.installed

.PHONY: setup test test-fast lint demo bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

lint: setup
	$(BIN)/ruff check cdd_ray tests bench
	$(BIN)/ruff format --check cdd_ray tests bench

test: setup lint
	$(BIN)/pytest -q -p no:cacheprovider --durations=10

# the inner loop: every test that needs no Ray cluster (CI runs `make test`, all of them)
test-fast: setup lint
	$(BIN)/pytest -q -p no:cacheprovider -m "not ray" --durations=5

demo: setup
	$(BIN)/cdd-ray demo

bench: setup
	$(BIN)/python bench/aupro_speed.py

clean:
	rm -rf demo_out .pytest_cache
