"""Bad input for every balance-path RPC: the right status code, a field violation naming the bad
field, and not one balance, posting, event or idempotency record changed."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from ledger_invariants import bad_fields, check_invariants, snapshot

from cobalt.payments.v1 import payments_pb2 as pb
from cobalt.payments.v1 import payments_pb2_grpc as pb_grpc
from server.domain.money import MAX_AMOUNT_CENTS, TRANSFER_LIMIT_CENTS

INVALID = grpc.StatusCode.INVALID_ARGUMENT
LONG_TEXT = "x" * 81
ORG, RICH, POOR = 7, 1, 2  # a registered organisation; a member with $100.00; a member with $5.00


def key() -> str:
    return uuid.uuid4().hex


def pay(**fields) -> pb.PayRequest:  # noqa: ANN003
    base = dict(idempotency_key=key(), member_id=RICH, organisation_id=ORG, amount_cents=100, description="entry")
    base.update(fields)
    return pb.PayRequest(**{k: v for k, v in base.items() if v is not None})


def transfer(frm: pb.AccountRef | None = None, **fields) -> pb.TransferRequest:  # noqa: ANN003
    base = dict(idempotency_key=key(), to_member_id=3, amount_cents=100, description="share")
    base.update(fields)
    req = pb.TransferRequest(**base)
    if frm is not None:
        getattr(req, "from").CopyFrom(frm)
    return req


def member(member_id: int) -> pb.AccountRef:
    return pb.AccountRef(member_id=member_id)


def org(organisation_id: int) -> pb.AccountRef:
    return pb.AccountRef(organisation_id=organisation_id)


def adjust(**fields) -> pb.AdjustRequest:  # noqa: ANN003
    base = dict(idempotency_key=key(), account=member(RICH), amount_cents=100, description="correction")
    base.update(fields)
    return pb.AdjustRequest(**base)


def upsert_org(**fields) -> pb.UpsertOrganisationRequest:  # noqa: ANN003
    base = dict(idempotency_key=key(), organisation_id=8, name="New Club")
    base.update(fields)
    return pb.UpsertOrganisationRequest(**base)


def statement(**fields) -> pb.GetStatementRequest:  # noqa: ANN003
    base = dict(account=member(RICH))
    base.update(fields)
    return pb.GetStatementRequest(**base)


NOW = datetime.now(UTC)


def ranged(req, start: datetime, end: datetime):  # noqa: ANN001, ANN201
    getattr(req, "from").FromDatetime(start)
    req.to.FromDatetime(end)
    return req


@dataclass(frozen=True)
class Case:
    id: str
    method: str
    request: Callable[[], object]
    code: grpc.StatusCode
    field: str | None = None  # the BadRequest field violation expected
    role: str = "app"


CASES = [
    # ---- Pay
    Case("pay-zero", "Pay", lambda: pay(amount_cents=0), INVALID, "amount_cents"),
    Case("pay-negative", "Pay", lambda: pay(amount_cents=-100), INVALID, "amount_cents"),
    Case("pay-over-limit", "Pay", lambda: pay(amount_cents=MAX_AMOUNT_CENTS + 1), INVALID, "amount_cents"),
    Case("pay-no-payee", "Pay", lambda: pay(organisation_id=None), INVALID, "payee"),
    Case("pay-no-member", "Pay", lambda: pay(member_id=0), INVALID, "member_id"),
    Case("pay-huge-member-id", "Pay", lambda: pay(member_id=2**62), INVALID, "member_id"),
    Case("pay-to-member-over-transfer-limit", "Pay",
         lambda: pay(organisation_id=None, other_member_id=POOR, amount_cents=TRANSFER_LIMIT_CENTS + 1),
         INVALID, "amount_cents"),
    Case("pay-self", "Pay", lambda: pay(organisation_id=None, other_member_id=RICH), INVALID, "other_member_id"),
    Case("pay-unknown-org", "Pay", lambda: pay(organisation_id=404), grpc.StatusCode.NOT_FOUND),
    Case("pay-unknown-org-short", "Pay", lambda: pay(member_id=POOR, organisation_id=404, amount_cents=9_999),
         grpc.StatusCode.NOT_FOUND),
    Case("pay-unknown-org-ensure", "Pay", lambda: pay(organisation_id=404, ensure_funds_only=True),
         grpc.StatusCode.NOT_FOUND),
    Case("pay-description-long", "Pay", lambda: pay(description=LONG_TEXT), INVALID, "description"),
    Case("pay-description-control", "Pay", lambda: pay(description="a\x00b"), INVALID, "description"),
    Case("pay-route-code-long", "Pay", lambda: pay(route_code="R" * 17), INVALID, "route_code"),
    Case("pay-route-payload-long", "Pay", lambda: pay(route_payload="p" * 1025), INVALID, "route_payload"),
    Case("pay-bad-type", "Pay", lambda: pay(payment_type=99), INVALID, "payment_type"),
    Case("pay-no-key", "Pay", lambda: pay(idempotency_key=""), INVALID, "idempotency_key"),
    Case("pay-key-too-long", "Pay", lambda: pay(idempotency_key="k" * 256), INVALID, "idempotency_key"),
    Case("pay-short", "Pay", lambda: pay(member_id=POOR, amount_cents=501), grpc.StatusCode.FAILED_PRECONDITION),
    Case("pay-to-member-short", "Pay", lambda: pay(member_id=POOR, organisation_id=None, other_member_id=RICH,
                                                   amount_cents=501), grpc.StatusCode.FAILED_PRECONDITION),
    Case("pay-as-bridge", "Pay", lambda: pay(), grpc.StatusCode.PERMISSION_DENIED, role="bridge"),
    # ---- Transfer
    Case("transfer-zero", "Transfer", lambda: transfer(member(RICH), amount_cents=0), INVALID, "amount_cents"),
    Case("transfer-negative", "Transfer", lambda: transfer(member(RICH), amount_cents=-1), INVALID, "amount_cents"),
    Case("transfer-over-limit", "Transfer", lambda: transfer(member(RICH), amount_cents=TRANSFER_LIMIT_CENTS + 1),
         INVALID, "amount_cents"),
    Case("transfer-to-self", "Transfer", lambda: transfer(member(RICH), to_member_id=RICH), INVALID, "to_member_id"),
    Case("transfer-no-from", "Transfer", lambda: transfer(None), INVALID, "from"),
    Case("transfer-no-to", "Transfer", lambda: transfer(member(RICH), to_member_id=0), INVALID, "to_member_id"),
    Case("transfer-description-long", "Transfer", lambda: transfer(member(RICH), description=LONG_TEXT), INVALID,
         "description"),
    Case("transfer-no-key", "Transfer", lambda: transfer(member(RICH), idempotency_key=""), INVALID,
         "idempotency_key"),
    Case("transfer-short", "Transfer", lambda: transfer(member(POOR), amount_cents=501),
         grpc.StatusCode.FAILED_PRECONDITION),
    Case("transfer-from-org-by-app", "Transfer", lambda: transfer(org(ORG)), grpc.StatusCode.PERMISSION_DENIED),
    Case("transfer-from-unknown-org", "Transfer", lambda: transfer(org(404)), grpc.StatusCode.NOT_FOUND, role="admin"),
    Case("transfer-from-org-over-balance", "Transfer", lambda: transfer(org(ORG), amount_cents=2_001),
         grpc.StatusCode.FAILED_PRECONDITION, role="admin"),
    # ---- Adjust
    Case("adjust-by-app", "Adjust", lambda: adjust(), grpc.StatusCode.PERMISSION_DENIED),
    Case("adjust-zero", "Adjust", lambda: adjust(amount_cents=0), INVALID, "amount_cents", role="admin"),
    Case("adjust-over-limit", "Adjust", lambda: adjust(amount_cents=-MAX_AMOUNT_CENTS - 1), INVALID, "amount_cents",
         role="admin"),
    Case("adjust-no-description", "Adjust", lambda: adjust(description=" "), INVALID, "description", role="admin"),
    Case("adjust-description-long", "Adjust", lambda: adjust(description=LONG_TEXT), INVALID, "description",
         role="admin"),
    Case("adjust-no-account", "Adjust", lambda: pb.AdjustRequest(idempotency_key=key(), amount_cents=1,
                                                                  description="x"), INVALID, "account", role="admin"),
    Case("adjust-unknown-org", "Adjust", lambda: adjust(account=org(404)), grpc.StatusCode.NOT_FOUND, role="admin"),
    Case("adjust-no-key", "Adjust", lambda: adjust(idempotency_key=""), INVALID, "idempotency_key", role="admin"),
    # ---- UpsertMember
    Case("member-by-app", "UpsertMember", lambda: pb.UpsertMemberRequest(idempotency_key=key(), member_id=5),
         grpc.StatusCode.PERMISSION_DENIED),
    Case("member-no-id", "UpsertMember", lambda: pb.UpsertMemberRequest(idempotency_key=key(), member_id=0),
         INVALID, "member_id", role="admin"),
    Case("member-name-long", "UpsertMember",
         lambda: pb.UpsertMemberRequest(idempotency_key=key(), member_id=5, name="n" * 201), INVALID, "name",
         role="admin"),
    Case("member-no-key", "UpsertMember", lambda: pb.UpsertMemberRequest(member_id=5, name="Cy"), INVALID,
         "idempotency_key", role="admin"),
    # ---- UpsertOrganisation
    Case("org-by-app", "UpsertOrganisation", lambda: upsert_org(), grpc.StatusCode.PERMISSION_DENIED),
    Case("org-no-id", "UpsertOrganisation", lambda: upsert_org(organisation_id=0), INVALID, "organisation_id",
         role="admin"),
    Case("org-no-name", "UpsertOrganisation", lambda: upsert_org(name=""), INVALID, "name", role="admin"),
    Case("org-bad-bsb", "UpsertOrganisation", lambda: upsert_org(bsb="12-34"), INVALID, "bsb", role="admin"),
    Case("org-bad-account-number", "UpsertOrganisation", lambda: upsert_org(account_number="12ab"), INVALID,
         "account_number", role="admin"),
    Case("org-negative-minimum", "UpsertOrganisation", lambda: upsert_org(minimum_balance_cents=-1), INVALID,
         "minimum_balance_cents", role="admin"),
    Case("org-fee-over-100pc", "UpsertOrganisation", lambda: upsert_org(settlement_fee_bp=10_001), INVALID,
         "settlement_fee_bp", role="admin"),
    Case("org-no-key", "UpsertOrganisation", lambda: upsert_org(idempotency_key=""), INVALID, "idempotency_key",
         role="admin"),
    # ---- reads
    Case("balance-no-account", "GetBalance", lambda: pb.GetBalanceRequest(), INVALID, "account"),
    Case("balance-bad-member", "GetBalance", lambda: pb.GetBalanceRequest(account=member(-1)), INVALID,
         "account.member_id"),
    Case("balance-unknown-org", "GetBalance", lambda: pb.GetBalanceRequest(account=org(404)),
         grpc.StatusCode.NOT_FOUND),
    Case("statement-page-size-negative", "GetStatement", lambda: statement(page_size=-1), INVALID, "page_size"),
    Case("statement-page-size-large", "GetStatement", lambda: statement(page_size=501), INVALID, "page_size"),
    Case("statement-bad-token", "GetStatement", lambda: statement(page_token="not-a-token"), INVALID, "page_token"),
    Case("statement-empty-range", "GetStatement", lambda: ranged(statement(), NOW, NOW), INVALID, "to"),
    Case("statement-from-after-9999", "GetStatement",
         lambda: statement(**{"from": Timestamp(seconds=253_402_300_800)}), INVALID, "from"),
    Case("statement-to-bad-nanos", "GetStatement", lambda: statement(to=Timestamp(nanos=2_000_000_000)), INVALID,
         "to"),
    Case("statement-unknown-org", "GetStatement", lambda: statement(account=org(404)), grpc.StatusCode.NOT_FOUND),
    Case("export-unknown-org", "ExportStatement", lambda: pb.ExportStatementRequest(account=org(404)),
         grpc.StatusCode.NOT_FOUND),
    Case("export-backwards-range", "ExportStatement",
         lambda: ranged(pb.ExportStatementRequest(account=member(RICH)), NOW, NOW - timedelta(days=1)), INVALID, "to"),
    Case("export-no-account", "ExportStatement", lambda: pb.ExportStatementRequest(), INVALID, "account"),
]


def fund(admin) -> None:  # noqa: ANN001
    admin.upsert_organisation(ORG, "Club")
    admin.adjust(10_000, "opening", member_id=RICH)
    admin.adjust(500, "opening", member_id=POOR)
    admin.adjust(2_000, "opening", organisation_id=ORG)


def call(server, role: str, method: str, request, metadata=None):  # noqa: ANN001, ANN201
    from conftest import TOKENS

    with server.channel() as channel:
        fn = getattr(pb_grpc.PaymentsServiceStub(channel), method)
        md = metadata if metadata is not None else (("authorization", f"Bearer {TOKENS[role]}"),)
        result = fn(request, metadata=md, timeout=30)
        return list(result) if method == "ExportStatement" else result


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_and_changes_nothing(server, admin, case: Case):
    fund(admin)
    before = snapshot(server.db)
    with pytest.raises(grpc.RpcError) as err:
        call(server, case.role, case.method, case.request())
    assert err.value.code() == case.code, err.value.details()
    assert err.value.details(), "every refusal says why"
    fields = bad_fields(err.value)
    if case.field is not None:
        assert case.field in fields, f"expected a field violation for {case.field}, got {fields}"
        assert fields[case.field]
    assert snapshot(server.db) == before, "a refused request changes nothing"
    check_invariants(server.db)


@pytest.mark.parametrize("metadata", [
    (), (("authorization", "Bearer nope"),), (("authorization", "test-app-token"),),
    (("authorization", "Basic test-app-token"),), (("authorization", "Bearer "),),
], ids=["missing", "unknown", "no-scheme", "basic", "empty"])
@pytest.mark.parametrize("method", ["Pay", "GetBalance", "Adjust"])
def test_missing_or_unknown_token_is_unauthenticated(server, admin, metadata, method):
    fund(admin)
    request = {"Pay": pay(), "GetBalance": pb.GetBalanceRequest(account=member(RICH)), "Adjust": adjust()}[method]
    before = snapshot(server.db)
    with pytest.raises(grpc.RpcError) as err:
        call(server, "app", method, request, metadata=metadata)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert snapshot(server.db) == before


# ---------------------------------------------------------------- idempotency (SPEC §3)


def test_same_key_same_request_replays_stored_response(server, admin, app):
    fund(admin)
    request = pay(amount_cents=1_234)
    first, call1 = app.call("Pay", request, with_call=True)
    assert dict(call1.trailing_metadata() or ()).get("idempotent-replay") is None
    after_first = snapshot(server.db)
    again, call2 = app.call("Pay", request, with_call=True)
    assert again == first, "the stored response, byte for byte"
    assert dict(call2.trailing_metadata()).get("idempotent-replay") == "true"
    assert snapshot(server.db) == after_first, "nothing booked twice"
    assert app.balance_cents(member_id=RICH) == 10_000 - 1_234


@pytest.mark.parametrize("method", ["Transfer", "Adjust", "UpsertMember", "UpsertOrganisation"])
def test_replay_of_every_mutating_rpc(server, admin, method):
    fund(admin)
    request = {
        "Transfer": transfer(member(RICH), amount_cents=300),
        "Adjust": adjust(amount_cents=-77),
        "UpsertMember": pb.UpsertMemberRequest(idempotency_key=key(), member_id=5, name="Cy"),
        "UpsertOrganisation": upsert_org(),
    }[method]
    first = admin.call(method, request)
    after_first = snapshot(server.db)
    again, replay = admin.call(method, request, with_call=True)
    assert again == first
    assert dict(replay.trailing_metadata()).get("idempotent-replay") == "true"
    assert snapshot(server.db) == after_first


def test_replay_still_answers_after_the_balance_no_longer_covers_the_payment(server, admin, app):
    """On PostgreSQL a first request is not looked up before it runs: the repeat of a payment the
    member could afford then, but not now, must still get the stored answer, not a refusal."""
    fund(admin)
    request = pay(amount_cents=6_000)
    first = app.call("Pay", request)
    app.call("Pay", pay(amount_cents=4_000))  # RICH is now at zero
    after = snapshot(server.db)
    again, call = app.call("Pay", request, with_call=True)
    assert again == first
    assert dict(call.trailing_metadata()).get("idempotent-replay") == "true"
    assert snapshot(server.db) == after
    assert app.balance_cents(member_id=RICH) == 0


def test_same_key_different_request_is_already_exists(server, admin, app):
    fund(admin)
    request = pay(amount_cents=100)
    app.call("Pay", request)
    before = snapshot(server.db)
    changed = pb.PayRequest()
    changed.CopyFrom(request)
    changed.amount_cents = 101
    other_method = transfer(member(RICH), idempotency_key=request.idempotency_key)
    for method, req in (("Pay", changed), ("Transfer", other_method)):
        with pytest.raises(grpc.RpcError) as err:
            app.call(method, req)
        assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert request.idempotency_key in err.value.details()
    assert snapshot(server.db) == before


def test_keys_are_scoped_per_principal(server, admin):
    fund(admin)
    request = pay(amount_cents=100)
    with server.client("app") as app, server.client("app2") as app2:
        one = app.call("Pay", request)
        two, second = app2.call("Pay", request, with_call=True)
    assert one.payment_id != two.payment_id, "another caller's key is another request"
    assert dict(second.trailing_metadata() or ()).get("idempotent-replay") is None
    assert snapshot(server.db).balances[4 * RICH + 1] == 10_000 - 200


def test_failed_request_does_not_use_up_its_key(server, admin, app):
    fund(admin)
    request = pay(member_id=POOR, amount_cents=600)
    with pytest.raises(grpc.RpcError) as err:
        app.call("Pay", request)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    admin.adjust(100, "top up", member_id=POOR)
    resp = app.call("Pay", request)
    assert resp.status == pb.SUCCEEDED and resp.balance_cents == 0
