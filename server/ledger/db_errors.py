"""What a database failure means to the caller (SPEC §4): a lost, restarting or overloaded
database is UNAVAILABLE (retry later), a conflict or a lock wait that timed out is ABORTED (retry
now); anything else is not classified here and stays a bug (INTERNAL).

SQLAlchemy wraps the driver's error, and a failure while the unit of work rolls back may hide the
first one: a `PendingRollbackError` whose cause is "server closed the connection". The whole
chain of causes is looked at, so what the database said decides, not the last wrapper.
"""

from __future__ import annotations

from collections.abc import Iterator

import psycopg2
from sqlalchemy import exc as sa_exc

from server.domain.errors import Aborted, DomainError, Unavailable

# The driver's own errors, for code that calls it directly (a unit of work catches these and SQLAlchemy's).
DRIVER_ERRORS: tuple[type[BaseException], ...] = (psycopg2.Error,)

# SQLSTATEs after which the same request, sent again at once, may well succeed.
CONFLICT_CODES = frozenset({
    "40001",  # serialization_failure
    "40P01",  # deadlock_detected
})
LOCK_TIMEOUT_CODES = frozenset({
    "55P03",  # lock_not_available: lock_timeout passed (or NOWAIT)
})
# SQLSTATEs of a database that is going away, coming back, or out of room: retry later.
UNAVAILABLE_CODES = frozenset({
    "57P01",  # admin_shutdown: "terminating connection due to administrator command"
    "57P02",  # crash_shutdown
    "57P03",  # cannot_connect_now: "the database system is starting up / shutting down / not yet accepting"
    "57P05",  # idle_session_timeout
    "57014",  # query_canceled: cancelled (the server's shutdown, or a statement timeout)
    "25006",  # read_only_sql_transaction: a standby (before a failover completes)
    "53300",  # too_many_connections
    "53400",  # configuration_limit_exceeded
    "53100",  # disk_full
    "53200",  # out_of_memory
    "58030",  # io_error
})
UNAVAILABLE_CLASSES = ("08",)  # connection_exception and its subclasses

# libpq's and psycopg2's words for a connection that is gone (these carry no SQLSTATE).
DISCONNECT_WORDS = (
    "server closed the connection",
    "terminating connection",
    "could not connect",
    "connection refused",
    "connection already closed",
    "no connection to the server",
    "could not receive data from server",
    "could not send data to server",
    "connection to server",
    "ssl syscall error",
    "ssl connection has been closed",
    "the database system is",  # shutting down, starting up, in recovery mode, not yet accepting
    "server conn crashed",
    "lost synchronization with server",
    "connection timed out",
    "timeout expired",  # connect_timeout
    "broken pipe",
    "connection reset",
)

UNAVAILABLE_MESSAGE = "the database is unavailable; retry later"
CONFLICT_MESSAGE = "the request conflicted with others too often; retry it"
LOCK_MESSAGE = "an account of this request is locked by another operation; retry it"


def causes(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and what caused it, outermost first (each at most once)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _driver_error(exc: BaseException) -> BaseException | None:
    """The DBAPI error an exception wraps, if it is one."""
    if isinstance(exc, sa_exc.DBAPIError):
        return exc.orig
    return exc if _is_driver_error(exc) else None


def _is_driver_error(exc: BaseException) -> bool:
    return isinstance(exc, DRIVER_ERRORS)


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE the database sent, anywhere in the chain."""
    for link in causes(exc):
        orig = _driver_error(link)
        code = getattr(orig, "pgcode", None) if orig is not None else None
        if code:
            return code
    return None


def _text(exc: BaseException) -> str:
    return str(exc).lower()


def _is_disconnect(link: BaseException) -> bool:
    if isinstance(link, sa_exc.DBAPIError) and link.connection_invalidated:
        return True
    if isinstance(link, sa_exc.DisconnectionError):
        return True
    orig = _driver_error(link)
    if orig is None:
        return False
    if isinstance(orig, psycopg2.InterfaceError):
        return True  # the connection object is closed: it went away under us
    if isinstance(orig, psycopg2.OperationalError) and not getattr(orig, "pgcode", None):
        return True  # libpq's own failure (no SQLSTATE): the connection or the network
    return any(word in _text(orig) for word in DISCONNECT_WORDS)


def is_retryable(exc: BaseException) -> bool:
    """A conflict that the unit of work retries at once (serialization failure, deadlock). A lock
    wait that timed out is not: it waited its time already, and waiting again would hold the
    caller many times the lock timeout."""
    return sqlstate(exc) in CONFLICT_CODES


def is_unavailable(exc: BaseException) -> bool:
    code = sqlstate(exc)
    if code is not None and (code in UNAVAILABLE_CODES or code.startswith(UNAVAILABLE_CLASSES)):
        return True
    for link in causes(exc):
        if isinstance(link, sa_exc.TimeoutError):  # no pooled connection came free in time
            return True
        if _is_disconnect(link):
            return True
        if isinstance(link, sa_exc.PendingRollbackError) and "invalid transaction" in _text(link):
            return True  # its connection was invalidated: it broke during the transaction
    return False


def classify(exc: BaseException) -> DomainError | None:
    """The domain error a database failure means to the caller, or None when it is none of
    these (a bug: the caller lets it through as INTERNAL). A DomainError is answered as it is."""
    if isinstance(exc, DomainError):
        return exc
    if not any(_driver_error(link) is not None or isinstance(link, sa_exc.SQLAlchemyError) for link in causes(exc)):
        return None
    code = sqlstate(exc)
    if code in LOCK_TIMEOUT_CODES:
        return Aborted(LOCK_MESSAGE)
    if is_retryable(exc):
        return Aborted(CONFLICT_MESSAGE)
    if is_unavailable(exc):
        return Unavailable(UNAVAILABLE_MESSAGE)
    return None
