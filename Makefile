# `make demo` and `make test` each build .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Packages checked by mypy --strict, through a dbloom/ tree of symlinks (the editable
# install maps folders to dbloom.* with an import hook that mypy cannot follow).
TYPED := p2p attest inference api cli ledger sims

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
	$(BIN)/ruff format --check .
	@mkdir -p build/mypy/dbloom
	@for p in $(TYPED); do ln -sfn ../../../$$p build/mypy/dbloom/$$p; done
	MYPYPATH=build/mypy $(BIN)/mypy $(addprefix -p dbloom.,$(TYPED))

# Two test workers (pytest-xdist): most tests wait on one core, and CI has two.
test: lint
	$(BIN)/python -m pytest -q -n 2 --dist worksteal

bench: $(STAMP)
	$(BIN)/python bench/transport.py
	$(BIN)/python bench/relay.py
	$(BIN)/python bench/dht.py --sizes 1000
	$(BIN)/python bench/inference.py
	$(BIN)/python bench/attest.py
	$(BIN)/python bench/ledger.py
	$(BIN)/python bench/e2e.py
	PYTHONHASHSEED=0 $(BIN)/python bench/sims.py

clean:
	rm -rf $(VENV) build *.egg-info
