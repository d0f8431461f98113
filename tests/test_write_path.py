"""The one write path (server/ledger/ledger.py) and group commit in front of it: a group books each
request on its own merits, a busy account holds up only the requests that need it, and the schema
refuses rows the write path would never write."""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from ledger_invariants import check_invariants, snapshot
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from cobalt.payments.v1 import payments_pb2 as pb
from server.domain.errors import InsufficientFunds, NotFound
from server.domain.types import (
    AccountKind,
    PostingType,
    SystemAccount,
    member_account,
    organisation_account,
    system_account,
)
from server.ledger.ledger import AccountBusy, Booked, Leg, NewTransaction, post


def _pay(member: int, org: int, cents: int) -> NewTransaction:
    return NewTransaction(PostingType.ENTRY_TO_EVENT, "entry", "test", [
        Leg(member_account(member), -cents, organisation_account(org), must_stay_non_negative=True),
        Leg(organisation_account(org), cents, member_account(member))])


def test_a_group_books_each_transaction_on_its_own_merits(server, admin):
    admin.upsert_organisation(7, "Club")
    admin.adjust(1_000, "opening", member_id=1)
    before = snapshot(server.db)
    outcomes = server.db.run(lambda conn: post(conn, [
        _pay(1, 7, 600),   # booked: 400 left
        _pay(1, 7, 600),   # refused: the first one took the funds
        _pay(2, 7, 1),     # refused: member 2 has nothing (and gets no account for it)
        _pay(1, 99, 1),    # refused: no such organisation
        _pay(1, 7, 400),   # booked: exactly to zero
    ]))
    assert [type(o) for o in outcomes] == [Booked, InsufficientFunds, InsufficientFunds, NotFound, Booked]
    assert outcomes[1].balance_cents == 400 and outcomes[2].balance_cents == 0
    assert outcomes[0].balances_after == {member_account(1): 400, organisation_account(7): 600}
    assert outcomes[4].balances_after == {member_account(1): 0, organisation_account(7): 1_000}
    after = snapshot(server.db)
    assert after.transactions == before.transactions + 2 and after.postings == before.postings + 4
    assert member_account(2) not in after.balances, "a refused booking creates no account"
    check_invariants(server.db)


def test_a_busy_account_is_skipped_by_a_group_and_waited_for_alone(server, admin):
    admin.upsert_organisation(7, "Club")
    admin.upsert_organisation(8, "Other club")
    admin.adjust(1_000, "opening", member_id=1)
    with server.db.engine.connect() as holder:
        holder.execute(text("SELECT 1 FROM accounts WHERE id = :id FOR UPDATE"), {"id": organisation_account(7)})
        outcomes = server.db.run(lambda conn: post(conn, [_pay(1, 7, 100), _pay(1, 8, 100)], skip_locked=True))
        assert isinstance(outcomes[0], AccountBusy) and isinstance(outcomes[1], Booked)
        assert outcomes[1].balances_after[member_account(1)] == 900
        holder.rollback()
    (alone,) = server.db.run(lambda conn: post(conn, [_pay(1, 7, 100)]))
    assert alone.balances_after[member_account(1)] == 800
    check_invariants(server.db)


def test_pays_to_other_clubs_go_on_while_one_club_is_locked(server, admin, app):
    """Through the server: with club 7's row held, Pays to club 8 are answered; the Pay to club 7
    is booked once the lock goes."""
    admin.upsert_organisation(7, "Club")
    admin.upsert_organisation(8, "Other club")
    for member in range(1, 9):
        admin.adjust(10_000, "opening", member_id=member)
    with server.db.engine.connect() as holder, ThreadPoolExecutor(9) as pool:
        holder.execute(text("SELECT 1 FROM accounts WHERE id = :id FOR UPDATE"), {"id": organisation_account(7)})
        blocked = pool.submit(app.pay, 1, 100, organisation_id=7)
        others = [pool.submit(app.pay, member, 100, organisation_id=8) for member in range(2, 9)]
        # answered while club 7 is still locked (the holder has not let go)
        assert [f.result(timeout=30).balance_cents for f in others] == [9_900] * 7
        assert not blocked.done()
        holder.rollback()
        assert blocked.result(timeout=30).balance_cents == 9_900
    check_invariants(server.db)


def test_the_same_key_sent_many_times_at_once_books_once(server, admin, app):
    admin.upsert_organisation(7, "Club")
    admin.adjust(10_000, "opening", member_id=1)
    request = pb.PayRequest(idempotency_key=uuid.uuid4().hex, member_id=1, organisation_id=7, amount_cents=250)
    barrier = threading.Barrier(12)

    def send() -> pb.PayResponse:
        barrier.wait()
        return app.call("Pay", request)

    with ThreadPoolExecutor(12) as pool:
        answers = [f.result(timeout=30) for f in [pool.submit(send) for _ in range(12)]]
    assert len({a.payment_id for a in answers}) == 1 and {a.balance_cents for a in answers} == {9_750}
    assert app.balance_cents(member_id=1) == 9_750
    check_invariants(server.db)


def test_an_unbalanced_or_edited_posting_is_refused_by_the_schema(server, admin):
    admin.adjust(500, "opening", member_id=1)
    member, counter = member_account(1), system_account(SystemAccount.ADJUSTMENTS)
    with server.db.engine.connect() as conn:
        txn_id = conn.execute(text(
            "INSERT INTO transactions (reference, type, description, principal, created_at) "
            "VALUES ('TST-1', 'MISCELLANEOUS', 'x', 'test', now()) RETURNING id")).scalar_one()
        with pytest.raises(DBAPIError, match="do not sum to zero"):
            conn.execute(text(
                "INSERT INTO postings (transaction_id, account_id, amount_cents, balance_after_cents, reference, type, "
                "description, created_at) VALUES (:t, :a, 5, 505, 'TST-1-1', 'MISCELLANEOUS', 'x', now()), "
                "(:t, :c, -4, -4, 'TST-1-2', 'MISCELLANEOUS', 'x', now())"), {"t": txn_id, "a": member, "c": counter})
        conn.rollback()
        with pytest.raises(DBAPIError, match="never updated or deleted"):
            conn.execute(text("UPDATE postings SET amount_cents = amount_cents + 1 WHERE account_id = :a"),
                         {"a": member})
        conn.rollback()
        with pytest.raises(DBAPIError, match="ck_transactions_type"):
            conn.execute(text("UPDATE transactions SET type = 'FREE_MONEY'"))
        conn.rollback()
        with pytest.raises(DBAPIError, match="ck_postings"):
            conn.execute(text(
                "INSERT INTO postings (transaction_id, account_id, amount_cents, balance_after_cents, reference, type, "
                "description, created_at) VALUES (:t, :a, 0, 0, 'TST-1-3', 'FREE_MONEY', 'x', now())"),
                {"t": txn_id, "a": member})
        conn.rollback()
    check_invariants(server.db)


def test_postings_that_refer_to_nothing_are_refused_and_what_they_refer_to_stays(server, admin):
    admin.adjust(500, "opening", member_id=1)
    member, counter = member_account(1), system_account(SystemAccount.ADJUSTMENTS)
    insert = text(
        "INSERT INTO postings (transaction_id, account_id, amount_cents, balance_after_cents, counterparty_account_id, "
        "reference, type, description, created_at) VALUES (:t, :a, 5, 505, :ca, 'TST-2-1', 'MISCELLANEOUS', 'x', now()), "
        "(:t, :c, -5, -5, :cc, 'TST-2-2', 'MISCELLANEOUS', 'x', now())")
    nowhere = member_account(999)  # never used: no account row

    def refused(statement, values: dict, message: str, pgcode: str = "23503") -> None:  # noqa: ANN001
        savepoint = conn.begin_nested()
        with pytest.raises(DBAPIError, match=message) as raised:
            conn.execute(statement, values)
        assert raised.value.orig.pgcode == pgcode  # foreign_key_violation, as the foreign keys answered
        savepoint.rollback()

    with server.db.engine.connect() as conn:  # one transaction, rolled back: the ledger is left as it was
        txn_id = conn.execute(text(
            "INSERT INTO transactions (reference, type, description, principal, created_at) "
            "VALUES ('TST-2', 'MISCELLANEOUS', 'x', 'test', now()) RETURNING id")).scalar_one()
        gone_txn = txn_id + 1000
        refused(insert, {"t": gone_txn, "a": member, "c": counter, "ca": counter, "cc": member},
                f"postings refer to transaction {gone_txn}, which does not exist")
        refused(insert, {"t": txn_id, "a": nowhere, "c": counter, "ca": counter, "cc": nowhere},
                f"postings refer to account {nowhere}, which does not exist")
        refused(insert, {"t": txn_id, "a": member, "c": counter, "ca": nowhere, "cc": member},
                f"postings refer to account {nowhere}, which does not exist")
        conn.execute(insert, {"t": txn_id, "a": member, "c": counter, "ca": counter, "cc": None})  # all there
        refused(text("DELETE FROM accounts WHERE id = :id"), {"id": member}, f"postings refer to account {member}: it")
        refused(text("DELETE FROM accounts WHERE id = :id"), {"id": counter}, f"postings refer to account {counter}: it")
        refused(text("DELETE FROM transactions WHERE id = :id"), {"id": txn_id},
                f"postings refer to transaction {txn_id}: it stays")
        refused(text("UPDATE transactions SET id = id + 1000 WHERE id = :id"), {"id": txn_id},
                f"the id of transaction {txn_id} never changes")
        refused(text("UPDATE accounts SET id = id + 4000, ext_id = ext_id + 1000 WHERE id = :id"), {"id": member},
                f"the id of account {member} never changes")
        conn.rollback()
    check_invariants(server.db)


def test_a_refused_request_through_the_server_creates_no_account(server, admin, app):
    admin.upsert_organisation(7, "Club")
    before = snapshot(server.db)
    with pytest.raises(grpc.RpcError) as err:
        app.pay(42, 100, organisation_id=7)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert snapshot(server.db) == before


def test_the_balance_totals_follow_every_write_and_fold_to_one_row_per_kind(server, admin, app):
    """ListBalances' count and total come from `balance_totals`, kept by triggers as balances move:
    right after Adjusts, Pays and a Transfer, and the same after the rows are folded."""
    from server.services.summaries import fold_balance_totals, list_balances

    admin.upsert_organisation(7, "Club")
    for member in range(1, 6):
        admin.adjust(1_000 * member, "opening", member_id=member)
    app.pay(1, 1_000, organisation_id=7)  # member 1 to zero: no longer counted without include_zero
    app.pay(2, 500, organisation_id=7)

    def listed(kind: AccountKind | None, include_zero: bool) -> tuple[int, int]:
        page = server.db.read(lambda conn: list_balances(conn, kind, 100, "", include_zero))
        return page.count, page.total_cents

    expected = {(None, False): (5, 15_000 - 1_000 - 500 + 1_500), (None, True): (6, 15_000),
                (AccountKind.MEMBER, False): (4, 13_500), (AccountKind.MEMBER, True): (5, 13_500),
                (AccountKind.ORGANISATION, True): (1, 1_500)}
    for (kind, include_zero), want in expected.items():
        assert listed(kind, include_zero) == want, (kind, include_zero)
    check_invariants(server.db)
    with server.db.engine.connect() as conn:
        rows_before = conn.execute(text("SELECT count(*) FROM balance_totals")).scalar_one()
    assert server.db.run(fold_balance_totals) == rows_before
    with server.db.engine.connect() as conn:
        kinds = conn.execute(text("SELECT count(*), count(DISTINCT kind) FROM balance_totals")).one()
    assert kinds[0] == kinds[1], "one row per kind after a fold"
    for (kind, include_zero), want in expected.items():
        assert listed(kind, include_zero) == want, (kind, include_zero)
    check_invariants(server.db)
