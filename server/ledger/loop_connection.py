"""One PostgreSQL connection driven by the server's event loop, for reads that answer many callers
at once: the balance reads (`balance_reads`) and the event stream's reader go this way."""

from __future__ import annotations

import abc
import asyncio
import time
from typing import Generic, TypeVar

import psycopg2
import psycopg2.extensions
import structlog

from server.ledger.db import Database, PreparedSql

# How long a read may wait for a lock before it fails (reads take none; a bound all the same).
LOCK_TIMEOUT_MS = 250

# A statement that takes longer than this, from send to answer, is logged as a warning: every request
# of its kind in this process waits behind it.
SLOW_STATEMENT_MS = 100.0

log = structlog.get_logger("payments.server")

I = TypeVar("I")  # noqa: E741 - what a caller submits
O = TypeVar("O")  # noqa: E741 - its answer


class LoopConnection:
    """One PostgreSQL connection in psycopg2's asynchronous mode, driven by the event loop: a
    statement is sent and its answer read on the loop itself, with no thread to hand it to and no
    interpreter lock to win back when the answer comes (under load that hand-off and that wait
    took a third of each statement's time). Opened on first use, again after it breaks; always in
    autocommit, so a statement is its own transaction; waits for a row lock at most
    LOCK_TIMEOUT_MS."""

    def __init__(self, db: Database):
        self.db = db
        self._conn = None
        self._prepared: set[str] = set()

    async def fetch(self, sql: PreparedSql, params: dict) -> list[tuple]:
        conn = await self._connection()
        try:
            cur = conn.cursor()
            if sql.name not in self._prepared:
                cur.execute(sql.prepare_sql)
                await self._ready(conn)
                self._prepared.add(sql.name)
            cur.execute(sql.execute_sql, sql.values(params))
            await self._ready(conn)
            return cur.fetchall()
        except BaseException as exc:
            if conn.closed or not isinstance(exc, psycopg2.Error):
                self.close()  # broken, or left with a statement in flight (cancelled): start afresh
            raise

    async def _connection(self):  # noqa: ANN202 - a psycopg2 connection
        if self._conn is None or self._conn.closed:
            args, kwargs = self.db.engine.dialect.create_connect_args(self.db.engine.url)
            conn = psycopg2.connect(*args, **kwargs, async_=True)
            try:
                await self._ready(conn)
                cur = conn.cursor()  # held until the answer is read: psycopg2 needs the cursor meanwhile
                cur.execute(f"SET lock_timeout = {LOCK_TIMEOUT_MS}")
                await self._ready(conn)
            except BaseException:
                conn.close()
                raise
            self._conn, self._prepared = conn, set()
        return self._conn

    @staticmethod
    async def _ready(conn) -> None:  # noqa: ANN001
        """Wait, on the loop, until psycopg2 says the connection's work is done (raises its errors)."""
        loop = asyncio.get_running_loop()
        while True:
            state = conn.poll()
            if state == psycopg2.extensions.POLL_OK:
                return
            ready = loop.create_future()
            fd = conn.fileno()

            def wake(ready: asyncio.Future = ready) -> None:
                if not ready.done():
                    ready.set_result(None)

            if state == psycopg2.extensions.POLL_READ:
                watch, unwatch = loop.add_reader, loop.remove_reader
            elif state == psycopg2.extensions.POLL_WRITE:
                watch, unwatch = loop.add_writer, loop.remove_writer
            else:
                raise psycopg2.OperationalError(f"unexpected connection state {state}")
            watch(fd, wake)
            try:
                await ready
            finally:
                unwatch(fd)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn, self._prepared = None, set()


class StatementBatcher(abc.ABC, Generic[I, O]):
    """Group commit, on the server's event loop. While fewer than `max_in_flight` statements are in
    flight an item goes at once, alone; otherwise it waits, and as a statement returns, every item
    waiting (up to `max_batch`) goes in the next one. Under load items share statements ; without load none waits. Items are queued and answered on the
    event loop, and the statements are sent and read there too (`LoopConnection`), so an item costs
    no hand-off to a thread and back. A subclass says in `_run` what the statement is."""

    def __init__(self, db: Database, max_batch: int, max_in_flight: int = 1):
        self.db = db
        self.max_batch = max_batch
        self.max_in_flight = max_in_flight
        self._connections = [LoopConnection(db) for _ in range(max_in_flight)]
        self._waiting: list[tuple[I, asyncio.Future]] = []

    @abc.abstractmethod
    async def _run(self, connection: LoopConnection, items: list[I]) -> list[O]:
        """Send one statement for `items` on `connection`: one result per item, in order."""

    async def submit(self, item: I) -> O:
        loop = asyncio.get_running_loop()
        answer = loop.create_future()
        self._waiting.append((item, answer))
        if self._connections:  # one is free: it sends this item (and any that wait) at once
            loop.create_task(self._send(self._connections.pop()))
        return await answer

    async def _send(self, connection: LoopConnection) -> None:
        """Send statements on `connection` while items wait; each item is told its own answer."""
        try:
            while self._waiting:
                n = self.max_batch
                batch, self._waiting[:n] = self._waiting[:n], []
                # a caller that went away while its item waited (its deadline passed, it was
                # cancelled) is not booked: it was told it failed, and a retry asks again
                batch = [(item, answer) for item, answer in batch if not answer.done()]
                if not batch:
                    continue
                started = time.perf_counter()
                try:
                    results = await self._run(connection, [item for item, _ in batch])
                except BaseException as exc:  # every item of the statement is told
                    for _, answer in batch:
                        if not answer.done():
                            answer.set_exception(exc)
                    if isinstance(exc, asyncio.CancelledError):
                        raise
                    continue
                took_ms = (time.perf_counter() - started) * 1000
                for (_, answer), result in zip(batch, results, strict=True):
                    if not answer.done():  # a caller that went away is not answered (a retry asks again)
                        answer.set_result(result)
                if took_ms > SLOW_STATEMENT_MS:  # after the answers: the log line does not delay them
                    log.warning("slow statement", statement=type(self).__name__, items=len(batch),
                                duration_ms=round(took_ms, 1))
        finally:
            self._connections.append(connection)

    def close(self) -> None:
        for connection in self._connections:
            connection.close()
