"""Wake-ups across server processes: PostgreSQL LISTEN/NOTIFY on one dedicated connection per process.

A NOTIFY is sent *after* a commit that wrote events, from this connection, never inside the writing
transaction: PostgreSQL serialises the commits of transactions that issued NOTIFY behind one global
lock, which would put every Pay in single file. Bursts of local commits are coalesced into one NOTIFY.
A notification is only a hint: a lost one (a crash between commit and NOTIFY, a dropped connection)
delays delivery until the reader's next poll, never loses an event; the outbox table is the truth.
"""

from __future__ import annotations

import os
import select
import threading
import time
from collections.abc import Callable

import structlog
from sqlalchemy import Engine

CHANNEL = "payments_outbox"
SELECT_TIMEOUT_S = 1.0
# A NOTIFY is a commit of its own: under load, send at most one per interval (other processes learn of
# a burst of commits at most this much later).
MIN_NOTIFY_INTERVAL_S = 0.005
RECONNECT_BACKOFF_S = (0.2, 0.5, 1.0, 2.0, 5.0)

log = structlog.get_logger("payments.events")


class PgWakeups:
    def __init__(self, engine: Engine, on_remote_commit: Callable[[], None]):
        self._engine = engine
        self._on_remote_commit = on_remote_commit
        self._stop = threading.Event()
        self._pipe_r, self._pipe_w = os.pipe()
        os.set_blocking(self._pipe_r, False)
        os.set_blocking(self._pipe_w, False)
        self._thread = threading.Thread(target=self._run, name="events-listen", daemon=True)
        self.notifies_sent = 0
        self.notifies_received = 0
        self._poked = False  # a poke is in the pipe and not yet drained: later commits need not write

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._poke()
        self._thread.join(5)
        for fd in (self._pipe_r, self._pipe_w):
            try:
                os.close(fd)
            except OSError:
                pass

    def local_commit(self) -> None:
        """Thread-safe and cheap: ask the listener thread to NOTIFY the other processes. Commits
        that find a poke still waiting ride on it (no write, no wake-up of the listener)."""
        if not self._poked:
            self._poked = True
            self._poke()

    def _poke(self) -> None:
        try:
            os.write(self._pipe_w, b"!")
        except (BlockingIOError, OSError):
            pass  # the pipe is full: a NOTIFY is due anyway

    def _connect(self):  # noqa: ANN202 - a DBAPI connection
        cargs, cparams = self._engine.dialect.create_connect_args(self._engine.url)
        conn = self._engine.dialect.connect(*cargs, **cparams)
        conn.autocommit = True
        with conn.cursor() as cur:
            # a NOTIFY is a commit of its own; a lost one only delays, so don't wait for it to be flushed
            cur.execute("SET synchronous_commit TO off")
            cur.execute(f"LISTEN {CHANNEL}")
        return conn

    def _drain_pipe(self) -> bool:
        poked = False
        while True:
            try:
                if not os.read(self._pipe_r, 4096):
                    break
                poked = True
            except BlockingIOError:
                break
        # after reading: a commit that still saw the flag committed before this point, and the
        # NOTIFY this drain makes due is sent later; a commit from now on pokes again
        self._poked = False
        return poked

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            conn = None
            try:
                conn = self._connect()
                failures = 0
                own_pid = conn.get_backend_pid()
                self._on_remote_commit()  # notifications may have been missed while disconnected
                due, last_sent = False, 0.0
                while not self._stop.is_set():
                    wait_s = SELECT_TIMEOUT_S
                    if due:
                        wait_s = max(0.0, last_sent + MIN_NOTIFY_INTERVAL_S - time.monotonic())
                    readable, _, _ = select.select([conn, self._pipe_r], [], [], wait_s)
                    if conn in readable:
                        conn.poll()
                        remote = any(n.pid != own_pid for n in conn.notifies)
                        conn.notifies.clear()
                        if remote:
                            self.notifies_received += 1
                            self._on_remote_commit()
                    if self._pipe_r in readable and self._drain_pipe():
                        due = True
                    if due and not self._stop.is_set() and time.monotonic() >= last_sent + MIN_NOTIFY_INTERVAL_S:
                        with conn.cursor() as cur:
                            cur.execute(f"NOTIFY {CHANNEL}")
                        due, last_sent = False, time.monotonic()
                        self.notifies_sent += 1
            except Exception as exc:  # noqa: BLE001 - keep listening; polling covers the gap
                delay = RECONNECT_BACKOFF_S[min(failures, len(RECONNECT_BACKOFF_S) - 1)]
                failures += 1
                if not self._stop.is_set():
                    log.warning("event listener connection failed; retrying", error=type(exc).__name__,
                                retry_in_s=delay)
                    self._stop.wait(delay)
            finally:
                if conn is not None:
                    try:
                        conn.close()
                    except Exception:  # noqa: BLE001
                        pass
