"""Shared fixtures: a real gRPC server on a free port, on SQLite and on PostgreSQL.

PostgreSQL comes from PAYMENTS_TEST_POSTGRES_URL (default the local one). Each test run makes its
own database and drops it afterwards. Where PostgreSQL is unreachable its tests are skipped, except
under CI=true, where that fails the run, so a green CI always means the PostgreSQL tests ran.
"""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

import grpc
import pytest
import structlog
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from clients.payments_client import PaymentsClient
from server.app import PaymentsServer, new_event_loop
from server.config import Settings
from server.ledger.db import Database

# Card money: localstripe, a Stripe-configured server and the webhook bridge.
pytest_plugins = ["stripe_support"]

PG_URL = os.environ.get("PAYMENTS_TEST_POSTGRES_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

TOKENS = {
    "app": "test-app-token",
    "admin": "test-admin-token",
    "bridge": "test-bridge-token",
    "app2": "test-app2-token",
}
AUTH_SPEC = (
    f"{TOKENS['app']}=app-svc:app,{TOKENS['admin']}=ops:admin,"
    f"{TOKENS['bridge']}=stripe-bridge:stripe-bridge,{TOKENS['app2']}=other-svc:app"
)

_ran_on: Counter[str] = Counter()

# In-process servers log one line per call; in the test output only warnings and errors belong.
# (What the server prints is checked against `payments-server` subprocesses, which configure their own.)
structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
_pg_skipped: list[str] = []  # why PostgreSQL tests did not run, for the summary line


def _pg_reachable() -> str | None:
    try:
        engine = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.execute(text("select 1"))
        engine.dispose()
        return None
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {str(exc).splitlines()[0]}"


def require_postgres() -> None:
    """For a test that uses PostgreSQL without the `postgres_url` fixture: skip it where PostgreSQL
    is unreachable, fail it under CI=true."""
    problem = _pg_reachable()
    if problem is not None:
        if IN_CI:
            pytest.fail(f"PostgreSQL unreachable: {problem}")
        pytest.skip(f"PostgreSQL unreachable: {problem}")


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh database for this test run, dropped at the end."""
    problem = _pg_reachable()
    if problem is not None:
        message = f"PostgreSQL unreachable at {make_url(PG_URL).render_as_string(hide_password=True)}: {problem}"
        _pg_skipped.append(message)
        if IN_CI:
            pytest.fail(message + " (CI=true: the PostgreSQL tests must run)")
        pytest.skip(message)
    name = f"payments_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(PG_URL).set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@dataclass
class RunningServer:
    server: PaymentsServer
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread
    target: str
    database_url: str
    backend: str

    def client(self, role: str = "app") -> PaymentsClient:
        return PaymentsClient(self.target, TOKENS[role])

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.target)

    @property
    def db(self) -> Database:
        return self.server.db

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(0.5), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)


def run_in_own_loop(start: Callable[[], Awaitable[int]], name: str) -> tuple[asyncio.AbstractEventLoop,
                                                                             threading.Thread, int]:
    """Run `start()` (which returns the bound port) on a new event loop in a daemon thread, then
    keep that loop running; returns once started (or re-raises what stopped the start). The loop is
    the server's own kind (uvloop), so the tests exercise what runs in production."""
    loop = new_event_loop()
    ready: dict = {}

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            ready["port"] = loop.run_until_complete(start())
        except BaseException as exc:  # noqa: BLE001
            ready["error"] = exc
            return
        finally:
            ready["done"] = True
        loop.run_forever()

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    while "done" not in ready:
        thread.join(0.01)
    if "error" in ready:
        raise ready["error"]
    return loop, thread, ready["port"]


def start_server(database_url: str, backend: str, *, addr: str = "127.0.0.1:0",
                 **overrides) -> RunningServer:  # noqa: ANN003
    """A server in this process; `addr` fixes the address (to stop it and start it again there)."""
    settings = Settings(database_url=database_url, grpc_addr=addr, auth_tokens=AUTH_SPEC, **overrides)
    server = PaymentsServer(settings)
    loop, thread, port = run_in_own_loop(server.start, f"server-{backend}")
    return RunningServer(server, loop, thread, f"127.0.0.1:{port}", database_url, backend)


def _truncate_all(db: Database) -> None:
    """Empty every table but the system accounts, keeping the schema (fast per-test isolation)."""
    from server.ledger.schema import accounts, metadata

    with db.engine.begin() as conn:
        for table in reversed(metadata.sorted_tables):
            if table is accounts:
                conn.execute(table.delete().where(table.c.kind != 3))
                conn.execute(table.update().values(balance_cents=0, last_movement_at=None))
            else:
                conn.execute(table.delete())


@pytest.fixture(scope="session")
def sqlite_server(tmp_path_factory) -> Iterator[RunningServer]:  # noqa: ANN001
    path = tmp_path_factory.mktemp("db") / "payments.db"
    srv = start_server(f"sqlite:///{path}", "sqlite")
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def postgresql_server(postgres_url) -> Iterator[RunningServer]:  # noqa: ANN001
    srv = start_server(postgres_url, "postgresql")
    yield srv
    srv.stop()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def server(request) -> Iterator[RunningServer]:  # noqa: ANN001
    """A running server on each database, with empty tables for this test."""
    srv: RunningServer = request.getfixturevalue(f"{request.param}_server")
    _truncate_all(srv.db)
    yield srv
    _ran_on[request.param] += 1


def record_answers(monkeypatch, module, name: str) -> list:  # noqa: ANN001
    """Replace the coroutine function `module.name`, which answers a list, with one that also keeps
    every answer in the list returned here (what each one-statement try answered, say)."""
    seen: list = []
    real = getattr(module, name)

    async def spy(*args):  # noqa: ANN002, ANN202
        answers = await real(*args)
        seen.extend(answers)
        return answers

    monkeypatch.setattr(module, name, spy)
    return seen


@pytest.fixture
def pg_server(postgresql_server: RunningServer) -> RunningServer:
    """The PostgreSQL server alone, with empty tables: a test file of PostgreSQL-only paths overrides
    `server` with it (`app` and `admin` then talk to it)."""
    _truncate_all(postgresql_server.db)
    return postgresql_server


@pytest.fixture
def app(server: RunningServer) -> Iterator[PaymentsClient]:
    with server.client("app") as c:
        yield c


@pytest.fixture
def admin(server: RunningServer) -> Iterator[PaymentsClient]:
    with server.client("admin") as c:
        yield c


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # noqa: ANN001
    if _ran_on or _pg_skipped:
        backends = ["sqlite", "postgresql", *sorted(set(_ran_on) - {"sqlite", "postgresql"})]
        parts = ", ".join(f"{_ran_on[db]} on {db}" for db in backends)
        if _pg_skipped:
            parts += " (PostgreSQL tests not run: unreachable)"
        terminalreporter.write_line(f"database-backed tests: {parts}")


def record_backend(backend: str) -> None:
    """For tests that build their own server: count them in the summary line."""
    _ran_on[backend] += 1
