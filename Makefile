# Cobalt Payments. `make run` serves on an embedded PostgreSQL unless PAYMENTS_DATABASE_URL is set; `make test` installs what it needs and runs the suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
PROTO := protos/cobalt/payments/v1/payments.proto
GEN := cobalt/payments/v1/payments_pb2.py
BUF := node_modules/.bin/buf

.PHONY: venv proto proto-check run run-local-stripe test test-fast lint bench bench-quick bench-scale clean

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

# the proto as a product: lint clean, and nothing that breaks a client of the last release
proto-check: $(BUF)
	$(BUF) lint
	$(BUF) breaking --against protos-released

test: venv $(BUF) proto-check
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: venv
	$(PY) -m pytest -q -x -m "not e2e and not stripe" $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check server clients webhook_bridge tests bench

bench: venv
	$(PY) -m bench.run $(BENCH_ARGS)

bench-quick: venv
	$(PY) -m bench.run --quick $(BENCH_ARGS)

# the data-scale scenarios alone, with ten million lines of history (takes longer than `make bench`)
bench-scale: venv
	$(PY) -m bench.run --scale $(BENCH_ARGS)

clean:
	rm -rf $(VENV) cobalt node_modules var build *.egg-info
