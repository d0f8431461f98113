"""Blocking database code run on the server's event loop: `await on_loop(fn)` runs `fn` (a unit of
work written as ordinary blocking code, e.g. `db.run(...)`) in a greenlet on the loop's own thread;
each time the driver would block for the database it waits on the loop instead, which runs other
calls meanwhile.

This is how SQLAlchemy runs its synchronous core over asynchronous drivers (`greenlet_spawn`,
`await_only`), applied to psycopg2 through its wait callback (`psycopg2.extensions.set_wait_callback`):
psycopg2 then talks to PostgreSQL without blocking, and asks the callback to wait whenever it needs
the socket. Inside `on_loop` the callback waits on the event loop; anywhere else (the database
threads) it blocks its thread on `select`, as psycopg2 would itself.

Group commit's units go this way: no hand-off to a thread and back, and no interpreter lock to win
back from the loop after each statement. The code that decides and writes money is the same code
either way (`ledger.post`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

import psycopg2.extensions
import psycopg2.extras
from sqlalchemy.util.concurrency import await_only, greenlet_spawn, in_greenlet

T = TypeVar("T")


def install() -> None:
    """Make psycopg2 call `_wait` whenever it would block (every connection opened from now on)."""
    if psycopg2.extensions.get_wait_callback() is not _wait:
        psycopg2.extensions.set_wait_callback(_wait)


async def on_loop(fn: Callable[[], T]) -> T:
    """Run blocking database code `fn` on this event loop (`install()` must have been called)."""
    assert psycopg2.extensions.get_wait_callback() is _wait, "green.install() was not called"
    return await greenlet_spawn(fn)


def pause(seconds: float) -> None:
    """Sleep: on the loop, without holding it up (inside `on_loop`), else in this thread."""
    if in_greenlet():
        await_only(asyncio.sleep(seconds))
    else:
        time.sleep(seconds)


def _wait(conn) -> None:  # noqa: ANN001 - a psycopg2 connection
    if not in_greenlet():
        psycopg2.extras.wait_select(conn)  # a database thread: block it, as psycopg2 does by itself
        return
    while True:
        state = conn.poll()
        if state == psycopg2.extensions.POLL_OK:
            return
        if state not in (psycopg2.extensions.POLL_READ, psycopg2.extensions.POLL_WRITE):
            raise psycopg2.OperationalError(f"unexpected connection state {state}")
        await_only(_ready(conn.fileno(), writing=state == psycopg2.extensions.POLL_WRITE))


async def _ready(fd: int, *, writing: bool) -> None:
    loop = asyncio.get_running_loop()
    ready = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    watch, unwatch = (loop.add_writer, loop.remove_writer) if writing else (loop.add_reader, loop.remove_reader)
    watch(fd, wake)
    try:
        await ready
    finally:
        unwatch(fd)
