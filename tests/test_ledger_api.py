"""Every RPC of the balance path through a real gRPC channel, on PostgreSQL."""

from __future__ import annotations

import csv
import io
from datetime import timedelta
from zoneinfo import ZoneInfo

import grpc
import pytest
from conftest import TOKENS
from ledger_invariants import check_invariants, snapshot
from sqlalchemy import select

from clients.payments_client import PaymentsClient
from cobalt.payments.v1 import payments_pb2 as pb
from server.domain.types import member_account, organisation_account
from server.ledger.schema import outbox_events, postings, transactions


def booked_transactions(server, payment_id: str) -> list:  # noqa: ANN001
    with server.db.engine.connect() as conn:
        return conn.execute(select(transactions).where(transactions.c.payment_id == payment_id)).all()


def events(server, kind: str) -> list:  # noqa: ANN001
    with server.db.engine.connect() as conn:
        return conn.execute(
            select(outbox_events).where(outbox_events.c.kind == kind).order_by(outbox_events.c.sequence)
        ).all()


# ---------------------------------------------------------------- registration


def test_upsert_member_sets_and_renames(server, admin, app):
    created = admin.upsert_member(11, "  Ada Lovelace ")
    assert (created.member_id, created.name, created.balance_cents) == (11, "Ada Lovelace", 0)
    admin.adjust(1_234, "opening", member_id=11)
    renamed = admin.upsert_member(11, "Ada King")
    assert (renamed.name, renamed.balance_cents) == ("Ada King", 1_234)
    bal = app.get_balance(member_id=11)
    assert (bal.name, bal.balance_cents) == ("Ada King", 1_234)
    assert bal.account.member_id == 11


def test_upsert_organisation_normalises_and_updates(server, admin, app):
    org = admin.upsert_organisation(7, "North Shore Bridge Club", bsb="062000", account_number="1234 5678",
                                    minimum_balance_cents=5_000, settlement_fee_bp=150)
    assert (org.organisation_id, org.name, org.bsb, org.account_number) == (7, "North Shore Bridge Club", "062-000",
                                                                             "12345678")
    assert org.minimum_balance_cents == 5_000
    assert org.HasField("settlement_fee_bp") and org.settlement_fee_bp == 150
    again = admin.upsert_organisation(7, "NSBC", bsb="062-001")
    assert (again.name, again.bsb, again.minimum_balance_cents) == ("NSBC", "062-001", 0)
    assert not again.HasField("settlement_fee_bp"), "an unset override means the default fee applies"
    assert app.get_balance(organisation_id=7).name == "NSBC"


# ---------------------------------------------------------------- Pay


def test_pay_member_to_organisation(server, admin, app):
    admin.upsert_organisation(7, "Bridge Club")
    admin.upsert_member(1, "Ann")
    admin.adjust(10_000, "opening credit", member_id=1)
    resp = app.pay(1, 2_500, organisation_id=7, description="Congress entry", payment_type=pb.ENTRY_TO_EVENT,
                   route_code="EVT", route_payload='{"entry": 9}', event_id=44, session_id=5)
    assert resp.status == pb.SUCCEEDED
    assert resp.balance_cents == 7_500
    assert resp.payment_id and resp.reference
    assert app.balance_cents(member_id=1) == 7_500
    assert app.balance_cents(organisation_id=7) == 2_500

    [txn] = booked_transactions(server, resp.payment_id)
    assert (txn.reference, txn.type, txn.principal) == (resp.reference, "ENTRY_TO_EVENT", "app-svc")

    member_lines = app.get_statement(member_id=1).lines
    assert [(ln.amount_cents, ln.balance_after_cents) for ln in member_lines] == [(-2_500, 7_500), (10_000, 10_000)]
    line = member_lines[0]
    assert (line.type, line.type_name, line.description) == (pb.ENTRY_TO_EVENT, "Entry to an event", "Congress entry")
    assert (line.counterparty.organisation_id, line.counterparty.name) == (7, "Bridge Club")
    assert (line.event_id, line.session_id, line.payment_id) == (44, 5, resp.payment_id)
    assert line.reference.startswith(resp.reference)
    assert member_lines[1].counterparty.system_account == "adjustments"

    org_line = app.get_statement(organisation_id=7).lines[0]
    assert (org_line.amount_cents, org_line.counterparty.member_id, org_line.counterparty.name) == (2_500, 1, "Ann")
    assert org_line.reference != line.reference, "every posting has its own reference"

    [event] = events(server, "PAYMENT_SUCCEEDED")
    assert (event.member_id, event.organisation_id, event.amount_cents) == (1, 7, 2_500)
    assert (event.route_code, event.route_payload, event.payment_id) == ("EVT", '{"entry": 9}', resp.payment_id)
    check_invariants(server.db)


def test_pay_member_to_member(server, admin, app):
    admin.adjust(5_000, "opening", member_id=1)
    resp = app.pay(1, 1_999, other_member_id=2, description="lunch", route_code="M2M")
    assert resp.status == pb.SUCCEEDED
    assert (resp.balance_cents, app.balance_cents(member_id=2)) == (3_001, 1_999)
    [received] = events(server, "TRANSFER_RECEIVED")
    assert (received.member_id, received.other_member_id, received.amount_cents) == (2, 1, 1_999)
    assert app.get_statement(member_id=2).lines[0].counterparty.member_id == 1
    check_invariants(server.db)


def test_pay_exact_balance_leaves_zero(server, admin, app):
    admin.upsert_organisation(7, "Club")
    admin.adjust(3_000, "opening", member_id=1)
    assert app.pay(1, 3_000, organisation_id=7).balance_cents == 0
    assert app.balance_cents(member_id=1) == 0
    [low] = events(server, "LOW_BALANCE")
    assert (low.member_id, low.balance_cents) == (1, 0)


def test_pay_ensure_funds_only_books_nothing(server, admin, app):
    admin.upsert_organisation(7, "Club")
    admin.adjust(5_000, "opening", member_id=1)
    before = snapshot(server.db)
    resp = app.pay(1, 4_000, organisation_id=7, ensure_funds_only=True)
    assert resp.status == pb.SUCCEEDED
    assert resp.balance_cents == 5_000
    after = snapshot(server.db)
    assert after.balances == before.balances
    assert (after.transactions, after.postings) == (before.transactions, before.postings)
    assert booked_transactions(server, resp.payment_id) == []


def test_pay_short_books_nothing(server, admin, app):
    admin.upsert_organisation(7, "Club")
    admin.adjust(1_000, "opening", member_id=1)
    before = snapshot(server.db)
    for ensure in (False, True):
        with pytest.raises(grpc.RpcError) as err:
            app.pay(1, 1_001, organisation_id=7, ensure_funds_only=ensure)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "insufficient funds" in err.value.details()
    assert snapshot(server.db) == before


# ---------------------------------------------------------------- balances and statements


def test_get_balance(server, admin, app):
    fresh = app.get_balance(member_id=99)
    assert fresh.balance_cents == 0 and not fresh.HasField("last_movement_at"), "a member exists from first use"
    assert fresh.auto_top_up_status == pb.AUTO_TOP_UP_STATUS_OFF
    admin.adjust(700, "credit", member_id=99)
    moved = app.get_balance(member_id=99)
    assert moved.balance_cents == 700 and moved.HasField("last_movement_at")
    line_time = app.get_statement(member_id=99).lines[0].time
    assert moved.last_movement_at.ToDatetime() - line_time.ToDatetime() < timedelta(seconds=1)
    with pytest.raises(grpc.RpcError) as err:
        app.get_balance(organisation_id=404)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def _history(admin, app, n: int) -> None:  # noqa: ANN001
    admin.upsert_organisation(7, "Club")
    admin.adjust(100_000, "opening", member_id=1)
    for i in range(n):
        app.pay(1, 100 + i, organisation_id=7, description=f"payment {i}")


def test_statement_keyset_pagination(server, admin, app):
    _history(admin, app, 7)
    full = app.get_statement(member_id=1, page_size=500)
    assert len(full.lines) == 8 and full.next_page_token == ""
    assert [ln.amount_cents for ln in full.lines] == [-(100 + i) for i in reversed(range(7))] + [100_000]
    times = [ln.time.ToDatetime() for ln in full.lines]
    assert times == sorted(times, reverse=True), "newest first"
    pages, token = [], ""
    while True:
        page = app.get_statement(member_id=1, page_size=3, page_token=token)
        pages.append([ln.reference for ln in page.lines])
        token = page.next_page_token
        if not token:
            break
    assert [len(p) for p in pages] == [3, 3, 2]
    assert [ref for p in pages for ref in p] == [ln.reference for ln in full.lines]
    # a payment booked while paging does not shift the pages already handed out
    first = app.get_statement(member_id=1, page_size=3)
    app.pay(1, 1, organisation_id=7)
    second = app.get_statement(member_id=1, page_size=3, page_token=first.next_page_token)
    assert [ln.reference for ln in second.lines] == pages[1]
    assert full.closing_balance_cents == full.lines[0].balance_after_cents
    assert full.opening_balance_cents == 0


def test_statement_date_range_to_is_exclusive(server, admin, app):
    _history(admin, app, 5)
    lines = list(reversed(app.get_statement(member_id=1).lines))  # oldest first
    start, end = lines[2].time.ToDatetime(), lines[4].time.ToDatetime()
    st = app.get_statement(member_id=1, start=start, end=end)
    assert [ln.reference for ln in st.lines] == [lines[3].reference, lines[2].reference], "from inclusive, to exclusive"
    assert st.opening_balance_cents == lines[1].balance_after_cents
    assert st.closing_balance_cents == lines[3].balance_after_cents
    later = app.get_statement(member_id=1, start=end + timedelta(days=1))
    assert list(later.lines) == [] and later.opening_balance_cents == later.closing_balance_cents == lines[-1].balance_after_cents
    earlier = app.get_statement(member_id=1, end=start - timedelta(days=1))
    assert list(earlier.lines) == [] and earlier.closing_balance_cents == 0


def test_export_statement_csv(server, admin, app):
    _history(admin, app, 3)
    admin.upsert_organisation(7, 'Club "North", Sydney')  # a name that needs CSV quoting
    data = app.export_statement(member_id=1).decode()
    rows = list(csv.reader(io.StringIO(data)))
    assert rows[0] == ["Date", "Counterparty", "Reference", "Type", "Description", "Amount", "Balance"]
    lines = app.get_statement(member_id=1).lines
    assert len(rows) == 1 + len(lines)
    tz = ZoneInfo("Australia/Sydney")
    for row, line in zip(rows[1:], lines, strict=True):
        local = line.time.ToDatetime().replace(tzinfo=ZoneInfo("UTC")).astimezone(tz)
        assert row[0] == local.strftime("%Y-%m-%d %H:%M:%S")
        assert row[2] == line.reference
        assert row[3] == line.type_name
        assert row[4] == line.description
        assert row[5] == f"{line.amount_cents / 100:.2f}"
        assert row[6] == f"{line.balance_after_cents / 100:.2f}"
    assert rows[1][1] == 'Club "North", Sydney (organisation 7)'
    assert rows[-1][1] == "adjustments" and rows[-1][5] == "1000.00"
    start = lines[1].time.ToDatetime()
    ranged = list(csv.reader(io.StringIO(app.export_statement(member_id=1, start=start).decode())))
    assert [r[2] for r in ranged[1:]] == [lines[0].reference, lines[1].reference]


# ---------------------------------------------------------------- transfers and adjustments


def test_transfer_member_to_member(server, admin, app):
    admin.upsert_member(2, "Bea")
    admin.adjust(300_000, "opening", member_id=1)
    resp = app.transfer(2, 200_000, from_member_id=1, description="at the limit")
    assert (resp.from_balance_cents, resp.to_balance_cents) == (100_000, 200_000)
    assert resp.transfer_id and resp.reference
    [txn] = booked_transactions(server, resp.transfer_id)
    assert txn.type == "MEMBER_TRANSFER"
    line = app.get_statement(member_id=2).lines[0]
    assert (line.type_name, line.amount_cents, line.counterparty.member_id) == ("Member Transfer", 200_000, 1)
    [received] = events(server, "TRANSFER_RECEIVED")
    assert (received.member_id, received.other_member_id, received.amount_cents) == (2, 1, 200_000)
    check_invariants(server.db)


def test_transfer_organisation_to_member_by_admin(server, admin, app):
    admin.upsert_organisation(7, "Club")
    admin.adjust(5_000, "opening", member_id=1)
    app.pay(1, 5_000, organisation_id=7)
    resp = admin.transfer(3, 4_000, from_organisation_id=7, description="prize money")
    assert (resp.from_balance_cents, resp.to_balance_cents) == (1_000, 4_000)
    line = app.get_statement(member_id=3).lines[0]
    assert (line.type_name, line.counterparty.organisation_id) == ("Org Transfer", 7)
    before = snapshot(server.db)
    with pytest.raises(grpc.RpcError) as err:
        admin.transfer(3, 1_001, from_organisation_id=7)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert snapshot(server.db) == before
    assert admin.transfer(3, 1_000, from_organisation_id=7).from_balance_cents == 0
    check_invariants(server.db)


def test_adjust_may_go_negative_and_says_so(server, admin, app):
    admin.upsert_organisation(7, "Club")
    up = admin.adjust(2_000, "goodwill credit", member_id=1)
    assert (up.balance_cents, up.balance_negative) == (2_000, False)
    down = admin.adjust(-2_500, "reverse a double credit", member_id=1)
    assert (down.balance_cents, down.balance_negative) == (-500, True)
    assert app.balance_cents(member_id=1) == -500
    org = admin.adjust(-100, "bank fee", organisation_id=7)
    assert (org.balance_cents, org.balance_negative) == (-100, True)
    [txn] = booked_transactions(server, down.adjustment_id)
    assert (txn.type, txn.principal, txn.description) == ("MANUAL_ADJUSTMENT", "ops", "reverse a double credit")
    assert [e.amount_cents for e in events(server, "ADJUSTED")] == [2_000, -2_500, -100]
    check_invariants(server.db, negative_allowed={member_account(1), organisation_account(7)})
    # a member below zero cannot pay
    with pytest.raises(grpc.RpcError) as err:
        app.pay(1, 1, organisation_id=7)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_postings_carry_their_transaction(server, admin, app):
    admin.adjust(1_000, "opening", member_id=1)
    resp = app.transfer(2, 400, from_member_id=1)
    with server.db.engine.connect() as conn:
        rows = conn.execute(select(postings).join(transactions, transactions.c.id == postings.c.transaction_id)
                            .where(transactions.c.payment_id == resp.transfer_id)).all()
    assert sorted((r.account_id, r.amount_cents) for r in rows) == sorted(
        [(member_account(1), -400), (member_account(2), 400)])
    assert len({r.reference for r in rows}) == 2


def test_padded_text_is_stored_trimmed(server, admin, app):
    """80 characters plus surrounding spaces is within the limit: stored trimmed on every database."""
    admin.upsert_organisation(7, "Club")
    text = "d" * 80
    admin.adjust(5_000, f" {text} ", member_id=1)
    app.pay(1, 100, organisation_id=7, description=f"  {text}  ", route_code=" EVT-ROUTE-CODE16 ")
    app.transfer(2, 100, from_member_id=1, description=f"{text}   ")
    assert [ln.description for ln in app.get_statement(member_id=1).lines] == [text] * 3
    [event] = events(server, "PAYMENT_SUCCEEDED")
    assert event.route_code == "EVT-ROUTE-CODE16"


def long_history(server, admin, lines: int = 6_000) -> None:  # noqa: ANN001
    """Member 1 with $100.00 and a long statement (lines of 1 cent in and out again), booked through the
    ledger's write path directly, many at a time, to keep the test quick."""
    from server.domain.types import PostingType, SystemAccount, system_account
    from server.ledger.ledger import Leg, NewTransaction, post

    admin.upsert_organisation(7, "Club")
    member, counter = member_account(1), system_account(SystemAccount.ADJUSTMENTS)
    admin.adjust(10_000, "opening", member_id=1)
    txns = [NewTransaction(PostingType.MISCELLANEOUS, "an old line of a long statement", "test",
                           [Leg(member, 1 if n % 2 == 0 else -1, counter), Leg(counter, -1 if n % 2 == 0 else 1, member)])
            for n in range(lines)]
    server.db.run(lambda conn: post(conn, txns))


def test_a_slow_export_does_not_hold_up_payments(server, admin, app):
    """A statement export being read slowly keeps its read snapshot, but never blocks a Pay."""
    long_history(server, admin)
    # no BDP probing: the receive window stays small, so the server cannot run ahead of a slow reader
    slow_reader = PaymentsClient(server.target, TOKENS["app"],
                                 channel=grpc.insecure_channel(server.target, options=[("grpc.http2.bdp_probe", 0)]))
    chunks = slow_reader.stream("ExportStatement", pb.ExportStatementRequest(account=pb.AccountRef(member_id=1)), 60)
    first = next(chunks)
    assert first.data.startswith(b"Date,Counterparty,Reference")
    # the export is paused mid-way, its transaction open: a payment still goes through at once
    with server.client("app") as other:
        other.timeout_s = 8
        assert other.pay(1, 100, organisation_id=7).balance_cents == 9_900
    rest = b"".join(chunk.data for chunk in chunks)
    lines = (first.data + rest).decode().splitlines()
    assert len(lines) == 1 + 6_000 + 1, "the export is the snapshot taken when it started"
    slow_reader.close()


def test_cancelled_exports_give_their_connection_back(server, admin):
    import time

    long_history(server, admin)
    pool = server.db.engine.pool
    with grpc.insecure_channel(server.target, options=[("grpc.http2.bdp_probe", 0)]) as channel:
        reader = PaymentsClient(server.target, TOKENS["app"], channel=channel)
        for _ in range(8):
            chunks = reader.stream("ExportStatement", pb.ExportStatementRequest(account=pb.AccountRef(member_id=1)), 60)
            next(chunks)
            chunks.cancel()
    deadline = time.monotonic() + 10
    while pool.checkedout() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert pool.checkedout() == 0, "every cancelled export closed its database connection"
    with server.client("app") as app:
        assert app.pay(1, 100, organisation_id=7).balance_cents == 9_900
