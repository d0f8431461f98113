"""Bounded load (SPEC §10): at most `PAYMENTS_MAX_IN_FLIGHT` unary calls in a server at once, the
rest refused with RESOURCE_EXHAUSTED at once, so that a server under more load than it can serve
answers quickly instead of queueing without bound; and a call whose deadline has passed before its
database work starts books nothing (DEADLINE_EXCEEDED): its caller has gone, or will treat the
answer as lost and retry.

The guard (server/api/interceptors.py) takes a place in `InFlight` and notes the call's deadline
(server.deadlines). Database work checks it where it starts: `ApiBase.in_thread` wraps the first
piece of a call's work in `guarded`; the group commit takes it for the request it queues.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from server import deadlines
from server.domain.errors import Unavailable

T = TypeVar("T")


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


# Set at the end of the shutdown's grace: database work that has not started by then never starts.
_closed = False


def check_deadline(deadline: float | None) -> None:
    """Raise unless database work may start now: the deadline has not passed, the server is not closing."""
    if _closed:
        raise Unavailable("the server is shutting down; retry on another")
    deadlines.check(deadline)


def guarded(fn: Callable[[], T]) -> Callable[[], T]:
    """`fn`, checked where it starts (in a database thread, after any wait for one) against the
    current call's deadline. The call's later database work is not checked again."""
    deadline = deadlines.take()

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
