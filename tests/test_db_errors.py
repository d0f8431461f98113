"""Database failures → what the caller is told (server.ledger.db_errors). The errors are the real
ones: raised by PostgreSQL with the SQLSTATE in question (RAISE … USING ERRCODE), by libpq for a
refused connection, by SQLAlchemy around them; and the unit of work maps them the same way."""

from __future__ import annotations

import socket

import psycopg2
import pytest
from conftest import admin_postgres_url
from sqlalchemy import create_engine, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.pool import NullPool

from server.domain.errors import Aborted, InvalidArgument, Unavailable
from server.ledger import db_errors
from server.ledger.db import Database

pytestmark = pytest.mark.postgres


@pytest.fixture(scope="module")
def engine():  # noqa: ANN201
    eng = create_engine(admin_postgres_url(), isolation_level="AUTOCOMMIT", poolclass=NullPool)
    yield eng
    eng.dispose()


def raised_by_postgres(engine, sqlstate: str, message: str = "raised for the test") -> sa_exc.DBAPIError:  # noqa: ANN001
    with pytest.raises(sa_exc.DBAPIError) as caught, engine.connect() as conn:
        conn.execute(text(f"DO $$ BEGIN RAISE EXCEPTION '{message}' USING ERRCODE = '{sqlstate}'; END $$"))
    assert caught.value.orig.pgcode == sqlstate
    return caught.value


@pytest.mark.parametrize("sqlstate", ["57P01", "57P02", "57P03", "08006", "08001", "08P01", "53300", "57014"])
def test_a_database_going_away_or_coming_back_is_unavailable(engine, sqlstate: str) -> None:  # noqa: ANN001
    err = raised_by_postgres(engine, sqlstate)
    for exc in (err, err.orig):  # wrapped by SQLAlchemy, or the driver's own
        mapped = db_errors.classify(exc)
        assert isinstance(mapped, Unavailable), (sqlstate, exc)
        assert not db_errors.is_retryable(exc)


@pytest.mark.parametrize("sqlstate", ["40001", "40P01"])
def test_conflicts_are_retried_then_aborted(engine, sqlstate: str) -> None:  # noqa: ANN001
    err = raised_by_postgres(engine, sqlstate)
    assert db_errors.is_retryable(err)
    assert isinstance(db_errors.classify(err), Aborted)


def test_a_lock_timeout_is_aborted_and_not_retried(engine) -> None:  # noqa: ANN001
    key = 0x5EED_F00D  # an advisory lock: any lock wait counts against lock_timeout
    with engine.connect() as holder, engine.connect() as waiter:
        holder.execute(text("SELECT pg_advisory_lock(:key)"), {"key": key})
        try:
            waiter.execute(text("SET lock_timeout = '50ms'"))
            with pytest.raises(sa_exc.OperationalError) as caught:
                waiter.execute(text("SELECT pg_advisory_lock(:key)"), {"key": key})
            waiter.execute(text("RESET lock_timeout"))
        finally:
            holder.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
    assert caught.value.orig.pgcode == "55P03"
    assert not db_errors.is_retryable(caught.value)
    mapped = db_errors.classify(caught.value)
    assert isinstance(mapped, Aborted) and "locked" in mapped.message


def test_other_database_errors_stay_bugs(engine) -> None:  # noqa: ANN001
    for sqlstate in ("42601", "23505", "22003", "XX000"):
        err = raised_by_postgres(engine, sqlstate)
        assert db_errors.classify(err) is None, sqlstate
        assert not db_errors.is_retryable(err)
    assert db_errors.classify(ValueError("not the database's")) is None


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when this returns


def test_a_refused_connection_is_unavailable() -> None:
    with pytest.raises(psycopg2.OperationalError) as caught:
        psycopg2.connect(host="127.0.0.1", port=closed_port(), user="postgres", connect_timeout=2)
    assert caught.value.pgcode is None
    assert isinstance(db_errors.classify(caught.value), Unavailable)
    engine = create_engine(f"postgresql+psycopg2://postgres@127.0.0.1:{closed_port()}/x")
    with pytest.raises(sa_exc.OperationalError) as wrapped, engine.connect():
        pass
    assert isinstance(db_errors.classify(wrapped.value), Unavailable)


def test_a_connection_killed_under_a_statement_is_unavailable(engine) -> None:  # noqa: ANN001
    """The backend terminated (as a restart does): the next statement sees the connection gone,
    and a PendingRollbackError raised while rolling back still says why, through its cause."""
    with engine.connect() as victim, engine.connect() as killer:
        pid = victim.execute(text("SELECT pg_backend_pid()")).scalar_one()
        killer.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        with pytest.raises(sa_exc.DBAPIError) as caught:
            for _ in range(50):  # the termination reaches the backend asynchronously
                victim.execute(text("SELECT 1"))
    assert isinstance(db_errors.classify(caught.value), Unavailable)
    try:
        raise sa_exc.PendingRollbackError("Can't reconnect until invalid transaction is rolled back.", None, None) \
            from caught.value
    except sa_exc.PendingRollbackError as hiding:
        assert isinstance(db_errors.classify(hiding), Unavailable)


def test_a_closed_connection_and_an_exhausted_pool_are_unavailable() -> None:
    assert isinstance(db_errors.classify(psycopg2.InterfaceError("connection already closed")), Unavailable)
    assert isinstance(db_errors.classify(sa_exc.TimeoutError("QueuePool limit of size 1 overflow 0 reached")),
                      Unavailable)


def test_domain_errors_pass_through() -> None:
    err = InvalidArgument.field("amount_cents", "must be positive")
    assert db_errors.classify(err) is err


def test_the_unit_of_work_answers_unavailable_when_the_database_is_gone(engine) -> None:  # noqa: ANN001
    """Database.run and Database.read, with the pool's connection killed under them and with no
    database listening at all: UNAVAILABLE, never the raw driver error."""
    db = Database.from_url(admin_postgres_url(), pool_size=1)
    try:
        pid = db.run(lambda conn: conn.execute(text("SELECT pg_backend_pid()")).scalar_one())
        with engine.connect() as killer:
            killer.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        with pytest.raises(Unavailable):
            for _ in range(50):
                db.run(lambda conn: conn.execute(text("SELECT 1")).scalar_one())
        assert db.run(lambda conn: conn.execute(text("SELECT 2")).scalar_one()) == 2  # a fresh connection
    finally:
        db.dispose()
    gone = Database.from_url(f"postgresql+psycopg2://postgres@127.0.0.1:{closed_port()}/x", pool_size=1)
    try:
        with pytest.raises(Unavailable):
            gone.run(lambda conn: conn.execute(text("SELECT 1")))
        with pytest.raises(Unavailable):
            gone.read(lambda conn: conn.execute(text("SELECT 1")))
    finally:
        gone.dispose()
