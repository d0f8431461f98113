"""Engine, unit of work and retries. SQLite by default, PostgreSQL in production."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import random
import re
import time
import weakref
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.exc import DBAPIError, OperationalError

from server.domain.errors import Aborted, Unavailable

T = TypeVar("T")

EVENTS_WRITTEN = "events_written"  # conn.info key: the outbox wrote events in this transaction
MAX_RETRIES = 8  # conflicts (deadlock, serialization, SQLite busy) retried at most this often


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes: they are UTC."""
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def make_engine(url: str, *, pool_size: int = 16) -> Engine:
    if is_sqlite(url):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        _sqlite_tuning(engine)
        _enable_before_commit(engine)
        return engine
    engine = create_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=False,
        pool_recycle=1800,
        # the driver sends no BEGIN of its own: see _enable_folded_begin
        isolation_level="AUTOCOMMIT",
    )
    _enable_folded_begin(engine)
    _enable_before_commit(engine)
    return engine


# ---------------------------------------------------------------- BEGIN and COMMIT without round trips of their own
PG_BEGIN = "BEGIN ISOLATION LEVEL READ COMMITTED; "
_BEGIN_PENDING = "pg_begin_pending"  # conn.info key: the transaction's BEGIN goes with its first statement


def _pg_in_transaction(dbapi_conn) -> bool:  # noqa: ANN001
    import psycopg2.extensions as ext  # only PostgreSQL engines get here

    return dbapi_conn.get_transaction_status() != ext.TRANSACTION_STATUS_IDLE


def _enable_folded_begin(engine: Engine) -> None:
    """PostgreSQL: the driver runs in autocommit and we say BEGIN ourselves, in the same round trip as
    the transaction's first statement; COMMIT goes with the deferred writes (see _write_deferred_sql).
    psycopg2 would send each on its own, two of the five round trips of a Pay. A reader (READ_ONLY)
    sends no BEGIN at all: each statement reads committed data on its own, as it would in a READ
    COMMITTED transaction. Whatever happens, a connection goes back to the pool outside a transaction."""

    @event.listens_for(engine, "begin")
    def _begin(conn):  # noqa: ANN001
        if not conn.get_execution_options().get(READ_ONLY):
            conn.info[_BEGIN_PENDING] = True

    @event.listens_for(engine, "before_cursor_execute", retval=True)
    def _fold_begin(conn, cursor, statement, parameters, context, executemany):  # noqa: ANN001
        if conn.info.pop(_BEGIN_PENDING, False):
            if executemany:
                cursor.execute(PG_BEGIN)
            else:
                statement = PG_BEGIN + statement
        return statement, parameters

    @event.listens_for(engine, "rollback")
    def _rollback(conn):  # noqa: ANN001
        conn.info.pop(_BEGIN_PENDING, None)
        if not conn.invalidated:
            _end_open_transaction(conn.connection.dbapi_connection)

    @event.listens_for(engine, "reset")
    def _reset(dbapi_conn, _record, _state):  # noqa: ANN001 - the pool's check-in
        _end_open_transaction(dbapi_conn)


def _end_open_transaction(dbapi_conn) -> None:  # noqa: ANN001
    """ROLLBACK an open (or failed) transaction; a connection that cannot take it is broken, and
    the pool drops a connection whose reset raised."""
    if dbapi_conn is not None and not dbapi_conn.closed and _pg_in_transaction(dbapi_conn):
        with dbapi_conn.cursor() as cur:
            cur.execute("ROLLBACK")


def _commit_folded(conn: Connection) -> None:
    """COMMIT what BEGIN opened, when no deferred writes carried it."""
    conn.info.pop(_BEGIN_PENDING, None)
    dbapi_conn = conn.connection.dbapi_connection
    if conn.dialect.name == "postgresql" and dbapi_conn is not None and _pg_in_transaction(dbapi_conn):
        conn.exec_driver_sql("COMMIT")


# ---------------------------------------------------------------- work deferred to the commit
BEFORE_COMMIT = "before_commit"  # conn.info key: callables run, in order, right before COMMIT
_SAVEPOINTS = "deferred_at_savepoint"  # conn.info key: stack of the lists' lengths at each open savepoint
_engines_with_before_commit: weakref.WeakSet = weakref.WeakSet()


def _enable_before_commit(engine: Engine) -> None:
    @event.listens_for(engine, "begin")
    def _clear_on_begin(conn):  # noqa: ANN001 - info lives on the pooled connection: start clean
        conn.info.pop(BEFORE_COMMIT, None)
        conn.info.pop(DEFERRED_SQL, None)
        conn.info.pop(_SAVEPOINTS, None)

    @event.listens_for(engine, "commit")
    def _run_before_commit(conn):  # noqa: ANN001
        actions = conn.info.pop(BEFORE_COMMIT, None)
        while actions:  # an exception here aborts the commit: the transaction rolls back whole
            actions.pop(0)(conn)
        _write_deferred_sql(conn, commit=True)
        _commit_folded(conn)

    @event.listens_for(engine, "rollback")
    def _clear_on_rollback(conn):  # noqa: ANN001
        conn.info.pop(BEFORE_COMMIT, None)
        conn.info.pop(DEFERRED_SQL, None)
        conn.info.pop(_SAVEPOINTS, None)

    # Work deferred inside a SAVEPOINT goes if the savepoint is rolled back, and stays if released
    # (savepoints nest: a stack of the lists' lengths when each began).
    @event.listens_for(engine, "savepoint")
    def _mark_savepoint(conn, name):  # noqa: ANN001
        conn.info.setdefault(_SAVEPOINTS, []).append(
            (len(conn.info.get(BEFORE_COMMIT) or ()), len(conn.info.get(DEFERRED_SQL) or ())))

    @event.listens_for(engine, "rollback_savepoint")
    def _drop_since_savepoint(conn, name, context):  # noqa: ANN001
        marks = conn.info.get(_SAVEPOINTS)
        if not marks:
            return
        for key, keep in zip((BEFORE_COMMIT, DEFERRED_SQL), marks.pop(), strict=True):
            pending = conn.info.get(key)
            if pending is not None:
                del pending[keep:]

    @event.listens_for(engine, "release_savepoint")
    def _keep_since_savepoint(conn, name, context):  # noqa: ANN001
        marks = conn.info.get(_SAVEPOINTS)
        if marks:
            marks.pop()

    _engines_with_before_commit.add(engine)


def defer_until_commit(conn: Connection, action: Callable[[Connection], None]) -> bool:
    """Run `action(conn)` in this transaction right before it commits (the ledger uses it to take a
    hot account's row lock as late as possible). False, and nothing deferred, when this engine was
    not made by `make_engine`: the caller then does the work at once."""
    if conn.engine not in _engines_with_before_commit:
        return False
    conn.info.setdefault(BEFORE_COMMIT, []).append(action)
    return True


def run_deferred(conn: Connection) -> None:
    """Run what was deferred so far now (before more work that must see its effect)."""
    actions = conn.info.pop(BEFORE_COMMIT, None)
    while actions:
        actions.pop(0)(conn)
    _write_deferred_sql(conn, commit=False)


# ---------------------------------------------------------------- writes sent with the COMMIT (PostgreSQL)
DEFERRED_SQL = "deferred_sql"  # conn.info key: [(sql bytes, error translator or None)]
_COMPILED: dict[tuple, object] = {}
_MAX_COMPILED = 256


def defers_sql(conn: Connection) -> bool:
    """Writes nobody reads back in the transaction may go with its COMMIT, in one round trip."""
    return conn.dialect.name == "postgresql" and conn.engine in _engines_with_before_commit


def defer_sql_text(conn: Connection, sql: bytes,
                   on_error: Callable[[DBAPIError], Exception | None] | None = None, *,
                   locks_shared_row: bool = False) -> None:
    """Send `sql` (with its values in it) just before COMMIT, in the same round trip. `on_error`
    may turn its failure into a domain error (nothing is committed either way). Statements that
    lock a row many transactions wait for (`locks_shared_row`) go after the others, right before
    the COMMIT, so that the lock is held as briefly as can be."""
    conn.info.setdefault(DEFERRED_SQL, []).append((sql, on_error, locks_shared_row))


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

    def mogrify(self, conn: Connection, params: dict) -> bytes:
        """The EXECUTE with its values bound, to send later (deferred writes)."""
        self.ensure(conn)
        return conn.connection.dbapi_connection.cursor().mogrify(self.execute_sql, self.values(params))  # type: ignore[union-attr]


@dataclasses.dataclass(frozen=True)
class _CompiledCore:
    prepared: PreparedSql
    compiled: object


def _compiled_core(conn: Connection, stmt, keys: tuple) -> _CompiledCore:  # noqa: ANN001
    key = (stmt, keys)  # the statement itself (a module constant on the hot path)
    entry = _COMPILED.get(key)
    if entry is None:
        if len(_COMPILED) >= _MAX_COMPILED:
            _COMPILED.clear()
        compiled = stmt.compile(dialect=conn.dialect, column_keys=list(keys))
        entry = _CompiledCore(PreparedSql(compiled.string), compiled)
        _COMPILED[key] = entry
    return entry  # type: ignore[return-value]


def _bound(entry: _CompiledCore, params: dict) -> dict:
    compiled = entry.compiled
    values = compiled.construct_params(params)  # type: ignore[attr-defined]
    for name, process in compiled._bind_processors.items():  # type: ignore[attr-defined]
        if values.get(name) is not None:
            values[name] = process(values[name])
    return values


def execute_prepared(conn: Connection, stmt, params: dict):  # noqa: ANN001, ANN201 - a result
    """Execute a SQLAlchemy Core statement as a prepared statement on PostgreSQL (plainly elsewhere)."""
    if not defers_sql(conn):
        return conn.execute(stmt, params)
    entry = _compiled_core(conn, stmt, tuple(params))
    return entry.prepared.execute(conn, _bound(entry, params))


def defer_write(conn: Connection, stmt, params: dict) -> None:  # noqa: ANN001
    """Execute `stmt` (an INSERT whose result nobody reads in this transaction) with its COMMIT on
    PostgreSQL, as a prepared statement; at once elsewhere."""
    if not defers_sql(conn):
        conn.execute(stmt, params)
        return
    entry = _compiled_core(conn, stmt, tuple(params))
    defer_sql_text(conn, entry.prepared.mogrify(conn, _bound(entry, params)))


def _write_deferred_sql(conn: Connection, *, commit: bool) -> None:
    pending = conn.info.pop(DEFERRED_SQL, None)
    if not pending:
        return
    parts = [sql for sql, _, late in pending if not late] + [sql for sql, _, late in pending if late]
    if commit:  # COMMIT in the same round trip: row locks go at once
        parts.append(b"COMMIT")
    try:  # values are in the text already: the driver must not look for placeholders
        conn.exec_driver_sql(b"; ".join(parts).decode(), execution_options={"no_parameters": True})
    except DBAPIError as exc:
        for _, on_error, _ in pending:
            mapped = on_error(exc) if on_error else None
            if mapped is not None:
                raise mapped from exc
        raise


READ_ONLY = "payments_read_only"  # execution option of connections that only read


def _sqlite_tuning(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):  # noqa: ANN001
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):  # noqa: ANN001
        if conn.get_execution_options().get(READ_ONLY):
            # a reader takes no lock: in WAL mode it reads one snapshot while writers go on
            conn.exec_driver_sql("BEGIN")
            return
        # Take the write lock up front: no read-then-upgrade deadlocks between writers.
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def _is_retryable(exc: DBAPIError) -> bool:
    code = getattr(exc.orig, "pgcode", None)
    if code in ("40001", "40P01", "55P03"):
        return True
    if isinstance(exc, OperationalError):
        text = str(exc.orig).lower()
        return "database is locked" in text or "busy" in text
    return False


def _is_unavailable(exc: DBAPIError) -> bool:
    if exc.connection_invalidated:
        return True
    code = getattr(exc.orig, "pgcode", None)
    if code is None and isinstance(exc, OperationalError):
        text = str(exc.orig).lower()
        return any(s in text for s in ("could not connect", "connection refused", "server closed", "terminating"))
    return code is not None and code.startswith("08")


class Database:
    """The unit of work: `db.run(fn)` runs fn(conn) in one transaction, retried on conflicts."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.is_sqlite = engine.dialect.name == "sqlite"
        # called (no arguments) after a commit of `run` that wrote outbox events: the stream's wake-up
        self.after_events_committed: list[Callable[[], None]] = []

    @property
    def records_with_commit(self) -> bool:
        """Idempotency records (and other deferred writes) go to the database with the COMMIT."""
        return self.engine.dialect.name == "postgresql" and self.engine in _engines_with_before_commit

    @classmethod
    def from_url(cls, url: str, *, pool_size: int = 16) -> Database:
        return cls(make_engine(url, pool_size=pool_size))

    @contextlib.contextmanager
    def connect(self) -> Iterator[Connection]:
        with self.engine.connect() as conn:
            yield conn

    def run(self, fn: Callable[[Connection], T], *, retries: int = MAX_RETRIES) -> T:
        attempt = 0
        while True:
            try:
                with self.engine.begin() as conn:
                    conn.info.pop(EVENTS_WRITTEN, None)  # info lives on the pooled connection
                    result = fn(conn)
                    events_written = conn.info.pop(EVENTS_WRITTEN, 0)
                if events_written:
                    self.events_committed()
                return result
            except DBAPIError as exc:
                if _is_retryable(exc) and attempt < retries:
                    attempt += 1
                    time.sleep(random.uniform(0, 0.002 * 2**attempt))
                    continue
                if _is_retryable(exc):
                    raise Aborted("the request conflicted with others too often; retry it") from exc
                if _is_unavailable(exc):
                    raise Unavailable("the database is unavailable") from exc
                raise

    def events_committed(self) -> None:
        for hook in self.after_events_committed:
            try:
                hook()
            except Exception:  # noqa: BLE001 - the commit stands; a missed wake-up only delays delivery
                logging.getLogger(__name__).exception("after-commit hook failed")

    def read_connection(self) -> Connection:
        """A connection for reading only (on SQLite it holds no write lock); the caller closes it."""
        return self.engine.connect().execution_options(**{READ_ONLY: True})

    def read(self, fn: Callable[[Connection], T]) -> T:
        try:
            with self.read_connection() as conn:
                return fn(conn)
        except DBAPIError as exc:
            if _is_unavailable(exc):
                raise Unavailable("the database is unavailable") from exc
            raise

    def dispose(self) -> None:
        self.engine.dispose()
