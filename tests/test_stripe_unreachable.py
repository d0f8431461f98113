"""Stripe unreachable (its own localstripe, stopped mid-test): UNAVAILABLE, nothing booked, invariants hold."""

from __future__ import annotations

import grpc
import pytest
from conftest import record_backend, scratch_database, start_server
from stripe_support import CardStack, start_localstripe, stripe_settings

from clients.payments_client import new_idempotency_key
from cobalt.payments.v1 import payments_pb2 as pb

pytestmark = pytest.mark.stripe


def test_stripe_down_answers_unavailable_and_books_nothing(tmp_path) -> None:  # noqa: ANN001
    ls = start_localstripe()
    server = start_server(scratch_database(), "postgresql", **stripe_settings(ls))
    try:
        with server.client("app") as app, server.client("admin") as admin:
            stack = CardStack(server, None, ls, app, admin, ls.client())  # type: ignore[arg-type]
            admin.upsert_organisation(7, "Bridge Club")
            admin.adjust(30_00, "opening credit", member_id=1)
            assert stack.auto_top_up_on(1, amount_cents=50_00).status == pb.AUTO_TOP_UP_STATUS_ON
            pending = stack.start_top_up(2, 100_00)
            ls.stop()
            before, postings_before = stack.balances(), stack.posting_count()

            def unavailable(call) -> str:  # noqa: ANN001
                with pytest.raises(grpc.RpcError) as err:
                    call()
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
                return err.value.details()

            assert "Stripe is unreachable" in unavailable(lambda: stack.start_top_up(2, 50_00))
            unavailable(lambda: app.pay(1, 100_00, organisation_id=7))  # auto top-up charge
            unavailable(lambda: app.pay(2, 10_00, organisation_id=7))  # card payment for the shortfall
            unavailable(lambda: stack.confirm_card_payment(pending.payment_intent_id))
            unavailable(lambda: app.call("SetupAutoTopUp", pb.SetupAutoTopUpRequest(
                idempotency_key=new_idempotency_key(), member_id=3)))
            unavailable(lambda: app.call("CancelAutoTopUp", pb.CancelAutoTopUpRequest(
                idempotency_key=new_idempotency_key(), member_id=1)))

            assert stack.balances() == before
            assert stack.posting_count() == postings_before
            assert app.get_balance(member_id=1).auto_top_up_status == pb.AUTO_TOP_UP_STATUS_ON
            # a Pay the balance covers needs no Stripe and still works
            assert app.pay(1, 5_00, organisation_id=7).status == pb.SUCCEEDED
            stack.assert_invariants()
    finally:
        server.stop()
        ls.stop()
        record_backend("postgresql")
