"""Health follows the database (SPEC §10): a probe thread runs `SELECT 1` on a connection of its own
every `interval_s`, and the event loop sets the health of "" and of the service to NOT_SERVING when
the database stopped answering, SERVING when it answers again. A health check reads the status
last set: it costs the database nothing.

The probe is its own thread and connection, so neither a busy event loop nor a full pool delays
it. A failed probe is tried once more on a new connection before the database counts as lost (a
restart that is already over does not flap the status). A probe that hangs (a network that drops
packets) counts as lost once no answer came for `stale_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Awaitable, Callable

import psycopg2
import structlog
from sqlalchemy import Engine

log = structlog.get_logger("payments.server")


class DatabaseProbe:
    """`SELECT 1` every `interval_s` in a daemon thread; `last_ok` is when it last answered."""

    def __init__(self, engine: Engine, interval_s: float = 0.5, timeout_s: float = 1.0):
        self.engine = engine
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.last_ok = 0.0  # time.monotonic() of the last answer
        self.last_error = ""
        self._conn = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.probe()  # the first answer before the server says anything
        self._thread = threading.Thread(target=self._run, name="db-probe", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Ask the thread to end, without waiting for it (a probe may be waiting on a database
        that does not answer, and the shutdown does not wait for that)."""
        self._stop.set()
        if self._thread is None:
            self._close()

    def _run(self) -> None:
        try:
            while not self._stop.wait(self.interval_s):
                self.probe()
        finally:
            self._close()

    def probe(self) -> bool:
        for _ in range(2):  # a broken connection from before a restart is replaced once
            try:
                self._select_one()
                self.last_error = ""
                self.last_ok = time.monotonic()
                return True
            except Exception as exc:  # noqa: BLE001 - any failure to answer means the database is not there
                self.last_error = (str(exc).splitlines() or [type(exc).__name__])[0]
                self._close()
        return False

    def _select_one(self) -> None:
        if self._conn is None:
            args, kwargs = self.engine.dialect.create_connect_args(self.engine.url)
            timeout_ms = int(self.timeout_s * 1000)
            kwargs = {**kwargs, "connect_timeout": max(1, int(self.timeout_s)),
                      "options": f"{kwargs.get('options', '')} -c statement_timeout={timeout_ms}".strip()}
            self._conn = psycopg2.connect(*args, **kwargs)
            self._conn.autocommit = True
        with self._conn.cursor() as cur:
            cur.execute("SELECT 1")

    def _close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None

    def healthy(self, stale_s: float) -> bool:
        return time.monotonic() - self.last_ok <= stale_s


class HealthMonitor:
    """Turns the probe's answers into the server's health status, on the event loop."""

    def __init__(self, probe: DatabaseProbe, set_status: Callable[[bool], Awaitable[None]],
                 check_every_s: float | None = None, stale_s: float | None = None):
        self.probe = probe
        self.set_status = set_status
        self.check_every_s = check_every_s or min(0.25, probe.interval_s / 2)
        # two missed probes (or one hung for longer than its timeout) and a little slack
        self.stale_s = stale_s or 2 * probe.interval_s + probe.timeout_s
        self.serving: bool | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.probe.start)
        await self._update()
        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.probe.stop()

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.check_every_s)
            await self._update()

    async def _update(self) -> None:
        healthy = self.probe.healthy(self.stale_s) and not self.probe.last_error
        if healthy != self.serving:
            self.serving = healthy
            if healthy:
                log.info("database reachable: serving")
            else:
                log.warning("database unreachable: not serving", error=self.probe.last_error)
            await self.set_status(healthy)
