"""A call's deadline, where its database work starts (SPEC §10): a call whose deadline has passed
before then books nothing and is answered DEADLINE_EXCEEDED; its caller has gone, or will treat
the answer as lost and retry.

The guard of every call notes its deadline (`note`, server/api/interceptors.py). Whatever starts
the call's database work takes it there, once (`take`): `ApiBase.in_thread` for work in a database
thread, the group commit for a request it queues. Later pieces of the same call are not checked
again, so a call is never cut off half way.
"""

from __future__ import annotations

import asyncio
import contextvars
import time

from server.domain.errors import DomainError


class DeadlineExceeded(DomainError):
    code = "DEADLINE_EXCEEDED"


DEADLINE_MESSAGE = "the deadline passed before the request's database work started: nothing was booked"

# The monotonic time by which the current call must be answered, and the call's own task. A task
# the call starts (a group commit's) inherits the variable but not the deadline: `take` answers
# it in the call's task only.
_deadline: contextvars.ContextVar[tuple[float, asyncio.Task | None] | None] = contextvars.ContextVar(
    "call_deadline", default=None)


def _current_task() -> asyncio.Task | None:
    try:
        return asyncio.current_task()
    except RuntimeError:  # no event loop here
        return None


def note(context) -> None:  # noqa: ANN001 - a grpc.aio ServicerContext
    remaining_s = context.time_remaining()
    _deadline.set(None if remaining_s is None else (time.monotonic() + remaining_s, _current_task()))


def current() -> float | None:
    """The current call's deadline (monotonic), in the call's own task; None elsewhere or when taken."""
    noted = _deadline.get()
    if noted is None or noted[1] is not _current_task():
        return None
    return noted[0]


def take() -> float | None:
    """The current call's deadline, for the database work that starts now; later work of the call
    gets None (it is not cut off half way)."""
    deadline = current()
    if deadline is not None:
        _deadline.set(None)
    return deadline


def expired(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline


def check(deadline: float | None) -> None:
    if expired(deadline):
        raise DeadlineExceeded(DEADLINE_MESSAGE)
