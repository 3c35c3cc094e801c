# roomcast — the two commands that matter: `make run` (the whole cluster on this machine) and
# `make test` (the whole suite). Both create the venv and install what they need.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run stop test test-unit test-integration test-e2e test-faults lint typecheck bench image clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

run: $(STAMP)  ## the whole cluster in the foreground until Ctrl-C
	$(BIN)/roomcast up

stop:  ## stop what `make run` started (from another shell)
	@test -x $(BIN)/roomcast && $(BIN)/roomcast down || echo "nothing to stop (no venv)"

test: $(STAMP) lint typecheck  ## everything: unit, integration, end-to-end, faults
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=15 tests

test-unit: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/unit

test-integration: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/integration

test-e2e: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/e2e

test-faults: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/faults

lint: $(STAMP)
	$(BIN)/ruff check .

typecheck: $(STAMP)
	$(BIN)/python -m mypy

bench: $(STAMP)  ## see bench/README.md
	$(BIN)/roomcast bench --help

image:  ## needs a Docker engine
	docker build -t roomcast:$$(git rev-parse --short HEAD) .

clean:
	rm -rf $(VENV) test-output .run .pytest_cache .mypy_cache .ruff_cache
