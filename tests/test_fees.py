"""Fee settings over gRPC: defaults, versions with history, partial updates, validation."""

from __future__ import annotations

import grpc
import pytest

from cobalt.payments.v1 import payments_pb2 as pb


def test_defaults_then_versions(server, admin):
    got = admin.get_fee_settings()
    assert got.current.version == 0 and list(got.history) == []
    assert (got.current.settlement_fee_bp, got.current.refund_fee_bp, got.current.low_balance_limit_cents) == (
        200, 300, 2_000)
    assert got.current.set_by == "default" and not got.current.HasField("effective_from")

    v1 = admin.set_fee_settings(settlement_fee_bp=225)
    assert v1.version > 0 and v1.set_by == "ops" and v1.HasField("effective_from")
    # fields not given keep their current value
    assert (v1.settlement_fee_bp, v1.refund_fee_bp, v1.stripe_cost_per_transaction_cents, v1.stripe_cost_bp,
            v1.low_balance_limit_cents) == (225, 300, 30, 175, 2_000)
    v2 = admin.set_fee_settings(refund_fee_bp=0, low_balance_limit_cents=1_500)  # an explicit zero is a value
    assert (v2.settlement_fee_bp, v2.refund_fee_bp, v2.low_balance_limit_cents) == (225, 0, 1_500)
    assert v2.version > v1.version

    got = admin.get_fee_settings()
    assert got.current == v2
    assert [s.version for s in got.history] == [v2.version, v1.version]
    assert got.history[1] == v1


def test_set_fee_settings_is_idempotent(server, admin):
    req = pb.SetFeeSettingsRequest(idempotency_key="fees-1", settlement_fee_bp=250)
    first = admin.call("SetFeeSettings", req)
    again, call = admin.call("SetFeeSettings", req, with_call=True)
    assert again == first
    assert ("idempotent-replay", "true") in tuple(call.trailing_metadata())
    assert len(admin.get_fee_settings().history) == 1


@pytest.mark.parametrize("bad", [
    {"settlement_fee_bp": -1}, {"settlement_fee_bp": 10_001}, {"refund_fee_bp": 20_000}, {"stripe_cost_bp": -5},
    {"stripe_cost_per_transaction_cents": -1}, {"low_balance_limit_cents": -100}, {},
])
def test_bad_settings_change_nothing(server, admin, bad):
    with pytest.raises(grpc.RpcError) as err:
        admin.set_fee_settings(**bad)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    got = admin.get_fee_settings()
    assert got.current.version == 0 and list(got.history) == []
