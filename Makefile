# Every target creates (once) and reuses .venv in the repository root.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Re-install when the package metadata changes.
STAMP_DEV := $(VENV)/.installed-dev-$(shell cksum pyproject.toml | cut -d' ' -f1)
STAMP_BENCH := $(VENV)/.installed-bench-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: test demo lint format clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP_DEV): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e ".[dev,bench]"
	touch $@ $(STAMP_BENCH)

$(STAMP_BENCH): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e ".[bench]"
	touch $@

test: $(STAMP_DEV)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

demo: $(STAMP_BENCH)
	$(BIN)/python -m benchmarks.demo

lint: $(STAMP_DEV)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis *.egg-info
