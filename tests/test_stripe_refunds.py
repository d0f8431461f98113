"""Refunds of card money (SPEC §4 Refund): members with the fee, administrators without."""

from __future__ import annotations

from datetime import UTC

import grpc
import pytest
from stripe_support import CardStack

from clients.payments_client import PaymentsClient, new_idempotency_key
from cobalt.payments.v1 import payments_pb2 as pb
from server.domain.types import SystemAccount, system_account

pytestmark = pytest.mark.stripe

FEDERATION, STRIPE = system_account(SystemAccount.FEDERATION), system_account(SystemAccount.STRIPE)


def refund(client: PaymentsClient, payment_intent_id: str, amount_cents: int, member_id: int = 0,
           key: str | None = None) -> pb.RefundResponse:
    return client.call("Refund", pb.RefundRequest(idempotency_key=key or new_idempotency_key(),
                                                  payment_intent_id=payment_intent_id, amount_cents=amount_cents,
                                                  member_id=member_id))


def stripe_refunded_cents(cards: CardStack, payment_intent_id: str) -> int:
    refunds = cards.stripe.v1.refunds.list(params={"payment_intent": payment_intent_id})
    return sum(r.amount for r in refunds.data)


def test_member_refund_pays_the_fee_to_the_federation(cards_any: CardStack) -> None:
    cards = cards_any
    pi = cards.top_up_now(1, 100_00)
    resp = refund(cards.app, pi, 40_00, member_id=1)
    # refund fee 3 % of $40.00 = $1.20 to federation; $38.80 back to the card
    assert (resp.amount_cents, resp.fee_cents, resp.card_amount_cents) == (40_00, 1_20, 38_80)
    assert resp.balance_cents == 60_00 and resp.remaining_refundable_cents == 60_00
    assert resp.refund_id.startswith("re_")
    balances = cards.balances()
    assert balances[FEDERATION] == 1_20
    assert balances[STRIPE] == -100_00 + 38_80
    assert stripe_refunded_cents(cards, pi) == 38_80
    [event] = cards.outbox("REFUNDED")
    assert event.member_id == 1 and event.amount_cents == 40_00
    assert cards.app.get_statement(member_id=1).lines[0].type_name == "Card Refund"
    cards.assert_invariants()


def test_fee_rounds_half_up(cards: CardStack) -> None:
    pi = cards.top_up_now(2, 50_00)
    resp = refund(cards.app, pi, 50, member_id=2)  # 3 % of 50 cents = 1.5 cents → 2 cents
    assert (resp.fee_cents, resp.card_amount_cents) == (2, 48)


def test_refund_beyond_what_is_left_is_refused(cards: CardStack) -> None:
    pi = cards.top_up_now(3, 100_00)
    refund(cards.app, pi, 70_00, member_id=3)
    before, postings_before = cards.balances(), cards.posting_count()
    with pytest.raises(grpc.RpcError) as err:
        refund(cards.app, pi, 30_01, member_id=3)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "30.00" in err.value.details()
    assert cards.balances() == before and cards.posting_count() == postings_before
    assert stripe_refunded_cents(cards, pi) == 70_00 - 2_10


def test_refund_beyond_the_balance_is_refused(cards: CardStack) -> None:
    cards.admin.upsert_organisation(7, "Bridge Club")
    pi = cards.top_up_now(4, 100_00)
    cards.app.pay(4, 90_00, organisation_id=7)
    with pytest.raises(grpc.RpcError) as err:
        refund(cards.app, pi, 20_00, member_id=4)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "insufficient funds" in err.value.details()
    assert cards.app.balance_cents(member_id=4) == 10_00
    assert stripe_refunded_cents(cards, pi) == 0


def test_member_may_refund_only_their_own_payment(cards: CardStack) -> None:
    pi = cards.top_up_now(5, 100_00)
    with pytest.raises(grpc.RpcError) as err:
        refund(cards.app, pi, 10_00, member_id=6)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_admin_refund_has_no_fee_and_never_their_own(cards: CardStack) -> None:
    pi = cards.top_up_now(7, 100_00)
    resp = refund(cards.admin, pi, 30_00)
    assert (resp.amount_cents, resp.fee_cents, resp.card_amount_cents) == (30_00, 0, 30_00)
    assert cards.balances().get(FEDERATION, 0) == 0
    assert stripe_refunded_cents(cards, pi) == 30_00

    own = cards.top_up_now(8, 100_00, client=cards.admin)  # a top-up the administrator made
    with pytest.raises(grpc.RpcError) as err:
        refund(cards.admin, own, 10_00)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    cards.assert_invariants()


def test_refund_retry_with_the_same_key_moves_money_once(cards: CardStack) -> None:
    pi = cards.top_up_now(9, 100_00)
    first = refund(cards.app, pi, 25_00, member_id=9, key="refund-9")
    response, call = cards.app.call("Refund", pb.RefundRequest(
        idempotency_key="refund-9", payment_intent_id=pi, amount_cents=25_00, member_id=9), with_call=True)
    assert response == first
    assert ("idempotent-replay", "true") in (call.trailing_metadata() or ())
    assert cards.app.balance_cents(member_id=9) == 75_00
    assert stripe_refunded_cents(cards, pi) == first.card_amount_cents


def test_refund_of_a_pending_payment_is_refused(cards: CardStack) -> None:
    started = cards.start_top_up(10, 100_00)
    with pytest.raises(grpc.RpcError) as err:
        refund(cards.admin, started.payment_intent_id, 10_00)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_concurrent_retries_of_one_refund_take_the_money_once(cards_any: CardStack) -> None:
    import threading

    cards = cards_any
    pi = cards.top_up_now(11, 100_00)
    responses: list[pb.RefundResponse] = []
    threads = [threading.Thread(target=lambda: responses.append(refund(cards.app, pi, 20_00, member_id=11,
                                                                       key="refund-11")))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(responses) == 4 and all(r == responses[0] for r in responses)
    assert cards.app.balance_cents(member_id=11) == 80_00
    assert len(cards.outbox("REFUNDED")) == 1
    cards.assert_invariants()


def test_members_refund_within_12_weeks_administrators_later_too(cards: CardStack) -> None:
    from datetime import datetime, timedelta

    from sqlalchemy import update

    from server.ledger.schema import card_payments

    pi = cards.top_up_now(12, 100_00)
    with cards.server.db.engine.begin() as conn:  # the top-up was 12 weeks and a day ago
        conn.execute(update(card_payments).where(card_payments.c.payment_intent_id == pi)
                     .values(applied_at=datetime.now(UTC) - timedelta(weeks=12, days=1)))
    with pytest.raises(grpc.RpcError) as err:
        refund(cards.app, pi, 10_00, member_id=12)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "12 weeks" in err.value.details()
    assert cards.app.balance_cents(member_id=12) == 100_00
    assert refund(cards.admin, pi, 10_00).card_amount_cents == 10_00
