# `make demo` and `make test` each build .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/dbloom demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy p2p attest

test: lint
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/transport.py
	$(BIN)/python bench/dht.py --sizes 1000
	$(BIN)/python bench/inference.py

clean:
	rm -rf $(VENV) build *.egg-info
