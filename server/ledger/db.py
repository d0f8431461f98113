"""Engine, unit of work and retries, on PostgreSQL (the only database, SPEC §1)."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import random
import re
from collections.abc import Callable, Iterator, Sized
from datetime import UTC, datetime
from typing import TypeVar

import psycopg2.extensions
from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.exc import SQLAlchemyError

from server.ledger import db_errors, green
from server.ledger.db_errors import DRIVER_ERRORS

T = TypeVar("T")

EVENTS_WRITTEN = "events_written"  # conn.info key: the outbox wrote events in this transaction
BEFORE_COMMIT = "before_commit"  # conn.info key: callables run, in order, at the end of the unit of work
MAX_RETRIES = 8  # conflicts (deadlock, serialization failure) retried at most this often
DEFAULT_LOCK_TIMEOUT_MS = 2_000  # how long any statement waits for a row lock before it fails


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def normalise_url(url: str) -> str:
    """`postgres://` and `postgresql://` mean psycopg2 to us."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg2://" + url[len(prefix):]
    return url


def make_engine(url: str, *, pool_size: int = 16, lock_timeout_ms: int = DEFAULT_LOCK_TIMEOUT_MS) -> Engine:
    engine = create_engine(
        normalise_url(url),
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=False,
        pool_recycle=1800,
    )

    @event.listens_for(engine, "connect")
    def _session_settings(dbapi_conn, _record):  # noqa: ANN001
        with dbapi_conn.cursor() as cur:
            cur.execute(f"SET lock_timeout = {int(lock_timeout_ms)}")
        dbapi_conn.commit()

    @event.listens_for(engine, "commit")
    def _nothing_left_behind(conn):  # noqa: ANN001
        # buffered writes are flushed by Database.run; a commit elsewhere would lose them silently
        left = conn.info.get(UNIT_STATE)
        if left and any(isinstance(v, Sized) and not isinstance(v, str) and len(v) for v in left.values()):
            raise RuntimeError("buffered ledger writes were not flushed: write money inside Database.run")

    @event.listens_for(engine, "before_cursor_execute", retval=True)
    def _begin_with_first_statement(conn, cursor, statement, parameters, context, executemany):  # noqa: ANN001, ANN202
        # a unit of work in one round trip less: its BEGIN goes with its first statement (`Database.run`)
        if conn.info.pop(BEGIN_WITH_NEXT, False):
            if executemany:
                cursor.execute("BEGIN")
            else:
                statement = "BEGIN; " + statement
        return statement, parameters

    return engine


UNIT_STATE = "unit_of_work_state"  # conn.info key: what a unit of work buffers, gone when it ends
BEGIN_WITH_NEXT = "begin_with_next"  # conn.info key: the next statement opens the transaction
COMMIT_WITH_LAST = "commit_with_last"  # conn.info key: the unit's last write may end it (`commit_with`)
COMMITTED = "committed"  # conn.info key: the unit's transaction ended with its last write


def unit_state(conn: Connection) -> dict:
    """A dict that lives as long as this unit of work (buffered writes), on commit and rollback alike."""
    return conn.info.setdefault(UNIT_STATE, {})


def run_before_commit(conn: Connection, *, commit_with_last: bool = False) -> None:
    """Run what was left for the end of this unit of work (buffered writes). `commit_with_last`: the
    last of them may send the COMMIT with its statement (`commit_with`)."""
    actions = conn.info.pop(BEFORE_COMMIT, None)
    while actions:
        action = actions.pop(0)
        if not actions and commit_with_last:
            conn.info[COMMIT_WITH_LAST] = True
        action(conn)
    conn.info.pop(COMMIT_WITH_LAST, None)


def commit_with(conn: Connection) -> str:
    """What the unit's last write appends to its statement: "; COMMIT" when the unit of work lets it
    end the transaction (nothing else is sent after it), else nothing."""
    if conn.info.pop(COMMIT_WITH_LAST, False):
        conn.info[COMMITTED] = True
        return "; COMMIT"
    return ""


def before_commit(conn: Connection, key: str, action: Callable[[Connection], None]) -> None:
    """Run `action(conn)` once at the end of this unit of work, before COMMIT (`key` names it)."""
    pending = conn.info.setdefault(BEFORE_COMMIT, [])
    marker = conn.info.setdefault(BEFORE_COMMIT + ":keys", set())
    if key not in marker:
        marker.add(key)
        pending.append(action)


def _clear(conn: Connection) -> None:
    for key in (BEFORE_COMMIT, BEFORE_COMMIT + ":keys", EVENTS_WRITTEN, UNIT_STATE, BEGIN_WITH_NEXT, COMMIT_WITH_LAST,
                COMMITTED):
        conn.info.pop(key, None)


class Database:
    """The unit of work: `db.run(fn)` runs fn(conn) in one transaction, retried on conflicts."""

    def __init__(self, engine: Engine):
        self.engine = engine
        # called (no arguments) after a commit of `run` that wrote outbox events: the stream's wake-up
        self.after_events_committed: list[Callable[[], None]] = []

    @classmethod
    def from_url(cls, url: str, *, pool_size: int = 16, lock_timeout_ms: int = DEFAULT_LOCK_TIMEOUT_MS) -> Database:
        return cls(make_engine(url, pool_size=pool_size, lock_timeout_ms=lock_timeout_ms))

    @contextlib.contextmanager
    def connect(self) -> Iterator[Connection]:
        with self.engine.connect() as conn:
            yield conn

    def run(self, fn: Callable[[Connection], T], *, retries: int = MAX_RETRIES, fold: bool = False) -> T:
        """`fold`: the unit sends its BEGIN with its first statement and its COMMIT with its last
        write (two round trips fewer: group commit's units, which are a few statements each)."""
        attempt = 0
        while True:
            try:
                result, events_written = (self._folded if fold else self._unit)(fn)
                if events_written:
                    self.events_committed()
                return result
            except (SQLAlchemyError, *DRIVER_ERRORS) as exc:
                if db_errors.is_retryable(exc) and attempt < retries:
                    attempt += 1
                    green.pause(random.uniform(0, 0.002 * 2**attempt))
                    continue
                raise translate(exc) from exc

    def _unit(self, fn: Callable[[Connection], T]) -> tuple[T, int]:
        with self.engine.begin() as conn:
            _clear(conn)  # info lives on the pooled connection
            try:
                result = fn(conn)
                run_before_commit(conn)
                return result, conn.info.get(EVENTS_WRITTEN, 0)
            finally:
                _clear(conn)

    def _folded(self, fn: Callable[[Connection], T]) -> tuple[T, int]:
        """The unit of work with BEGIN and COMMIT sent by its own statements: the driver is in
        autocommit, the first statement opens the transaction and the last write (or a COMMIT of
        its own) ends it; whatever happens, the connection goes back to the pool outside any."""
        with self.engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT")
            _clear(conn)
            conn.info[BEGIN_WITH_NEXT] = True
            try:
                result = fn(conn)
                run_before_commit(conn, commit_with_last=True)
                if not conn.info.get(BEGIN_WITH_NEXT) and not conn.info.get(COMMITTED):
                    conn.exec_driver_sql("COMMIT")
                conn.commit()  # the connection's own bookkeeping (the driver sends nothing in autocommit)
                return result, conn.info.get(EVENTS_WRITTEN, 0)
            finally:
                _clear(conn)
                _end_transaction(conn)

    def events_committed(self) -> None:
        for hook in self.after_events_committed:
            try:
                hook()
            except Exception:  # noqa: BLE001 - the commit stands; a missed wake-up only delays delivery
                logging.getLogger(__name__).exception("after-commit hook failed")

    def read_connection(self) -> Connection:
        """A connection for reading only, in autocommit: each statement reads committed data in a
        snapshot of its own and holds nothing once it has answered. The caller closes it."""
        return self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")

    def snapshot_connection(self) -> Connection:
        """A connection whose reads share one transaction (an export's snapshot); the caller ends it
        and closes the connection."""
        return self.engine.connect()

    def read(self, fn: Callable[[Connection], T]) -> T:
        try:
            with self.read_connection() as conn:
                try:
                    return fn(conn)
                finally:
                    _clear(conn)
        except (SQLAlchemyError, *DRIVER_ERRORS) as exc:
            raise translate(exc) from exc

    def dispose(self) -> None:
        self.engine.dispose()


def _end_transaction(conn: Connection) -> None:
    """Roll back a transaction a folded unit left open on the server (it failed before its COMMIT)."""
    dbapi = conn.connection.dbapi_connection
    if dbapi is None or dbapi.closed:
        return
    if dbapi.info.transaction_status != psycopg2.extensions.TRANSACTION_STATUS_IDLE:
        try:
            with dbapi.cursor() as cur:
                cur.execute("ROLLBACK")
        except DRIVER_ERRORS:
            conn.invalidate()  # the connection is lost or unusable: the pool opens another


def translate(exc: Exception) -> Exception:
    """The domain error a caller can act on (a lost database: UNAVAILABLE; a conflict or a lock
    wait that timed out: ABORTED; server.ledger.db_errors), or the exception itself (a bug)."""
    return db_errors.classify(exc) or exc


# ---------------------------------------------------------------- prepared statements (PostgreSQL)
_PARAM = re.compile(r"%\((\w+)\)s")
_PREPARED_ON_CONNECTION = "payments_prepared"  # DBAPI connection info key: names prepared in its session


class PreparedSql:
    """A statement PostgreSQL parses and plans once per connection (PREPARE), then runs by name
    (EXECUTE) with its values: the hot path's statements cost the database a fraction of the CPU
    that parsing and planning them on every call did. Built from driver SQL with %(name)s values;
    the name is derived from the text, so it is the same in every process and after a rebuild."""

    def __init__(self, pyformat_sql: str):
        order: list[str] = []

        def number(match: re.Match) -> str:
            key = match.group(1)
            if key not in order:
                order.append(key)
            return f"${order.index(key) + 1}"

        body = _PARAM.sub(number, pyformat_sql).replace("%%", "%")
        self.name = "pay_" + hashlib.sha1(body.encode()).hexdigest()[:20]
        self.prepare_sql = f"PREPARE {self.name} AS {body}"
        self.keys = tuple(order)
        self.execute_sql = f"EXECUTE {self.name}" + (f"({', '.join(['%s'] * len(order))})" if order else "")

    def ensure(self, conn: Connection) -> None:
        """PREPARE it in this connection's session unless done (a PREPARE outlives any rollback)."""
        prepared = conn.connection.info.setdefault(_PREPARED_ON_CONNECTION, set())
        if self.name not in prepared:
            with conn.connection.dbapi_connection.cursor() as cur:  # type: ignore[union-attr]
                cur.execute(self.prepare_sql)
            prepared.add(self.name)

    def values(self, params: dict) -> tuple:
        return tuple(params[key] for key in self.keys)

    def execute(self, conn: Connection, params: dict):  # noqa: ANN201 - a CursorResult
        self.ensure(conn)
        return conn.exec_driver_sql(self.execute_sql, self.values(params))
