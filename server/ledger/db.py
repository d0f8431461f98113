"""Engine, unit of work and retries, on PostgreSQL (the only database, SPEC §1)."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import random
import re
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import TypeVar

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.exc import SQLAlchemyError

from server.ledger import db_errors
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
        if left and any(isinstance(v, list) and v for v in left.values()):
            raise RuntimeError("buffered ledger writes were not flushed: write money inside Database.run")

    return engine


UNIT_STATE = "unit_of_work_state"  # conn.info key: what a unit of work buffers, gone when it ends


def unit_state(conn: Connection) -> dict:
    """A dict that lives as long as this unit of work (buffered writes), on commit and rollback alike."""
    return conn.info.setdefault(UNIT_STATE, {})


def run_before_commit(conn: Connection) -> None:
    """Run what was left for the end of this unit of work (buffered writes)."""
    actions = conn.info.pop(BEFORE_COMMIT, None)
    while actions:
        actions.pop(0)(conn)


def before_commit(conn: Connection, key: str, action: Callable[[Connection], None]) -> None:
    """Run `action(conn)` once at the end of this unit of work, before COMMIT (`key` names it)."""
    pending = conn.info.setdefault(BEFORE_COMMIT, [])
    marker = conn.info.setdefault(BEFORE_COMMIT + ":keys", set())
    if key not in marker:
        marker.add(key)
        pending.append(action)


def _clear(conn: Connection) -> None:
    for key in (BEFORE_COMMIT, BEFORE_COMMIT + ":keys", EVENTS_WRITTEN, UNIT_STATE):
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

    def run(self, fn: Callable[[Connection], T], *, retries: int = MAX_RETRIES) -> T:
        attempt = 0
        while True:
            try:
                with self.engine.begin() as conn:
                    _clear(conn)  # info lives on the pooled connection
                    try:
                        result = fn(conn)
                        run_before_commit(conn)
                        events_written = conn.info.get(EVENTS_WRITTEN, 0)
                    finally:
                        _clear(conn)
                if events_written:
                    self.events_committed()
                return result
            except (SQLAlchemyError, *DRIVER_ERRORS) as exc:
                if db_errors.is_retryable(exc) and attempt < retries:
                    attempt += 1
                    time.sleep(random.uniform(0, 0.002 * 2**attempt))
                    continue
                raise translate(exc) from exc

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
