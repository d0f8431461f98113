"""Assemble and run the gRPC server: grpc.aio, database work in a thread pool, health and
reflection, graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cobalt.payments.v1 import payments_pb2, payments_pb2_grpc
from server.api import call_limits, call_log
from server.api.accept_ahead import AcceptAhead
from server.api.auth import Authenticator
from server.api.call_limits import InFlight
from server.api.interceptors import GuardedRegistration
from server.api.servicer import PaymentsServicer
from server.config import Settings
from server.health_monitor import DatabaseProbe, HealthMonitor
from server.ledger import migrate, sessions
from server.ledger.db import Database

EXIT_WITHIN_S = 1.0  # after the shutdown's grace, the process is gone within this
SERVICE_NAME = payments_pb2.DESCRIPTOR.services_by_name["PaymentsService"].full_name
log = structlog.get_logger("payments.server")


def configure_logging() -> None:
    """One JSON object per line on stdout, from structlog and from the standard library's loggers
    (Alembic, grpc, libraries) alike."""
    stamp = structlog.processors.TimeStamper(fmt="iso", utc=True)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name, structlog.processors.add_log_level, stamp],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
    ))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            stamp,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=True,
    )
    call_log.configure(sys.stdout)


# A young-generation collection every 20,000 allocations instead of 700: every call allocates
# thousands of short-lived objects, and collecting them that often showed in the tail latency.
GC_THRESHOLDS = (20_000, 50, 100)


def tune_garbage_collector() -> None:
    """Fewer collections, and none that walk what startup loaded (modules, tables, compiled
    statements): it is moved out of the collector's sight once the server is up."""
    gc.collect()  # what is garbage now is freed, not frozen
    gc.set_threshold(*GC_THRESHOLDS)
    gc.freeze()


def new_grpc_server() -> grpc.aio.Server:
    return grpc.aio.server(
        options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", 4 * 1024 * 1024)],
    )


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


class DatabaseUnreachable(SystemExit):
    """The server cannot start: its database does not answer (logged in one line, exit code 1)."""


def wait_for_database(db: Database, wait_s: float) -> None:
    """Return once the database answers; wait up to `wait_s` for it, then log one line and exit."""
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
                log.error("database unreachable: not starting", database=db.engine.url.set(query={}).render_as_string(),
                          reason=reason, waited_s=wait_s)
                raise DatabaseUnreachable(1) from None
            time.sleep(min(1.0, max(0.05, deadline - time.monotonic())))


class PaymentsServer:
    def __init__(self, settings: Settings):
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
        self.port = 0

    async def start(self) -> int:
        call_limits.reopen_database_work()
        await asyncio.get_running_loop().run_in_executor(None, wait_for_database, self.db, self.settings.db_wait_s)
        migrate.upgrade(self.db.engine)
        server = new_grpc_server()
        register_payments(server, self.servicer, self.settings.auth_tokens, self.accept_ahead, self.in_flight)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        self.port = server.add_insecure_port(self.settings.grpc_addr)
        if self.port == 0:
            raise SystemExit(f"cannot listen on {self.settings.grpc_addr}")
        await server.start()
        self.accept_ahead.start(server)
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        self.server = server
        await self.servicer.on_server_start()
        await self.health_monitor.start()
        tune_garbage_collector()
        log.info("serving", addr=self.settings.grpc_addr, port=self.port)
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
    """The server's event loop: uvloop (libuv) by default. Under load it cut the server's CPU per
    Pay by 10 to 20 % against the standard library's loop (README, Performance)."""
    if kind == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def main() -> None:
    configure_logging()
    settings = Settings.from_env()
    if not settings.database_url:
        raise SystemExit("PAYMENTS_DATABASE_URL is not set: point it at PostgreSQL (or use `make run`, which starts "
                         "an embedded one)")
    try:
        Authenticator(settings.auth_tokens)
    except ValueError as exc:
        raise SystemExit(str(exc)) from exc
    if not settings.auth_tokens:
        log.warning("PAYMENTS_AUTH_TOKENS is empty: every call will be refused")
    server = PaymentsServer(settings)
    with asyncio.Runner(loop_factory=lambda: new_event_loop(settings.event_loop)) as runner:
        runner.run(server.serve_forever())
    if server.busy_threads():
        # a database thread still waits (on a database that does not answer): the exit does not
        # wait for it, or the shutdown would overrun its grace (what it did is rolled back)
        sys.stdout.flush()
        os._exit(0)
