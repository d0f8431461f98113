"""Work the ledger defers to the commit (a hot organisation's late credit; on PostgreSQL also the
writes sent with COMMIT): it lands exactly when its transaction commits, goes with a rolled-back
SAVEPOINT, and keeps values with `%` and non-ASCII text intact."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import psycopg2.extensions
import pytest
from sqlalchemy import event, func, select, text
from sqlalchemy.exc import DBAPIError

from server.domain.errors import NotFound
from server.domain.types import (
    EventKind,
    PostingType,
    SystemAccount,
    member_account,
    organisation_account,
    system_account,
)
from server.events.outbox import NewEvent, emit
from server.ledger import migrate
from server.ledger.db import Database
from server.ledger.ledger import Leg, NewTransaction, _late_sql, book
from server.ledger.schema import accounts, outbox_events, postings

MEMBER, ORG = member_account(1), organisation_account(7)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db(request, tmp_path) -> Iterator[Database]:  # noqa: ANN001
    url = f"sqlite:///{tmp_path / 'deferred.db'}" if request.param == "sqlite" else request.getfixturevalue(
        "postgres_url")
    database = Database.from_url(url)
    migrate.upgrade(database.engine)
    with database.engine.begin() as conn:  # an empty ledger with one organisation, one funded member
        for table in ("outbox_events", "postings", "transactions", "organisations"):
            conn.execute(text(f"DELETE FROM {table}"))
        conn.execute(text("DELETE FROM accounts WHERE kind <> 3"))
        conn.execute(text("UPDATE accounts SET balance_cents = 0"))
    database.run(lambda conn: _setup(conn))
    yield database
    database.dispose()


def _setup(conn) -> None:  # noqa: ANN001
    conn.execute(text("INSERT INTO organisations (organisation_id, name, created_at, updated_at) "
                      "VALUES (7, 'Club', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"))
    conn.execute(text(f"INSERT INTO accounts (id, kind, ext_id, name, balance_cents, created_at) "
                      f"VALUES ({ORG}, 2, 7, 'Club', 0, CURRENT_TIMESTAMP)"))
    book(conn, NewTransaction(PostingType.MANUAL_ADJUSTMENT, "opening", "test",
                              [Leg(MEMBER, 1_000), Leg(system_account(SystemAccount.ADJUSTMENTS), -1_000)]))


def _pay(amount_cents: int, description: str = "Entry") -> NewTransaction:
    return NewTransaction(PostingType.ENTRY_TO_EVENT, description, "test",
                          [Leg(MEMBER, -amount_cents, ORG, must_stay_non_negative=True),
                           Leg(ORG, amount_cents, MEMBER)], late_credits=True)


def _state(db: Database) -> tuple[int, int, int, int]:
    with db.engine.connect() as conn:
        bal = dict(conn.execute(select(accounts.c.id, accounts.c.balance_cents)).all())
        n_postings = conn.execute(select(func.count()).select_from(postings)).scalar_one()
        n_events = conn.execute(select(func.count()).select_from(outbox_events)).scalar_one()
    return bal[MEMBER], bal[ORG], n_postings, n_events


def test_a_rolled_back_savepoint_takes_its_deferred_credit_and_events_with_it(db: Database) -> None:
    def work(conn) -> None:  # noqa: ANN001
        with pytest.raises(RuntimeError):
            with conn.begin_nested():
                book(conn, _pay(300))
                emit(conn, NewEvent(EventKind.PAYMENT_SUCCEEDED, member_id=1, organisation_id=7))
                raise RuntimeError("after the booking, inside the savepoint")
        with conn.begin_nested():
            book(conn, _pay(100))

    db.run(work)
    member, org, n_postings, n_events = _state(db)
    assert (member, org) == (900, 100)
    assert n_postings == 4  # the opening pair and the one payment that stood
    assert n_events == 0


def test_nothing_deferred_lands_when_the_transaction_fails_after_the_booking(db: Database) -> None:
    def work(conn) -> None:  # noqa: ANN001
        book(conn, _pay(250))
        emit(conn, NewEvent(EventKind.PAYMENT_SUCCEEDED, member_id=1, organisation_id=7))
        raise RuntimeError("fails before the commit")

    with pytest.raises(RuntimeError):
        db.run(work)
    assert _state(db) == (1_000, 0, 2, 0)
    db.run(lambda conn: book(conn, _pay(250)))  # the pooled connection carries nothing over
    assert _state(db) == (750, 250, 4, 0)


def test_deferred_values_keep_percent_signs_and_non_ascii_text(db: Database) -> None:
    description = "Entry 50% %(name)s %s é 🂡"

    def work(conn) -> None:  # noqa: ANN001
        book(conn, _pay(120, description))
        emit(conn, NewEvent(EventKind.PAYMENT_SUCCEEDED, member_id=1, organisation_id=7, route_payload='{"a": "%d"}'))

    db.run(work)
    with db.engine.connect() as conn:
        lines = conn.execute(select(postings.c.account_id, postings.c.description, postings.c.balance_after_cents)
                             .where(postings.c.description == description)).all()
        payload = conn.execute(select(outbox_events.c.route_payload)).scalar_one()
    assert sorted((a, b) for a, _, b in lines) == [(MEMBER, 880), (ORG, 120)]
    assert payload == '{"a": "%d"}'


def test_a_late_credit_to_an_unknown_organisation_fails_the_whole_transaction(db: Database) -> None:
    unknown = organisation_account(99)
    txn = NewTransaction(PostingType.ENTRY_TO_EVENT, "Entry", "test",
                         [Leg(MEMBER, -100, unknown, must_stay_non_negative=True), Leg(unknown, 100, MEMBER)],
                         late_credits=True)
    with pytest.raises(NotFound):
        db.run(lambda conn: book(conn, txn))
    assert _state(db) == (1_000, 0, 2, 0)


# ---------------------------------------------------------------- PostgreSQL: BEGIN and COMMIT ride on other statements
def _statements_sent(db: Database, fn) -> list[str]:  # noqa: ANN001
    """What the driver was asked to execute while `db.run(fn)` ran (each is one round trip)."""
    sent: list[str] = []

    def record(conn, cursor, statement, parameters, context, executemany) -> None:  # noqa: ANN001
        sent.append(statement)

    event.listen(db.engine, "after_cursor_execute", record)
    try:
        db.run(fn)
    finally:
        event.remove(db.engine, "after_cursor_execute", record)
    return sent


@pytest.mark.postgres
@pytest.mark.parametrize("db", ["postgresql"], indirect=True)
def test_a_payment_is_two_round_trips_in_one_read_committed_transaction(db: Database) -> None:
    seen: dict = {}

    def work(conn) -> None:  # noqa: ANN001
        book(conn, _pay(300))
        emit(conn, NewEvent(EventKind.PAYMENT_SUCCEEDED, member_id=1, organisation_id=7))
        seen["isolation"] = conn.exec_driver_sql("SELECT current_setting('transaction_isolation')").scalar_one()
        seen["in_transaction"] = conn.exec_driver_sql("SELECT txid_current_if_assigned() IS NOT NULL").scalar_one()

    sent = _statements_sent(db, work)
    assert seen == {"isolation": "read committed", "in_transaction": True}
    # the debit (with BEGIN in front), the two probes above, then the deferred writes with COMMIT:
    # the organisation's credit with the postings, and the event, each a prepared statement
    assert len(sent) == 4
    assert re.fullmatch(r"BEGIN ISOLATION LEVEL READ COMMITTED; EXECUTE pay_\w+\(.*\)", sent[0])
    # the credit, which locks the organisation's row, comes last: the lock is held the least
    late = _late_sql(1, 1).name
    assert re.fullmatch(rf"EXECUTE pay_\w+\(.*\); EXECUTE {late}\(.*\); COMMIT", sent[-1], re.S)
    assert _state(db) == (700, 300, 4, 1)


@pytest.mark.postgres
@pytest.mark.parametrize("db", ["postgresql"], indirect=True)
def test_a_transaction_that_fails_is_rolled_back_and_its_connection_returns_clean(db: Database) -> None:
    def fails_in_sql(conn) -> None:  # noqa: ANN001
        book(conn, _pay(100))
        conn.exec_driver_sql("SELECT 1/0")

    def fails_in_python(conn) -> None:  # noqa: ANN001
        conn.exec_driver_sql(f"UPDATE accounts SET balance_cents = 5 WHERE id = {MEMBER}")
        raise RuntimeError("after a write that is not deferred")

    with pytest.raises(DBAPIError):
        db.run(fails_in_sql)
    with pytest.raises(RuntimeError):
        db.run(fails_in_python)
    assert _state(db) == (1_000, 0, 2, 0)
    with db.engine.connect() as conn:  # every pooled connection is outside a transaction
        dbapi = conn.connection.dbapi_connection
        assert dbapi.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_IDLE


@pytest.mark.postgres
@pytest.mark.parametrize("db", ["postgresql"], indirect=True)
def test_a_write_without_deferred_work_is_committed_and_reads_open_no_transaction(db: Database) -> None:
    sent = _statements_sent(db, lambda conn: conn.exec_driver_sql(
        f"UPDATE accounts SET last_movement_at = now() WHERE id = {MEMBER}"))
    assert sent[-1] == "COMMIT"
    with db.read_connection() as conn:
        conn.exec_driver_sql("SELECT 1")
        time.sleep(0.01)
        # in a transaction now() would be its start, before this statement's own time
        assert conn.exec_driver_sql("SELECT now() = statement_timestamp()").scalar_one()
        assert conn.exec_driver_sql(f"SELECT last_movement_at IS NOT NULL FROM accounts WHERE id = {MEMBER}").scalar_one()


@pytest.mark.postgres
@pytest.mark.parametrize("db", ["postgresql"], indirect=True)
def test_a_transfer_sends_its_transaction_and_postings_with_the_commit(db: Database) -> None:
    other = member_account(2)
    txn = NewTransaction(PostingType.MEMBER_TRANSFER, "Table money", "test",
                         [Leg(MEMBER, -400, other, must_stay_non_negative=True), Leg(other, 400, MEMBER)],
                         rows_at_commit=True)
    booked: list = []
    sent = _statements_sent(db, lambda conn: booked.append(book(conn, txn)))
    assert booked[0].transaction_id == 0 and booked[0].balances_after == {MEMBER: 600, other: 400}
    # the debit (with BEGIN), the credit (the member's row did not exist: a lookup and its creation
    # come between), then one statement with the transaction row, both postings and COMMIT
    assert sent[0].startswith("BEGIN ISOLATION LEVEL READ COMMITTED; EXECUTE pay_")
    assert re.fullmatch(r"EXECUTE pay_\w+\(.*\); COMMIT", sent[-1], re.S)
    with db.engine.connect() as conn:
        rows = conn.execute(select(postings.c.account_id, postings.c.amount_cents, postings.c.balance_after_cents,
                                   postings.c.transaction_id, postings.c.created_at)
                            .where(postings.c.description == "Table money")).all()
    assert sorted((a, b, c) for a, b, c, _, _ in rows) == sorted([(MEMBER, -400, 600), (other, 400, 400)])
    assert len({t for *_, t, _ in rows}) == 1 and len({at for *_, at in rows}) == 1
    db.run(lambda conn: book(conn, txn))  # again: both rows existed this time
    assert _state(db)[0] == 200


def test_prepared_sql_numbers_each_named_value_once_and_keeps_literal_percent_signs() -> None:
    from server.ledger.db import PreparedSql

    stmt = PreparedSql("UPDATE accounts SET balance_cents = balance_cents + %(amount)s, name = 'a%%b' "
                       "WHERE id = %(id)s AND balance_cents >= %(amount)s")
    assert stmt.keys == ("amount", "id")
    assert stmt.prepare_sql == (f"PREPARE {stmt.name} AS UPDATE accounts SET balance_cents = balance_cents + $1, "
                                "name = 'a%b' WHERE id = $2 AND balance_cents >= $1")
    assert stmt.execute_sql == f"EXECUTE {stmt.name}(%s, %s)"
    assert stmt.values({"id": 7, "amount": 100, "unused": 1}) == (100, 7)
    # the name follows the text: the same in every process, another for other text
    assert PreparedSql("SELECT %(id)s").name != stmt.name
    assert PreparedSql("UPDATE accounts SET balance_cents = balance_cents + %(amount)s, name = 'a%%b' "
                       "WHERE id = %(id)s AND balance_cents >= %(amount)s").name == stmt.name


@pytest.mark.postgres
@pytest.mark.parametrize("db", ["postgresql"], indirect=True)
def test_prepared_statements_are_prepared_again_on_a_new_connection(db: Database) -> None:
    db.run(lambda conn: book(conn, _pay(100)))  # prepares on the pooled connection
    with db.engine.connect() as conn:
        conn.invalidate()  # the next checkout opens a new database session, which has nothing prepared
    db.engine.dispose()
    db.run(lambda conn: book(conn, _pay(100)))
    assert _state(db) == (800, 200, 6, 0)
