"""Assemble and run the gRPC server: grpc.aio, database work in a thread pool, TLS, health and
reflection, metrics, graceful shutdown; and the `payments-server` command line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from sqlalchemy.exc import DBAPIError

from cobalt.payments.v1 import payments_pb2, payments_pb2_grpc
from server import metrics
from server.api import call_limits, call_log
from server.api.accept_ahead import AcceptAhead
from server.api.auth import Authenticator
from server.api.call_limits import InFlight
from server.api.interceptors import GuardedRegistration
from server.api.reflection import enable_reflection
from server.api.servicer import PaymentsServicer
from server.config import ConfigError, Settings, database_label
from server.health_monitor import DatabaseProbe, HealthMonitor
from server.ledger import migrate, sessions
from server.ledger.db import Database
from server.logs import configure_logging
from server.startup import StartupError, ensure_port_free, version

__all__ = ["PaymentsServer", "StartupError", "configure_logging", "main", "new_event_loop", "new_grpc_server",
           "version"]

EXIT_WITHIN_S = 1.0  # after the shutdown's grace, the process is gone within this
SERVICE_NAME = payments_pb2.DESCRIPTOR.services_by_name["PaymentsService"].full_name
log = structlog.get_logger("payments.server")


# A young-generation collection every 20,000 allocations instead of 700: every call allocates
# thousands of short-lived objects, and collecting them that often showed in the tail latency.
GC_THRESHOLDS = (20_000, 50, 100)


def tune_garbage_collector() -> None:
    """Fewer collections, and none that walk what startup loaded (modules, tables, compiled
    statements): it is moved out of the collector's sight once the server is up."""
    gc.collect()  # what is garbage now is freed, not frozen
    gc.set_threshold(*GC_THRESHOLDS)
    gc.freeze()


def grpc_options(settings: Settings | None = None) -> list[tuple[str, int]]:
    """Channel options of the server. Keepalive pings find dead peers on long idle Subscribe streams
    and keep load balancers from dropping them as idle; clients may ping too (every 10 s at most).
    A connection older than the maximum age is asked to go away (GOAWAY) so that clients spread
    over servers added since; calls on it get the grace period to finish, and a Subscribe stream cut
    then resumes from its last sequence (clients/events.py)."""
    settings = settings or Settings()
    options = [
        ("grpc.so_reuseport", 0),
        ("grpc.max_receive_message_length", 4 * 1024 * 1024),
        ("grpc.keepalive_time_ms", settings.grpc_keepalive_time_s * 1000),
        ("grpc.keepalive_timeout_ms", settings.grpc_keepalive_timeout_s * 1000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    if settings.grpc_max_connection_age_s:
        options += [("grpc.max_connection_age_ms", settings.grpc_max_connection_age_s * 1000),
                    ("grpc.max_connection_age_grace_ms", settings.grpc_max_connection_age_grace_s * 1000)]
    return options


def new_grpc_server(settings: Settings | None = None) -> grpc.aio.Server:
    return grpc.aio.server(options=grpc_options(settings))


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS from the certificate and key files; mutual TLS when a client CA is given (a client
    must then present a certificate that CA signed). None: no TLS."""
    if not settings.tls:
        return None
    assert settings.tls_cert_file is not None and settings.tls_key_file is not None
    client_ca = settings.tls_client_ca_file.read_bytes() if settings.tls_client_ca_file else None
    return grpc.ssl_server_credentials(
        [(settings.tls_key_file.read_bytes(), settings.tls_cert_file.read_bytes())],
        root_certificates=client_ca, require_client_auth=client_ca is not None)


def register_payments(server: grpc.aio.Server, servicer: object, auth_tokens: str, accept_ahead: AcceptAhead,
                      in_flight: InFlight | None = None) -> None:
    """Every handler of the payments service registered wrapped by its guard (authentication, roles,
    the bound on calls in flight, error mapping, the call's log line), with the server and with
    accept-ahead alike."""
    payments_pb2_grpc.add_PaymentsServiceServicer_to_server(
        servicer, GuardedRegistration(server, Authenticator(auth_tokens), also=(accept_ahead,), in_flight=in_flight))


class DatabaseThreads(ThreadPoolExecutor):
    """The database thread pool, counting the work running in it (the shutdown waits for it)."""

    def __init__(self, max_workers: int):
        super().__init__(max_workers=max_workers, thread_name_prefix="db")
        self.running = 0
        self._count_lock = threading.Lock()

    def submit(self, fn, /, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN201
        def counted():  # noqa: ANN202
            with self._count_lock:
                self.running += 1
            try:
                return fn(*args, **kwargs)
            finally:
                with self._count_lock:
                    self.running -= 1

        return super().submit(counted)


def wait_for_database(db: Database, wait_s: float) -> None:
    """Return once the database answers; wait up to `wait_s` for it, else StartupError (one log line, exit 1)."""
    from sqlalchemy import text

    deadline = time.monotonic() + wait_s
    while True:
        try:
            with db.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            return
        except Exception as exc:  # noqa: BLE001 - whatever stops the connection, the start stops here
            reason = (str(getattr(exc, "orig", None) or exc).strip().splitlines() or [type(exc).__name__])[0]
            if time.monotonic() >= deadline:
                waited = f" (waited {wait_s} s)" if wait_s else ""
                raise StartupError(f"cannot use the database {database_label(str(db.engine.url))}: {reason}{waited}") from None
            time.sleep(min(1.0, max(0.05, deadline - time.monotonic())))


class PaymentsServer:
    def __init__(self, settings: Settings):
        if settings.database_url is None:
            raise StartupError("PAYMENTS_DATABASE_URL is not set: point it at PostgreSQL "
                               "(postgresql://user@host:5432/payments), or use `make run`, which starts a local "
                               "PostgreSQL")
        self.settings = settings
        # this process's sessions carry a name of their own: at shutdown, what still runs in them is ended
        self.application_name = sessions.process_application_name()
        self.db = Database.from_url(sessions.with_application_name(settings.database_url, self.application_name),
                                    pool_size=settings.db_pool_size, lock_timeout_ms=settings.lock_timeout_ms)
        self.executor = DatabaseThreads(settings.db_threads)
        self.servicer = PaymentsServicer(settings, self.db, self.executor)
        self.health = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
        self.health_monitor = HealthMonitor(DatabaseProbe(self.db.engine, settings.health_probe_ms / 1000),
                                            self._database_reachable)
        self.in_flight = InFlight(settings.max_in_flight)
        self.server: grpc.aio.Server | None = None
        self.accept_ahead = AcceptAhead(settings.grpc_accept_ahead)
        self.metrics_endpoint: metrics.MetricsEndpoint | None = None
        self.port = 0
        self.metrics_port = 0

    async def start(self) -> int:
        settings = self.settings
        call_limits.reopen_database_work()
        ensure_port_free(settings.grpc_addr, "PAYMENTS_GRPC_ADDR")
        if settings.metrics_addr:
            ensure_port_free(settings.metrics_addr, "PAYMENTS_METRICS_ADDR")
        await asyncio.get_running_loop().run_in_executor(None, wait_for_database, self.db, settings.db_wait_s)
        if settings.migrate_at_start:
            run_migrations(self.db)
        server = new_grpc_server(settings)
        register_payments(server, self.servicer, settings.auth_tokens, self.accept_ahead, self.in_flight)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        enable_reflection(server, (SERVICE_NAME, health.SERVICE_NAME))
        credentials = server_credentials(settings)
        try:
            if credentials is None:
                self.port = server.add_insecure_port(settings.grpc_addr)
            else:
                self.port = server.add_secure_port(settings.grpc_addr, credentials)
        except RuntimeError:
            self.port = 0
        if self.port == 0:
            raise StartupError(f"PAYMENTS_GRPC_ADDR={settings.grpc_addr}: cannot listen there")
        if settings.metrics_addr:
            self.metrics_endpoint = metrics.MetricsEndpoint(settings.metrics_addr)
            try:
                self.metrics_port = self.metrics_endpoint.start()
            except OSError as exc:
                self.metrics_endpoint = None
                raise StartupError(f"PAYMENTS_METRICS_ADDR={settings.metrics_addr}: cannot listen there "
                                   f"({exc.strerror or exc})") from None
        metrics.watch_pool(self.db.engine)
        await server.start()
        self.accept_ahead.start(server)
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        self.server = server
        await self.servicer.on_server_start()
        await self.health_monitor.start()
        tune_garbage_collector()
        log.info("serving", addr=settings.grpc_addr, port=self.port, tls=_tls_mode(settings),
                 metrics_port=self.metrics_port or None, version=version())
        return self.port

    async def _set_health(self, status: int) -> None:
        for name in ("", SERVICE_NAME):
            result = self.health.set(name, status)
            if asyncio.iscoroutine(result):
                await result

    async def _database_reachable(self, reachable: bool) -> None:
        if self.server is not None:  # once the shutdown began, health stays NOT_SERVING
            await self._set_health(health_pb2.HealthCheckResponse.SERVING if reachable
                                   else health_pb2.HealthCheckResponse.NOT_SERVING)

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop taking calls; let those in flight finish within the grace; then end the database
        work still running (rolled back: a cut-off call commits nothing) and return within about
        a second more."""
        if self.server is None:
            return
        grace_s = self.settings.shutdown_grace_s if grace_s is None else grace_s
        began = time.monotonic()
        server, self.server = self.server, None
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        loop = asyncio.get_running_loop()
        cut_off = loop.create_task(self._cut_off_database_work(grace_s))
        await self.health_monitor.stop()
        await self.servicer.on_server_stop()
        await server.stop(grace_s)
        if time.monotonic() - began < grace_s - 0.05:
            cut_off.cancel()  # every call ended within the grace: nothing to cut off
        with contextlib.suppress(asyncio.CancelledError):
            await cut_off
        await self.accept_ahead.stop()
        self.servicer.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
        await self._wait_for_database_threads(began + grace_s + EXIT_WITHIN_S - 0.2)
        self.db.dispose()
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.stop()
            self.metrics_endpoint = None
        call_log.flush()
        log.info("stopped", took_s=round(time.monotonic() - began, 3))

    async def _cut_off_database_work(self, grace_s: float) -> None:
        """At the end of the grace, no database work starts any more, and what still runs in this
        process's sessions is ended (again, while database threads are still busy: a thread
        between two statements may have begun one since)."""
        await asyncio.sleep(grace_s)
        call_limits.close_database_work()
        sessions.close_to_new_work(self.db.engine)
        loop = asyncio.get_running_loop()
        until = time.monotonic() + EXIT_WITHIN_S - 0.3
        ended = 0
        while True:
            ended += await loop.run_in_executor(None, sessions.end_database_work, self.db.engine,
                                                self.application_name)
            if not self.executor.running or time.monotonic() >= until:
                break
            await asyncio.sleep(0.1)
        if ended:
            log.warning("database work cut off at the end of the shutdown grace", sessions=ended)

    def busy_threads(self) -> int:
        """Database threads still running work."""
        return self.executor.running

    async def _wait_for_database_threads(self, until: float) -> None:
        while self.executor.running and time.monotonic() < until:
            await asyncio.sleep(0.02)
        if self.executor.running:
            log.warning("database threads still busy at exit", threads=self.executor.running)

    async def serve_forever(self) -> None:
        await self.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        # the shutdown is under way (bounded by the grace period): a repeated signal, say from a
        # supervisor, must not cut it short once the event loop has closed and its handler is gone
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
            signal.signal(sig, signal.SIG_IGN)
        await self.stop()


def new_event_loop(kind: str = "uvloop") -> asyncio.AbstractEventLoop:
    """The server's event loop: uvloop (libuv) by default, which costs less CPU per call than the
    standard library's loop (docs/performance.md)."""
    if kind == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def _tls_mode(settings: Settings) -> str:
    if not settings.tls:
        return "off"
    return "mutual" if settings.tls_client_ca_file else "on"


def run_migrations(db: Database) -> None:
    """Alembic to head; an unreachable database or a missing one is a StartupError."""
    try:
        migrate.upgrade(db.engine)
    except DBAPIError as exc:
        first = str(exc.orig).strip().splitlines()[0] if exc.orig is not None else type(exc).__name__
        raise StartupError(f"cannot use the database {database_label(str(db.engine.url))}: {first}") from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="payments-server",
        description="The Cobalt Payments gRPC server. Configuration is environment variables (PAYMENTS_*, "
                    "STRIPE_*), listed in the README; each is checked at start.",
        epilog="Exit codes: 0 stopped cleanly; 1 could not start (port in use, database unreachable); "
               "2 bad settings or arguments.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("serve", help="serve (the default)")
    sub.add_parser("migrate", help="apply the database migrations (Alembic) and exit")
    return parser.parse_args(argv)


def fail(message: str, code: int) -> None:
    """One error line in the log's schema, then exit with `code` (no traceback)."""
    log.error(message)
    raise SystemExit(code)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    configure_logging()
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        for line in exc.lines:
            log.error(line)
        raise SystemExit(2) from None
    if settings.database_url is None:
        fail("PAYMENTS_DATABASE_URL is not set: point it at PostgreSQL (postgresql://user@host:5432/payments), "
             "or use `make run`, which starts a local PostgreSQL", 2)
    assert settings.database_url is not None
    if args.command == "migrate":
        db = Database.from_url(settings.database_url, pool_size=1)
        try:
            run_migrations(db)
        except StartupError as exc:
            fail(str(exc), 1)
        finally:
            db.dispose()
        log.info("migrated", database=database_label(settings.database_url), version=version())
        return
    if not settings.auth_tokens:
        log.warning("PAYMENTS_AUTH_TOKENS is empty: every call will be refused")
    server = PaymentsServer(settings)

    async def serve() -> None:
        try:
            await server.serve_forever()
        except StartupError:
            await server.stop(0)
            raise

    try:
        with asyncio.Runner(loop_factory=lambda: new_event_loop(settings.event_loop)) as runner:
            runner.run(serve())
    except StartupError as exc:
        fail(str(exc), 1)
    if server.busy_threads():
        # a database thread still waits (on a database that does not answer): the exit does not
        # wait for it, or the shutdown would overrun its grace (what it did is rolled back)
        sys.stdout.flush()
        os._exit(0)
