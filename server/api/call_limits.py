"""Bounded load (SPEC §10): at most `PAYMENTS_MAX_IN_FLIGHT` unary calls in a server at once, the
rest refused with RESOURCE_EXHAUSTED at once, so that a server under more load than it can serve
answers quickly instead of queueing without bound; and a call whose deadline has passed before its
database work starts books nothing (DEADLINE_EXCEEDED): its caller has gone, or will treat the
answer as lost and retry.

The guard (server/api/interceptors.py) takes a place in `InFlight` and notes the call's deadline
(`note_deadline`). Database work checks it where it starts: `ApiBase.in_thread` wraps the first
piece of a call's work in `guarded`; code that starts database work elsewhere (a batcher that
queues the call's item) calls `expired(call_deadline())` or `check_deadline` itself.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Callable
from typing import TypeVar

from server.domain.errors import DomainError, Unavailable

T = TypeVar("T")


class DeadlineExceeded(DomainError):
    code = "DEADLINE_EXCEEDED"


class ResourceExhausted(DomainError):
    code = "RESOURCE_EXHAUSTED"


class InFlight:
    """The calls a server handles at once (on its event loop: no lock needed)."""

    def __init__(self, limit: int):
        assert limit > 0
        self.limit = limit
        self.count = 0
        self.refused = 0

    def try_enter(self) -> bool:
        if self.count >= self.limit:
            self.refused += 1
            return False
        self.count += 1
        return True

    def leave(self) -> None:
        self.count -= 1


# The monotonic time by which the current call must be answered, and the call's own task (None:
# no deadline, or its database work has started: later pieces of the same call are not cut off
# half way). A task the call starts (a group commit's) inherits the variable, not the deadline.
_deadline: contextvars.ContextVar[tuple[float, asyncio.Task | None] | None] = contextvars.ContextVar(
    "call_deadline", default=None)

# Set at the end of the shutdown's grace: database work that has not started by then never starts.
_closed = False


def _current_task() -> asyncio.Task | None:
    try:
        return asyncio.current_task()
    except RuntimeError:  # no event loop running here
        return None


def note_deadline(context) -> None:  # noqa: ANN001 - a grpc.aio ServicerContext
    remaining_s = context.time_remaining()
    _deadline.set(None if remaining_s is None else (time.monotonic() + remaining_s, _current_task()))


def call_deadline() -> float | None:
    """The current call's deadline (monotonic), in the call's own task; None elsewhere."""
    noted = _deadline.get()
    if noted is None or noted[1] is not _current_task():
        return None
    return noted[0]


def expired(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline


def check_deadline(deadline: float | None) -> None:
    """Raise unless database work may start now: the deadline has not passed, the server is not closing."""
    if _closed:
        raise Unavailable("the server is shutting down; retry on another")
    if expired(deadline):
        raise DeadlineExceeded("the deadline passed before the request's database work started: nothing was booked")


def guarded(fn: Callable[[], T]) -> Callable[[], T]:
    """`fn`, checked where it starts (in a database thread, after any wait for one) against the
    current call's deadline. The call's later database work is not checked again."""
    deadline = call_deadline()
    if deadline is not None:
        _deadline.set(None)

    def start() -> T:
        check_deadline(deadline)
        return fn()

    return start


def close_database_work() -> None:
    """From now on no database work of a call starts (the shutdown's grace is over)."""
    global _closed
    _closed = True


def reopen_database_work() -> None:
    """For a server started again in the same process (tests)."""
    global _closed
    _closed = False
