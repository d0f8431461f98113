"""A caller books only caller types (SPEC §4 Pay): the lines only the system books (settlement,
manual adjustment, auto or manual top-up, card refund, CC payment) are INVALID_ARGUMENT, so no caller
can forge an administrator's or Stripe's line on a statement or in an organisation's summary."""

from __future__ import annotations

import grpc
import pytest
from conftest import RunningServer
from ledger_invariants import bad_fields, check_invariants, snapshot

from cobalt.payments.v1 import payments_pb2 as pb
from server.domain.types import PostingType

SYSTEM_TYPES = ["SETTLEMENT", "MANUAL_ADJUSTMENT", "AUTO_TOP_UP", "MANUAL_TOP_UP", "CARD_REFUND", "CC_PAYMENT"]
CALLER_TYPES = [t.name for t in pb.PaymentType.DESCRIPTOR.values
                if t.name not in SYSTEM_TYPES and t.number != pb.PAYMENT_TYPE_UNSPECIFIED]



def test_the_domain_rule_names_exactly_the_system_types() -> None:
    assert sorted(t.value for t in PostingType if not t.caller_may_book) == sorted(SYSTEM_TYPES)


@pytest.mark.parametrize("type_name", SYSTEM_TYPES)
@pytest.mark.parametrize("payee", ["organisation_id", "other_member_id"])
@pytest.mark.parametrize("ensure_funds_only", [False, True])
def test_a_system_type_is_refused_and_changes_nothing(server: RunningServer, admin, app, type_name: str,  # noqa: ANN001
                                                      payee: str, ensure_funds_only: bool) -> None:
    admin.upsert_organisation(7, "Club")
    admin.adjust(10_000, "opening", member_id=1)
    before = snapshot(server.db)
    with pytest.raises(grpc.RpcError) as err:
        app.pay(1, 1_000, **{payee: 7 if payee == "organisation_id" else 2}, description="looks official",
                payment_type=pb.PaymentType.Value(type_name), ensure_funds_only=ensure_funds_only)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "payment_type" in bad_fields(err.value)
    assert snapshot(server.db) == before
    assert [ln.type_name for ln in app.get_statement(member_id=1).lines] == ["Manual Adjustment"]  # the admin's one
    check_invariants(server.db)


def test_a_system_type_is_refused_when_the_balance_is_short_too(server: RunningServer, admin, app) -> None:  # noqa: ANN001
    """Refused before the balance is looked at: no card path may start for a forged line."""
    admin.upsert_organisation(7, "Club")
    before = snapshot(server.db)
    with pytest.raises(grpc.RpcError) as err:
        app.pay(1, 1_000, organisation_id=7, payment_type=pb.SETTLEMENT)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert snapshot(server.db) == before


@pytest.mark.parametrize("type_name", CALLER_TYPES)
def test_caller_types_are_booked(server: RunningServer, admin, app, type_name: str) -> None:  # noqa: ANN001
    admin.upsert_organisation(7, "Club")
    admin.adjust(10_000, "opening", member_id=1)
    assert app.pay(1, 1_000, organisation_id=7, payment_type=pb.PaymentType.Value(type_name)).status == pb.SUCCEEDED
    assert app.get_statement(member_id=1).lines[0].type == pb.PaymentType.Value(type_name)
