# roomcast — the two commands that matter: `make run` (the whole cluster on this machine) and
# `make test` (the whole suite). Both create the venv and install what they need.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: system-deps run stop test test-unit test-integration test-e2e test-faults test-chaos-scale test-k8s lint typecheck bench image clean

# System packages the suite needs (its own Kafka, Redis and MariaDB instances, HAProxy, the browser test,
# npm for the official AsyncAPI schema the spec test validates against, faketime for the clock-skew
# fault test);
# installed with apt when we are root and one is missing. `make run` installs what it needs itself.
SYSTEM_BINS := redis-server:redis-server mariadbd:mariadb-server chromium:chromium java:default-jre-headless mvn:maven npm:npm haproxy:haproxy faketime:faketime

$(STAMP): pyproject.toml client/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ./client -e '.[test]'  # the client library is a package of its own (client/)
	touch $(STAMP)

system-deps:
	@missing=""; for pair in $(SYSTEM_BINS); do bin=$${pair%%:*}; pkg=$${pair##*:}; \
	  command -v $$bin >/dev/null 2>&1 || [ -x /usr/sbin/$$bin ] || missing="$$missing $$pkg"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing:$$missing"; apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else echo "missing system packages:$$missing (run: sudo apt-get install -y$$missing)"; exit 1; fi; fi

KAFKA_NODES ?= 1
GATEWAYS ?= 2

run: $(STAMP)  ## the whole cluster in the foreground until Ctrl-C (KAFKA_NODES=3: three brokers, RF 3; GATEWAYS=N)
	$(BIN)/roomcast up --kafka-nodes $(KAFKA_NODES) --gateways $(GATEWAYS)

stop:  ## stop what `make run` started (from another shell)
	@test -x $(BIN)/roomcast && $(BIN)/roomcast down || echo "nothing to stop (no venv)"

test: system-deps $(STAMP) lint typecheck  ## everything: unit, integration, end-to-end, faults
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=15 tests

test-unit: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/unit

test-integration: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/integration

test-e2e: system-deps $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/e2e

test-faults: system-deps $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/faults

# The chaos test at 200 rooms (opt-in: `make test` runs it at 40 rooms and 60 msgs/s). A 2-core
# machine shared with other work held 600 msgs/s, 400 with room to spare (README, "Fault tests").
CHAOS_RATE ?= 400
test-chaos-scale: system-deps $(STAMP)  ## the chaos test at 200 rooms and CHAOS_RATE msgs/s (~1.5-3 min)
	CHAOS_ROOMS=200 CHAOS_RATE=$(CHAOS_RATE) $(BIN)/python -m pytest -q -s -p no:cacheprovider \
		tests/faults/test_chaos.py -k random_order

test-k8s: $(STAMP)  ## deploy/k8s on a real API server; the first run on a machine builds it with Go (deploy/README.md)
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/k8s

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
