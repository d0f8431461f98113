"""Manual top-up by card, end to end: gRPC → server → localstripe → signed webhook → bridge → server."""

from __future__ import annotations

import grpc
import pytest
from stripe_support import CardStack

from cobalt.payments.v1 import payments_pb2 as pb
from server.domain.types import SystemAccount, system_account

pytestmark = pytest.mark.stripe


def test_top_up_credited_once_by_the_webhook_then_confirm_changes_nothing(cards_any: CardStack) -> None:
    cards = cards_any
    started = cards.start_top_up(1, 100_00)
    assert started.payment_intent_id.startswith("pi_") and started.client_secret
    assert started.amount_cents == 100_00
    assert cards.app.balance_cents(member_id=1) == 0  # nothing until Stripe confirms

    assert cards.pay_intent_with_card(started.payment_intent_id) == "succeeded"
    cards.wait_for_webhook("payment_intent.succeeded", started.payment_intent_id)
    assert cards.app.balance_cents(member_id=1) == 100_00

    confirmed = cards.confirm_card_payment(started.payment_intent_id)
    assert confirmed.status == pb.CARD_PAYMENT_SUCCEEDED
    assert confirmed.applied_now is False
    assert confirmed.balance_cents == 100_00

    lines = cards.app.get_statement(member_id=1).lines
    assert [(line.type_name, line.amount_cents) for line in lines] == [("Manual Top Up", 100_00)]
    assert [e.amount_cents for e in cards.outbox("TOP_UP_SUCCEEDED")] == [100_00]
    # the card money came from the stripe system account
    assert cards.balances()[system_account(SystemAccount.STRIPE)] == -100_00
    cards.assert_invariants()


def test_confirm_before_the_webhook_applies_and_the_webhook_then_changes_nothing(cards: CardStack) -> None:
    started = cards.start_top_up(2, 75_00)
    assert cards.pay_intent_with_card(started.payment_intent_id) == "succeeded"

    confirmed = cards.confirm_card_payment(started.payment_intent_id)
    assert confirmed.status == pb.CARD_PAYMENT_SUCCEEDED and confirmed.applied_now is True
    assert confirmed.balance_cents == 75_00

    cards.wait_for_webhook("payment_intent.succeeded", started.payment_intent_id)
    again = cards.confirm_card_payment(started.payment_intent_id)
    assert again.applied_now is False
    assert cards.app.balance_cents(member_id=2) == 75_00
    assert len(cards.outbox("TOP_UP_SUCCEEDED")) == 1
    cards.assert_invariants()


def test_confirm_of_an_unpaid_intent_is_pending_and_books_nothing(cards: CardStack) -> None:
    started = cards.start_top_up(3, 50_00)
    state = cards.confirm_card_payment(started.payment_intent_id)
    assert state.status == pb.CARD_PAYMENT_PENDING and not state.applied_now
    assert cards.app.balance_cents(member_id=3) == 0
    assert cards.posting_count() == 0


def test_top_up_amount_limits(cards: CardStack) -> None:
    with pytest.raises(grpc.RpcError) as low:
        cards.start_top_up(4, 49_99)
    assert low.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    cards.admin.adjust(1_500_00, "opening credit", member_id=4)
    with pytest.raises(grpc.RpcError) as high:
        cards.start_top_up(4, 500_01)  # $2,000.00 − $1,500.00 = $500.00 at most
    assert high.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "500.00" in high.value.details()
    assert cards.start_top_up(4, 500_00).amount_cents == 500_00


def test_start_top_up_is_idempotent(cards: CardStack) -> None:
    first = cards.start_top_up(5, 60_00, key="top-up-5")
    response, call = cards.app.call("StartTopUp", pb.StartTopUpRequest(
        idempotency_key="top-up-5", member_id=5, amount_cents=60_00), with_call=True)
    assert response.payment_intent_id == first.payment_intent_id
    assert ("idempotent-replay", "true") in (call.trailing_metadata() or ())
    with pytest.raises(grpc.RpcError) as reused:
        cards.start_top_up(5, 70_00, key="top-up-5")
    assert reused.value.code() == grpc.StatusCode.ALREADY_EXISTS


def test_confirm_of_an_unknown_intent_is_not_found(cards: CardStack) -> None:
    with pytest.raises(grpc.RpcError) as err:
        cards.confirm_card_payment("pi_doesnotexist")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_without_a_stripe_key_card_rpcs_fail_cleanly(server, app, admin) -> None:  # noqa: ANN001
    """The ordinary server fixture has no STRIPE_SECRET_KEY."""
    with pytest.raises(grpc.RpcError) as err:
        app.call("StartTopUp", pb.StartTopUpRequest(idempotency_key="k", member_id=1, amount_cents=100_00))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "Stripe is not configured" in err.value.details()
    with pytest.raises(grpc.RpcError) as setup:
        app.call("SetupAutoTopUp", pb.SetupAutoTopUpRequest(idempotency_key="k2", member_id=1))
    assert setup.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    admin.upsert_organisation(1, "Club")
    with pytest.raises(grpc.RpcError) as short:
        app.pay(1, 10_00, organisation_id=1)
    assert short.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "insufficient funds" in short.value.details()
