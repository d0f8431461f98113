"""Shared fixtures: a real gRPC server on a free port, on PostgreSQL.

PostgreSQL comes from PAYMENTS_TEST_POSTGRES_URL (default the local one) where it answers, else an
embedded one this run starts itself. Each test run makes its own database and drops it afterwards.
No test is skipped for want of a database.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

import grpc
import psycopg2.errors
import pytest
import structlog
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

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
_pg_notes: list[str] = []  # where the tests' PostgreSQL came from, when not the configured one


def _pg_reachable(url: str) -> str | None:
    try:
        engine = create_engine(url, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.execute(text("select 1"))
        engine.dispose()
        return None
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {str(exc).splitlines()[0]}"


_embedded: list = []  # the embedded PostgreSQL, when this run had to start one


def admin_postgres_url() -> str:
    """A PostgreSQL this run may create databases on: the configured one, else an embedded one."""
    if _embedded:
        return _embedded[0].admin_url()
    problem = _pg_reachable(PG_URL)
    if problem is None:
        return PG_URL
    import tempfile

    from server import embedded_pg

    _embedded.append(embedded_pg.start(tempfile.mkdtemp(prefix="payments-pg-")))
    _pg_notes.append(f"PostgreSQL at {make_url(PG_URL).render_as_string(hide_password=True)} did not answer "
                     f"({problem}): the tests ran on an embedded PostgreSQL")
    return _embedded[0].admin_url()


def new_database() -> tuple[str, Callable[[], None]]:
    """A new, empty database for a test, and how to drop it."""
    admin_url = admin_postgres_url()
    name = f"payments_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    return make_url(admin_url).set(database=name).render_as_string(hide_password=False), drop


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh database for this test run, dropped at the end."""
    url, drop = new_database()
    try:
        yield url
    finally:
        drop()


_drops: list[Callable[[], None]] = []


def scratch_database() -> str:
    """A new, empty database for a test's own server, dropped when the run ends."""
    url, drop = new_database()
    _drops.append(drop)
    return url


def pytest_sessionfinish(session, exitstatus) -> None:  # noqa: ANN001
    for drop in _drops:
        try:
            drop()
        except Exception:  # noqa: BLE001 - a server a test left running may still hold it
            pass
    for embedded in _embedded:
        embedded.stop()


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

    others = ", ".join(table.name for table in metadata.sorted_tables if table is not accounts)
    for attempt in range(10):
        try:
            with db.engine.begin() as conn:
                conn.execute(text(f"TRUNCATE {others}"))
                conn.execute(accounts.delete().where(accounts.c.kind != 3))
                conn.execute(accounts.update().values(balance_cents=0, last_movement_at=None))
                conn.execute(text("SELECT balance_totals_rebuild()"))
            return
        except OperationalError as exc:
            # a late webhook of the previous test, applied as the tables empty, can deadlock with the
            # TRUNCATE (it takes the tables one by one): PostgreSQL ends one of them, try again
            if not isinstance(exc.orig, psycopg2.errors.DeadlockDetected) or attempt == 9:
                raise
            time.sleep(0.05 * (attempt + 1))


@pytest.fixture(scope="session")
def postgresql_server(postgres_url) -> Iterator[RunningServer]:  # noqa: ANN001
    srv = start_server(postgres_url, "postgresql")
    yield srv
    srv.stop()


@pytest.fixture
def server(postgresql_server: RunningServer) -> Iterator[RunningServer]:
    """The running server, with empty tables for this test."""
    _truncate_all(postgresql_server.db)
    yield postgresql_server
    _ran_on["postgresql"] += 1


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
def pg_server(server: RunningServer) -> RunningServer:
    """The same as `server` (every test runs on PostgreSQL); kept for the files that name it."""
    return server


@pytest.fixture
def app(server: RunningServer) -> Iterator[PaymentsClient]:
    with server.client("app") as c:
        yield c


@pytest.fixture
def admin(server: RunningServer) -> Iterator[PaymentsClient]:
    with server.client("admin") as c:
        yield c


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # noqa: ANN001
    if _ran_on:
        terminalreporter.write_line("database-backed tests: " + ", ".join(f"{n} on {db}" for db, n in _ran_on.items()))
    for note in _pg_notes:
        terminalreporter.write_line(note)


def record_backend(backend: str) -> None:
    """For tests that build their own server: count them in the summary line."""
    _ran_on[backend] += 1
