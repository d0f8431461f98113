"""Administrators' RPCs over gRPC: who may call them, summaries, lists, organisation summaries, and
organisation → member transfers."""

from __future__ import annotations

from datetime import timedelta

import grpc
import pytest

from cobalt.payments.v1 import payments_pb2 as pb
from server.domain.types import AutoTopUpStatus, PostingType, SystemAccount, member_account, system_account
from server.ledger.db import utcnow
from server.ledger.ledger import Leg, NewTransaction, book
from server.ledger.schema import member_cards, postings

ADMIN_ONLY = [
    ("Settle", pb.SettleRequest(idempotency_key="k1", dry_run=True)),
    ("Settle", pb.SettleRequest(idempotency_key="k2")),
    ("SetFeeSettings", pb.SetFeeSettingsRequest(idempotency_key="k3", settlement_fee_bp=100)),
    ("GetFeeSettings", pb.GetFeeSettingsRequest()),
    ("GetAdminSummary", pb.GetAdminSummaryRequest()),
    ("ListBalances", pb.ListBalancesRequest()),
    ("ListOrganisations", pb.ListOrganisationsRequest()),
    ("GetOrganisationSummary", pb.GetOrganisationSummaryRequest(organisation_id=7)),
    ("Adjust", pb.AdjustRequest(idempotency_key="k4", account=pb.AccountRef(member_id=1), amount_cents=100,
                                description="x")),
    ("UpsertOrganisation", pb.UpsertOrganisationRequest(idempotency_key="k5", organisation_id=7, name="X")),
    ("UpsertMember", pb.UpsertMemberRequest(idempotency_key="k6", member_id=1, name="X")),
]


@pytest.mark.parametrize(("method", "request_msg"), ADMIN_ONLY, ids=[f"{m}-{i}" for i, (m, _) in enumerate(ADMIN_ONLY)])
def test_app_role_is_refused(server, app, admin, method, request_msg):
    admin.upsert_organisation(7, "Club")
    admin.adjust(5_000, "credit", organisation_id=7)
    before = admin.list_balances(include_zero=True)
    with pytest.raises(grpc.RpcError) as err:
        app.call(method, request_msg)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert method in err.value.details()
    assert admin.list_balances(include_zero=True) == before
    assert admin.get_fee_settings().current.version == 0


def test_no_token_is_unauthenticated(server):
    from clients.payments_client import PaymentsClient

    with PaymentsClient(server.target, "not-a-token") as c:
        with pytest.raises(grpc.RpcError) as err:
            c.admin_summary()
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_org_to_member_transfer_beyond_the_org_balance(server, app, admin):
    admin.upsert_organisation(7, "Club")
    admin.adjust(10_000, "credit", member_id=1)
    app.pay(1, 3_000, organisation_id=7, description="Entry")
    with pytest.raises(grpc.RpcError) as err:
        admin.transfer(2, 3_001, from_organisation_id=7, description="prize")
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert admin.balance_cents(organisation_id=7) == 3_000
    assert admin.balance_cents(member_id=2) == 0
    with pytest.raises(grpc.RpcError) as err:  # the app role never moves an organisation's money
        app.transfer(2, 100, from_organisation_id=7, description="prize")
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    done = admin.transfer(2, 3_000, from_organisation_id=7, description="prize")
    assert (done.from_balance_cents, done.to_balance_cents) == (0, 3_000)


def _book_card_money(db, member_id: int, cents: int, *, days_ago: int = 0) -> None:  # noqa: ANN001
    """Card money arrives as the card paths book it: out of `stripe`, into the member."""
    stripe, member = system_account(SystemAccount.STRIPE), member_account(member_id)

    def work(conn):  # noqa: ANN001, ANN202
        booked = book(conn, NewTransaction(PostingType.MANUAL_TOP_UP, "Top up", "test", [
            Leg(stripe, -cents, member), Leg(member, cents, stripe)]))
        if days_ago:  # history made up for the test: past the append-only trigger, as a restore would
            conn.exec_driver_sql("SET LOCAL session_replication_role = replica")
            conn.execute(postings.update().where(postings.c.transaction_id == booked.transaction_id)
                         .values(created_at=utcnow() - timedelta(days=days_ago)))

    db.run(work)


def _book_card_refund(db, member_id: int, cents: int, fee_cents: int) -> None:  # noqa: ANN001
    """A refund as the refund path books it: member −amount, `stripe` +(amount − fee), `federation` +fee."""
    stripe, member = system_account(SystemAccount.STRIPE), member_account(member_id)
    federation = system_account(SystemAccount.FEDERATION)
    db.run(lambda conn: book(conn, NewTransaction(PostingType.CARD_REFUND, "Refund", "test", [
        Leg(member, -cents, stripe), Leg(stripe, cents - fee_cents, member), Leg(federation, fee_cents, member)])))


def test_admin_summary(server, app, admin):
    admin.upsert_organisation(7, "Club")
    admin.upsert_organisation(8, "Other club")
    admin.adjust(10_000, "credit", member_id=1)
    admin.adjust(2_500, "credit", member_id=2)
    _book_card_money(server.db, 3, 5_000)
    _book_card_money(server.db, 5, 7_000, days_ago=31)  # outside the 30 days
    _book_card_refund(server.db, 5, 1_000, 30)
    app.pay(1, 4_000, organisation_id=7, description="Entry")
    admin.adjust(-300, "correction", member_id=4)  # administrators may take a balance negative
    with server.db.engine.begin() as conn:
        conn.execute(member_cards.insert(), [
            {"member_id": 1, "auto_top_up_status": int(AutoTopUpStatus.ON), "updated_at": utcnow()},
            {"member_id": 2, "auto_top_up_status": int(AutoTopUpStatus.OFF), "updated_at": utcnow()},
        ])
    s = admin.admin_summary()
    assert s.members_with_balance == 5  # 1 to 5 (a negative balance counts: it is not zero)
    assert s.member_balances_cents == 6_000 + 2_500 + 5_000 - 300 + 6_000
    assert (s.organisations_with_balance, s.organisation_balances_cents) == (1, 4_000)
    assert s.net_liability_cents == s.member_balances_cents + s.organisation_balances_cents
    assert s.members_with_auto_top_up == 1
    assert s.card_money_in_30d_cents == 5_000
    assert s.card_refunds_30d_cents == 970
    assert s.ledger_sum_cents == 0
    system = {b.account: b.balance_cents for b in s.system_balances}
    assert set(system) == {"stripe", "federation", "bank", "adjustments"}
    assert system["stripe"] == -5_000 - 7_000 + 970
    assert system["federation"] == 30
    assert system["adjustments"] == -(10_000 + 2_500 - 300)
    assert sum(system.values()) + s.net_liability_cents == 0


def test_list_balances_pages_and_totals(server, admin):
    for m in range(1, 8):
        admin.adjust(m * 100, "credit", member_id=m)
    admin.upsert_member(8, "Zero Balance")
    admin.upsert_organisation(3, "Club")
    admin.adjust(1_000, "credit", organisation_id=3)
    rows, token, pages = [], "", 0
    while True:
        page = admin.list_balances(page_size=3, page_token=token)
        assert page.total_cents == 2_800 + 1_000 and page.count == 8
        rows.extend(page.rows)
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert pages == 3
    assert [(r.kind, r.id) for r in rows] == [(pb.MEMBER, m) for m in range(1, 8)] + [(pb.ORGANISATION, 3)]
    assert [r.balance_cents for r in rows] == [m * 100 for m in range(1, 8)] + [1_000]
    assert rows[-1].name == "Club"
    members = admin.list_balances(pb.MEMBER, include_zero=True)
    assert members.count == 8 and [r.id for r in members.rows][-1] == 8 and members.rows[-1].name == "Zero Balance"
    system = admin.list_balances(pb.SYSTEM)
    assert {r.system_account for r in system.rows} >= {"adjustments"}
    assert system.total_cents == -3_800
    assert list(admin.iter_balances(page_size=2)) == rows
    with pytest.raises(grpc.RpcError) as err:
        admin.list_balances(page_token="garbage")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        admin.list_balances(page_size=5_000)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_list_organisations(server, admin):
    for org_id in (5, 2, 9):
        admin.upsert_organisation(org_id, f"Club {org_id}", bsb="062000", account_number="1234 5678",
                                  minimum_balance_cents=org_id * 100, settlement_fee_bp=150 if org_id == 9 else None)
    page = admin.list_organisations(page_size=2)
    assert [o.organisation_id for o in page.organisations] == [2, 5] and page.next_page_token
    rest = admin.list_organisations(page_size=2, page_token=page.next_page_token)
    assert [o.organisation_id for o in rest.organisations] == [9] and not rest.next_page_token
    nine = rest.organisations[0]
    assert (nine.name, nine.bsb, nine.account_number, nine.minimum_balance_cents) == ("Club 9", "062-000", "12345678",
                                                                                     900)
    assert nine.HasField("settlement_fee_bp") and nine.settlement_fee_bp == 150
    assert not page.organisations[0].HasField("settlement_fee_bp")
    only = admin.list_organisations([9, 42])
    assert [o.organisation_id for o in only.organisations] == [9]


def test_upsert_organisation_validation(server, admin):
    for kwargs, field in [({"bsb": "12-345"}, "bsb"), ({"account_number": "12"}, "account_number"),
                          ({"minimum_balance_cents": -1}, "minimum_balance_cents"),
                          ({"settlement_fee_bp": 10_001}, "settlement_fee_bp")]:
        with pytest.raises(grpc.RpcError) as err:
            admin.upsert_organisation(4, "Club", **kwargs)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in err.value.details()
    assert list(admin.list_organisations().organisations) == []
    org = admin.upsert_organisation(4, "Club", settlement_fee_bp=300)
    assert org.settlement_fee_bp == 300
    org = admin.upsert_organisation(4, "Club renamed")  # no override: the default applies again
    assert not org.HasField("settlement_fee_bp") and org.name == "Club renamed"


def test_organisation_summary(server, app, admin):
    admin.upsert_organisation(7, "Club", bsb="062-000", account_number="12345678")
    admin.adjust(50_000, "credit", member_id=1)
    app.pay(1, 2_000, organisation_id=7, description="Entry", payment_type=pb.ENTRY_TO_EVENT)
    app.pay(1, 3_000, organisation_id=7, description="Entry", payment_type=pb.ENTRY_TO_EVENT)
    middle = utcnow()
    app.pay(1, 1_500, organisation_id=7, description="Sub", payment_type=pb.CLUB_MEMBERSHIP)
    admin.transfer(2, 500, from_organisation_id=7, description="prize")
    admin.settle([7])
    whole = admin.organisation_summary(7)
    totals = {t.type: t for t in whole.totals}
    assert set(totals) == {pb.ENTRY_TO_EVENT, pb.CLUB_MEMBERSHIP, pb.ORG_TRANSFER, pb.SETTLEMENT}
    entry = totals[pb.ENTRY_TO_EVENT]
    assert (entry.amount_cents, entry.count, entry.in_cents, entry.out_cents, entry.type_name) == (
        5_000, 2, 5_000, 0, "Entry to an event")
    assert (totals[pb.ORG_TRANSFER].amount_cents, totals[pb.ORG_TRANSFER].out_cents) == (-500, 500)
    assert totals[pb.SETTLEMENT].amount_cents == -6_000
    assert (whole.opening_balance_cents, whole.closing_balance_cents, whole.name) == (0, 0, "Club")
    later = admin.organisation_summary(7, start=middle, end=utcnow() + timedelta(seconds=1))
    assert later.opening_balance_cents == 5_000
    assert {t.type for t in later.totals} == {pb.CLUB_MEMBERSHIP, pb.ORG_TRANSFER, pb.SETTLEMENT}
    assert later.opening_balance_cents + sum(t.amount_cents for t in later.totals) == later.closing_balance_cents
    early = admin.organisation_summary(7, end=middle)
    assert early.closing_balance_cents == 5_000 and [t.type for t in early.totals] == [pb.ENTRY_TO_EVENT]
    with pytest.raises(grpc.RpcError) as err:
        admin.organisation_summary(99)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        admin.organisation_summary(7, start=middle, end=middle - timedelta(days=1))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    future = utcnow() + timedelta(days=1)
    empty = admin.organisation_summary(7, start=future, end=future + timedelta(days=1))
    assert list(empty.totals) == [] and empty.opening_balance_cents == empty.closing_balance_cents == 0


def test_list_balances_later_pages_keep_the_first_pages_totals(server, admin, app):
    for member_id in range(1, 8):
        admin.adjust(member_id * 100, "credit", member_id=member_id)
    first = admin.list_balances(pb.MEMBER, page_size=3)
    assert (first.count, first.total_cents) == (7, 2_800)
    admin.adjust(5_000, "credit", member_id=99)  # arrives while the listing is paged through
    second = admin.list_balances(pb.MEMBER, page_size=3, page_token=first.next_page_token)
    assert (second.count, second.total_cents) == (7, 2_800)  # as the first page found them
    third = admin.list_balances(pb.MEMBER, page_size=3, page_token=second.next_page_token)
    assert [r.id for r in [*first.rows, *second.rows, *third.rows]] == [1, 2, 3, 4, 5, 6, 7, 99]
    assert admin.list_balances(pb.MEMBER).count == 8
    # a bare id (a token of before) still pages, adding the totals up afresh
    bare = admin.list_balances(pb.MEMBER, page_size=3, page_token=first.next_page_token.split(".")[0])
    assert [r.id for r in bare.rows] == [4, 5, 6] and bare.count == 8
    for bad in ("1.2", "--5", "1.2.x", "1..2", "9" * 25):
        with pytest.raises(grpc.RpcError) as exc:
            admin.list_balances(page_token=bad)
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad


def test_organisation_summary_joins_day_totals_and_part_days(server, app, admin):
    """Whole UTC days come from the day totals the write path keeps, the part-days at either end
    from the postings: any range adds up to what the postings say, and the totals match them."""
    from ledger_invariants import check_invariants

    admin.upsert_organisation(7, "Club")
    admin.adjust(50_000, "credit", member_id=1)
    for cents in (100, 250, 400):
        app.pay(1, cents, organisation_id=7, description="Entry")
    admin.adjust(-30, "bank fee", organisation_id=7)
    now = utcnow()
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    ranges = [(None, None), (midnight - timedelta(days=3), None), (None, now + timedelta(hours=1)),
              (midnight - timedelta(days=2, hours=5), now + timedelta(days=1, hours=2)),
              (midnight + timedelta(seconds=1), now + timedelta(seconds=1)),
              (midnight - timedelta(days=1), midnight + timedelta(days=1))]
    for start, end in ranges:
        s = admin.organisation_summary(7, start=start, end=end)
        by_type = {t.type_name: (t.amount_cents, t.count, t.in_cents, t.out_cents) for t in s.totals}
        assert by_type == {"Miscellaneous": (750, 3, 750, 0), "Manual Adjustment": (-30, 1, 0, 30)}, (start, end)
        assert s.closing_balance_cents - s.opening_balance_cents == 720
    check_invariants(server.db)
