"""A replay answers exactly what the first request answered, built from the stored result data, at
value boundaries: negative balances (Adjust), zero, and the int64 extremes of the proto fields."""

from __future__ import annotations

import uuid

import grpc
import pytest
from ledger_invariants import snapshot

from cobalt.payments.v1 import payments_pb2 as pb
from server.domain.money import MAX_AMOUNT_CENTS

INT64_MAX = 2**63 - 1


def twice(client, method: str, request) -> tuple:  # noqa: ANN001
    """The first answer and the replay's, checking the replay is marked and books nothing."""
    first = client.call(method, request)
    before = snapshot(client_db[0])
    again, call = client.call(method, request, with_call=True)
    assert dict(call.trailing_metadata()).get("idempotent-replay") == "true"
    assert snapshot(client_db[0]) == before, "a replay books nothing"
    return first, again


client_db: list = []


@pytest.fixture(autouse=True)
def _db(server):  # noqa: ANN001
    client_db[:] = [server.db]


def key() -> str:
    return uuid.uuid4().hex


def test_transfer_to_a_negative_balance_replays_the_same_balance(admin, app):
    """The case from the field: −$50.00 by Adjust, $20.00 transferred in, the same request again."""
    admin.adjust(-5_000, "correction", member_id=2)
    admin.adjust(10_000, "opening", member_id=1)
    req = pb.TransferRequest(idempotency_key=key(), to_member_id=2, amount_cents=2_000)
    getattr(req, "from").member_id = 1
    first, again = twice(app, "Transfer", req)
    assert first.to_balance_cents == -3_000 and first.from_balance_cents == 8_000
    assert again == first


def test_pay_to_a_member_with_a_negative_balance_replays_the_same(admin, app):
    admin.adjust(-5_000, "correction", member_id=2)
    admin.adjust(10_000, "opening", member_id=1)
    req = pb.PayRequest(idempotency_key=key(), member_id=1, other_member_id=2, amount_cents=2_000)
    first, again = twice(app, "Pay", req)
    assert first.balance_cents == 8_000 and again == first


def test_pay_that_empties_a_balance_replays_zero(admin, app):
    admin.upsert_organisation(7, "Club")
    admin.adjust(2_500, "opening", member_id=1)
    req = pb.PayRequest(idempotency_key=key(), member_id=1, organisation_id=7, amount_cents=2_500)
    first, again = twice(app, "Pay", req)
    assert first.balance_cents == 0 and again == first


@pytest.mark.parametrize("cents", [-MAX_AMOUNT_CENTS, -1, 1, MAX_AMOUNT_CENTS])
def test_adjust_replays_at_the_limits(admin, cents):
    req = pb.AdjustRequest(idempotency_key=key(), account=pb.AccountRef(member_id=3), amount_cents=cents,
                           description="limit")
    first, again = twice(admin, "Adjust", req)
    assert first.balance_cents == cents and first.balance_negative == (cents < 0)
    assert again == first


def test_registration_and_settings_replay_the_same(admin):
    org = pb.UpsertOrganisationRequest(idempotency_key=key(), organisation_id=INT64_MAX // 4 - 1, name="Far",
                                       bsb="123-456", account_number="12345678", minimum_balance_cents=0)
    first, again = twice(admin, "UpsertOrganisation", org)
    assert first.organisation_id == INT64_MAX // 4 - 1 and again == first
    member = pb.UpsertMemberRequest(idempotency_key=key(), member_id=5, name="Eve")
    first, again = twice(admin, "UpsertMember", member)
    assert again == first
    fees = pb.SetFeeSettingsRequest(idempotency_key=key(), refund_fee_bp=0)
    first, again = twice(admin, "SetFeeSettings", fees)
    assert first.refund_fee_bp == 0 and again == first


def test_settle_replays_the_same_table(admin):
    admin.upsert_organisation(7, "Club", bsb="123-456", account_number="12345678")
    admin.adjust(100_001, "takings", organisation_id=7)
    req = pb.SettleRequest(idempotency_key=key())
    first, again = twice(admin, "Settle", req)
    assert len(first.rows) == 1 and first.total_gross_cents == 100_001 and again == first


def test_a_key_reused_for_another_request_is_refused_and_changes_nothing(admin, app):
    admin.adjust(10_000, "opening", member_id=1)
    req = pb.TransferRequest(idempotency_key=key(), to_member_id=2, amount_cents=100)
    getattr(req, "from").member_id = 1
    app.call("Transfer", req)
    before = snapshot(client_db[0])
    req.amount_cents = 200
    with pytest.raises(grpc.RpcError) as err:
        app.call("Transfer", req)
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert snapshot(client_db[0]) == before
