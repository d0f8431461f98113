# Cobalt Payments. `make run` serves on an embedded PostgreSQL unless PAYMENTS_DATABASE_URL is set; `make test` installs what it needs and runs the suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
PROTO := protos/cobalt/payments/v1/payments.proto
GEN := cobalt/payments/v1/payments_pb2.py
BUF := node_modules/.bin/buf

.PHONY: venv proto run run-local-stripe test test-fast lint bench bench-quick bench-scale faults clean

venv: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check -r requirements.lock
	$(MAKE) --no-print-directory proto
	$(PIP) install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

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

run-local-stripe: venv
	$(PY) -m server.devrun --local-stripe

test: venv $(BUF)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: venv
	$(PY) -m pytest -q -x -m "not e2e and not stripe" $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check server clients webhook_bridge tests bench

# Every fault scenario (docs/faults.md) on a PostgreSQL cluster of its own; a table per scenario.
faults: venv
	cd tests && PYTHONPATH=. ../$(PY) -m faults $(FAULTS_ARGS)
	$(MAKE) --no-print-directory faults-failover

# A primary and a synchronous standby of its own (never the shared PostgreSQL), kill -9, promotion,
# fail-back and a restore drill (tests/failover/harness.py; docs/operations.md).
.PHONY: faults-failover
faults-failover: venv
	$(PY) tests/failover/harness.py --json var/failover-report.json $(FAILOVER_ARGS)

bench: venv
	$(PY) -m bench.run $(BENCH_ARGS)

bench-quick: venv
	$(PY) -m bench.run --quick $(BENCH_ARGS)

# the data-scale scenarios alone, with ten million lines of history (takes longer than `make bench`)
bench-scale: venv
	$(PY) -m bench.run --scale $(BENCH_ARGS)

clean:
	rm -rf $(VENV) cobalt node_modules var build *.egg-info
