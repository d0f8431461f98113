# Cobalt Payments. `make run` installs the runtime set and serves (on an embedded PostgreSQL when
# PAYMENTS_DATABASE_URL is unset); `make test` adds the test set and runs the suite; `make bench` the bench set.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
BENCH_STAMP := $(VENV)/.installed-bench
PROTO := protos/cobalt/payments/v1/payments.proto
GEN := cobalt/payments/v1/payments_pb2.py
BUF := node_modules/.bin/buf

.PHONY: venv venv-test venv-bench proto proto-check run run-local-stripe test test-fast lint bench bench-quick bench-scale faults faults-failover clean

venv: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check -r requirements.lock
	$(MAKE) --no-print-directory proto
	$(PIP) install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

# the test and bench sets, each on top of the runtime set
venv-test: $(TEST_STAMP)

$(TEST_STAMP): $(STAMP) requirements-test.lock
	$(PIP) install -q --disable-pip-version-check -r requirements.lock -r requirements-test.lock
	touch $(TEST_STAMP)

venv-bench: $(BENCH_STAMP)

$(BENCH_STAMP): $(STAMP) requirements-bench.lock
	$(PIP) install -q --disable-pip-version-check -r requirements.lock -r requirements-bench.lock
	touch $(BENCH_STAMP)

proto: $(GEN)

$(GEN): $(PROTO)
	test -x $(PY) || $(MAKE) --no-print-directory venv
	mkdir -p cobalt/payments/v1
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. $(PROTO)
	touch cobalt/__init__.py cobalt/payments/__init__.py cobalt/payments/v1/__init__.py

$(BUF): package.json package-lock.json
	npm ci --no-audit --no-fund --silent
	touch $(BUF)

run: venv
	$(PY) -m server.devrun

run-local-stripe: venv-test  # localstripe is in the test set
	$(PY) -m server.devrun --local-stripe

# the proto as a product: lint clean, and nothing that breaks a client of the last release
proto-check: $(BUF)
	$(BUF) lint
	$(BUF) breaking --against protos-released

test: venv-test $(BUF) proto-check
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: venv-test
	$(PY) -m pytest -q -x -m "not e2e and not stripe" $(PYTEST_ARGS)

lint: venv-test
	$(VENV)/bin/ruff check server clients webhook_bridge tests bench

# Every fault scenario (docs/faults.md) on a PostgreSQL cluster of its own; a table per scenario.
faults: venv-test
	cd tests && PYTHONPATH=. ../$(PY) -m faults $(FAULTS_ARGS)
	$(MAKE) --no-print-directory faults-failover

# A primary and a synchronous standby of its own (never the shared PostgreSQL), kill -9, promotion,
# fail-back and a restore drill (tests/failover/harness.py; docs/operations.md).
faults-failover: venv-test
	$(PY) tests/failover/harness.py --json var/failover-report.json $(FAILOVER_ARGS)

bench: venv-bench
	$(PY) -m bench.run $(BENCH_ARGS)

bench-quick: venv-bench
	$(PY) -m bench.run --quick $(BENCH_ARGS)

# the data-scale scenarios alone, with ten million lines of history (takes longer than `make bench`)
bench-scale: venv-bench
	$(PY) -m bench.run --scale $(BENCH_ARGS)

clean:
	rm -rf $(VENV) cobalt node_modules var build *.egg-info
