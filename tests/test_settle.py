"""Settle through gRPC on PostgreSQL: dry run, real run, idempotency, re-checks under
concurrency, and what it leaves in the ledger, the settlements table and the outbox."""

from __future__ import annotations

import random
import threading
from collections import defaultdict

import grpc
import pytest
from sqlalchemy import func, select

from cobalt.payments.v1 import payments_pb2 as pb
from server.domain.money import settlement_for
from server.domain.types import SystemAccount, organisation_account, system_account
from server.ledger.schema import accounts, outbox_events, postings, settlements, transactions

FEDERATION = system_account(SystemAccount.FEDERATION)
BANK = system_account(SystemAccount.BANK)


def ledger_checks(db) -> dict[int, int]:  # noqa: ANN001
    """Every transaction sums to zero, every balance is the sum of its postings, the whole ledger
    sums to zero. Returns the balances."""
    with db.engine.connect() as conn:
        balances = dict(conn.execute(select(accounts.c.id, accounts.c.balance_cents)).all())
        per_txn = conn.execute(
            select(postings.c.transaction_id, func.sum(postings.c.amount_cents)).group_by(postings.c.transaction_id)
        ).all()
        per_acct = dict(
            conn.execute(select(postings.c.account_id, func.sum(postings.c.amount_cents)).group_by(postings.c.account_id))
            .all()
        )
    assert sum(balances.values()) == 0
    assert all(total == 0 for _, total in per_txn)
    for acct, balance in balances.items():
        assert balance == per_acct.get(acct, 0), acct
    return balances


def fund_org(admin, app, org_id: int, cents: int, member_id: int = 1) -> None:  # noqa: ANN001
    """Money reaches the club the usual way: a member pays it."""
    admin.adjust(cents, "credit for a test", member_id=member_id)
    app.pay(member_id, cents, organisation_id=org_id, description="Entry", route_code="EVT")


def setup_clubs(admin, app) -> None:  # noqa: ANN001
    admin.upsert_organisation(10, "North Shore BC", bsb="062-000", account_number="12345678")
    admin.upsert_organisation(11, "Harbour BC", bsb="123456", account_number="87654321",
                              minimum_balance_cents=20_000, settlement_fee_bp=225)
    admin.upsert_organisation(12, "Quiet BC", bsb="111-111", account_number="11111111")
    admin.upsert_organisation(13, "Small BC", bsb="222-222", account_number="22222222", minimum_balance_cents=5_000)
    fund_org(admin, app, 10, 12_345)          # $123.45 at the default 2 %
    fund_org(admin, app, 11, 32_345)          # $323.45 less $200.00 minimum at 2.25 %
    fund_org(admin, app, 13, 4_000)           # below its minimum: not eligible


def test_dry_run_then_real_run(server, app, admin):
    setup_clubs(admin, app)
    before = ledger_checks(server.db)

    dry = admin.settle(dry_run=True)
    assert dry.dry_run and dry.batch_id == ""
    assert [r.organisation_id for r in dry.rows] == [10, 11]
    r10, r11 = dry.rows
    assert (r10.name, r10.bsb, r10.account_number) == ("North Shore BC", "062-000", "12345678")
    assert (r10.balance_cents, r10.minimum_balance_cents, r10.gross_cents, r10.fee_bp, r10.fee_cents, r10.gst_cents,
            r10.net_cents) == (12_345, 0, 12_345, 200, 247, 22, 12_098)
    assert (r11.bsb, r11.balance_cents, r11.minimum_balance_cents, r11.gross_cents, r11.fee_bp, r11.fee_cents,
            r11.gst_cents, r11.net_cents) == ("123-456", 32_345, 20_000, 12_345, 225, 278, 25, 12_067)
    assert (dry.total_gross_cents, dry.total_fee_cents, dry.total_gst_cents, dry.total_net_cents) == (
        24_690, 525, 47, 24_165)
    assert dry.default_fee_bp == 200 and dry.fee_settings_version == 0
    # the dry run booked nothing
    assert ledger_checks(server.db) == before
    with server.db.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(settlements)).scalar_one() == 0

    real = admin.settle(expected_balances={r.organisation_id: r.balance_cents for r in dry.rows})
    assert not real.dry_run and real.batch_id.startswith("stl_")
    assert [(r.organisation_id, r.gross_cents, r.fee_cents, r.gst_cents, r.net_cents) for r in real.rows] == [
        (r.organisation_id, r.gross_cents, r.fee_cents, r.gst_cents, r.net_cents) for r in dry.rows]
    assert not any(r.balance_changed for r in real.rows)
    assert all(r.reference.startswith("SET-") for r in real.rows)

    after = ledger_checks(server.db)
    assert after[organisation_account(10)] == 0
    assert after[organisation_account(11)] == 20_000
    assert after[organisation_account(13)] == 4_000
    assert after[FEDERATION] - before.get(FEDERATION, 0) == 525
    assert after[BANK] - before.get(BANK, 0) == 24_165
    assert app.balance_cents(organisation_id=11) == 20_000

    # the club's statement shows one Settlement line of −gross, ending at its minimum
    line = app.get_statement(organisation_id=11).lines[0]
    assert (line.type, line.amount_cents, line.balance_after_cents) == (pb.SETTLEMENT, -12_345, 20_000)
    assert line.type_name == "Settlement"

    with server.db.engine.connect() as conn:
        rows = conn.execute(select(settlements).order_by(settlements.c.organisation_id)).all()
        events = conn.execute(select(outbox_events).where(outbox_events.c.kind == "SETTLEMENT_MADE")
                              .order_by(outbox_events.c.organisation_id)).all()
        legs = conn.execute(select(postings.c.account_id, postings.c.amount_cents)
                            .join(transactions, transactions.c.id == postings.c.transaction_id)
                            .where(transactions.c.batch_id == real.batch_id)).all()
    assert [(s.organisation_id, s.batch_id, s.gross_cents, s.fee_cents, s.net_cents, s.fee_bp) for s in rows] == [
        (10, real.batch_id, 12_345, 247, 12_098, 200), (11, real.batch_id, 12_345, 278, 12_067, 225)]
    assert [(e.organisation_id, e.amount_cents, e.payment_id) for e in events] == [
        (10, 12_345, real.batch_id), (11, 12_345, real.batch_id)]
    by_acct: dict[int, int] = defaultdict(int)
    for acct, cents in legs:
        by_acct[acct] += cents
    assert dict(by_acct) == {organisation_account(10): -12_345, organisation_account(11): -12_345,
                             FEDERATION: 525, BANK: 24_165}

    # settling the same organisations again settles nothing
    again = admin.settle([10, 11])
    assert list(again.rows) == [] and again.batch_id == ""
    assert sorted(again.skipped_organisation_ids) == [10, 11]
    assert ledger_checks(server.db) == after


def test_idempotent_real_run(server, app, admin):
    setup_clubs(admin, app)
    first, call = admin.call("Settle", pb.SettleRequest(idempotency_key="settle-1", organisation_ids=[10]),
                             with_call=True)
    assert [r.organisation_id for r in first.rows] == [10]
    balances = ledger_checks(server.db)
    fund_org(admin, app, 10, 1_000, member_id=2)  # more money arrives; a retry must still book nothing
    replay, call = admin.call("Settle", pb.SettleRequest(idempotency_key="settle-1", organisation_ids=[10]),
                              with_call=True)
    assert replay == first
    assert ("idempotent-replay", "true") in tuple(call.trailing_metadata())
    assert app.balance_cents(organisation_id=10) == 1_000
    assert ledger_checks(server.db)[BANK] == balances[BANK]
    with pytest.raises(grpc.RpcError) as err:
        admin.call("Settle", pb.SettleRequest(idempotency_key="settle-1", organisation_ids=[11]))
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS


def test_money_arriving_after_the_dry_run(server, app, admin):
    setup_clubs(admin, app)
    dry = admin.settle([10, 11], dry_run=True)
    fund_org(admin, app, 10, 655, member_id=3)  # $6.55 more for North Shore after the dry run
    real = admin.settle([10, 11], expected_balances={r.organisation_id: r.balance_cents for r in dry.rows})
    r10, r11 = real.rows
    assert r10.balance_changed and r10.expected_balance_cents == 12_345
    assert (r10.balance_cents, r10.gross_cents, r10.fee_cents, r10.net_cents) == (13_000, 13_000, 260, 12_740)
    assert not r11.balance_changed and r11.expected_balance_cents == 32_345
    assert app.balance_cents(organisation_id=10) == 0
    ledger_checks(server.db)


def test_selected_unknown_and_ineligible(server, app, admin):
    setup_clubs(admin, app)
    before = ledger_checks(server.db)
    with pytest.raises(grpc.RpcError) as err:
        admin.settle([10, 99])
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "99" in err.value.details()
    assert ledger_checks(server.db) == before  # a failed request changes nothing
    res = admin.settle([13, 12, 11])
    assert [r.organisation_id for r in res.rows] == [11]
    assert sorted(res.skipped_organisation_ids) == [12, 13]
    assert app.balance_cents(organisation_id=10) == 12_345  # not asked for: untouched
    for bad in ([0], [-3]):
        with pytest.raises(grpc.RpcError) as err:
            admin.settle(bad)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        admin.call("Settle", pb.SettleRequest(organisation_ids=[10]))  # a real run needs a key
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_negative_and_zero_balances_are_not_settled(server, app, admin):
    admin.upsert_organisation(20, "In the red", bsb="333-333", account_number="3333")
    admin.upsert_organisation(21, "Empty")
    admin.adjust(-5_000, "correction", organisation_id=20)
    res = admin.settle(dry_run=True)
    assert list(res.rows) == []
    res = admin.settle([20, 21])
    assert list(res.rows) == [] and sorted(res.skipped_organisation_ids) == [20, 21]
    assert app.balance_cents(organisation_id=20) == -5_000


def test_fee_settings_apply_and_are_recorded(server, app, admin):
    setup_clubs(admin, app)
    fees = admin.set_fee_settings(settlement_fee_bp=250)
    res = admin.settle()
    assert res.fee_settings_version == fees.version and res.default_fee_bp == 250
    by_org = {r.organisation_id: r for r in res.rows}
    assert (by_org[10].fee_bp, by_org[10].fee_cents) == (250, 309)  # 308.625 -> 309
    assert by_org[11].fee_bp == 225  # the override wins
    with server.db.engine.connect() as conn:
        versions = set(conn.execute(select(settlements.c.fee_settings_version)).scalars())
    assert versions == {fees.version}


def test_concurrent_payments_during_settlement(server, app, admin):
    """Members pay into a club, and the club pays prizes out, while two administrators settle it
    again and again: every cent is either settled once, paid out, or still on the club's balance."""
    admin.upsert_organisation(30, "Busy BC", bsb="444-444", account_number="44444444", minimum_balance_cents=1_000)
    payers, pays_each, amount, prize = 4, 15, 700, 300
    for m in range(1, payers + 1):
        admin.adjust(pays_each * amount, "credit", member_id=100 + m)
    errors: list[BaseException] = []
    settled: list[pb.SettleResponse] = []
    prizes_paid: list[int] = []
    payers_done = threading.Event()

    def pay(member_id: int) -> None:
        try:
            with server.client("app") as c:
                for _ in range(pays_each):
                    c.pay(member_id, amount, organisation_id=30, description="Session")
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    def settle_until_done() -> None:
        try:
            with server.client("admin") as c:
                while not payers_done.is_set():
                    settled.append(c.settle([30]))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    def pay_prizes() -> None:
        try:
            with server.client("admin") as c:
                while not payers_done.is_set():
                    try:
                        c.transfer(200, prize, from_organisation_id=30, description="prize")
                        prizes_paid.append(prize)
                    except grpc.RpcError as exc:  # the club had too little just then
                        assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION, exc
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    payer_threads = [threading.Thread(target=pay, args=(100 + m,)) for m in range(1, payers + 1)]
    others = [threading.Thread(target=settle_until_done) for _ in range(2)] + [threading.Thread(target=pay_prizes)]
    for t in payer_threads + others:
        t.start()
    for t in payer_threads:
        t.join()
    payers_done.set()
    for t in others:
        t.join()
    assert not errors, errors
    settled.append(admin.settle([30]))  # whatever is left above the minimum
    settled_gross = sum(res.total_gross_cents for res in settled)
    paid_in = payers * pays_each * amount
    club = app.balance_cents(organisation_id=30)
    assert club == paid_in - sum(prizes_paid) - settled_gross
    assert club <= 1_000  # the last run left at most the minimum
    assert app.balance_cents(member_id=200) == sum(prizes_paid)
    assert sum(bool(res.rows) for res in settled) >= 1
    balances = ledger_checks(server.db)
    assert balances[BANK] + balances[FEDERATION] == settled_gross
    with server.db.engine.connect() as conn:
        rows = conn.execute(select(settlements.c.gross_cents, settlements.c.balance_cents)).all()
        settle_postings = conn.execute(
            select(postings.c.balance_after_cents).where(postings.c.account_id == organisation_account(30),
                                                         postings.c.type == "SETTLEMENT")).scalars().all()
    assert sum(g for g, _ in rows) == settled_gross
    assert all(balance - gross == 1_000 for gross, balance in rows)  # each settled its balance at booking
    assert settle_postings and all(after == 1_000 for after in settle_postings)


def test_random_clubs_match_the_maths(server, admin):
    """Many clubs with random balances, minimums and overrides: every row is what the settlement
    maths says, and every club ends at its minimum or where it was."""
    rnd = random.Random(20261126)
    default_bp = rnd.choice([150, 200, 225])
    admin.set_fee_settings(settlement_fee_bp=default_bp)
    expected, balances = {}, {}
    for org_id in range(40, 60):
        minimum = rnd.choice([0, 0, 5_000, 20_000])
        override = rnd.choice([None, None, 0, 175, 225, 333, 10_000])
        admin.upsert_organisation(org_id, f"Club {org_id}", bsb="062-000", account_number="1234567",
                                  minimum_balance_cents=minimum, settlement_fee_bp=override)
        balance = rnd.choice([0, -rnd.randint(1, 5_000), rnd.randint(1, 60_000), rnd.randint(1, 60_000)])
        if balance:
            admin.adjust(balance, "opening balance", organisation_id=org_id)
        balances[org_id] = balance
        due = settlement_for(balance, minimum, override if override is not None else default_bp)
        if due is not None:
            expected[org_id] = (minimum, due)
    assert expected, "the seed gives some clubs something to settle"
    res = admin.settle()
    got = {r.organisation_id: (r.gross_cents, r.fee_bp, r.fee_cents, r.gst_cents, r.net_cents) for r in res.rows}
    assert got == {org_id: (d.gross_cents, d.fee_bp, d.fee_cents, d.gst_cents, d.net_cents)
                   for org_id, (_, d) in expected.items()}
    assert res.total_fee_cents + res.total_net_cents == res.total_gross_cents
    after = ledger_checks(server.db)
    for org_id, balance in balances.items():
        want = expected[org_id][0] if org_id in expected else balance
        assert after.get(organisation_account(org_id), 0) == want
