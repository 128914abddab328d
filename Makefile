# Quick start: `make demo` (set up, then RD vs CDD on the embedded benchmark) and `make test`.
VENV ?= .venv
PYTHON ?= python3
BIN = $(VENV)/bin
STAMP = $(VENV)/.installed

.PHONY: setup test lint demo bench clean

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
	$(BIN)/pytest -q -p no:cacheprovider

demo: setup
	$(BIN)/cdd-ray demo

bench: setup
	$(BIN)/python bench/aupro_speed.py

clean:
	rm -rf demo_out .pytest_cache
