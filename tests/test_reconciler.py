"""The reconciler (SPEC §4 Refund, §5): card operations left pending are settled with Stripe as soon
as Stripe answers, with no retry by the caller. Stripe goes down (or an answer is lost) through a
switchable proxy in front of localstripe, so localstripe keeps what it did. This server has no
bridge: no webhook ever comes, as when Stripe's never arrive."""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import pytest
from conftest import RunningServer, _truncate_all, record_backend, scratch_database, start_server
from sqlalchemy import select
from stripe_proxy import StripeProxy
from stripe_support import SECRET_KEY, WEBHOOK_SECRET, CardStack, LocalStripe, wait_until

from clients.payments_client import new_idempotency_key
from cobalt.payments.v1 import payments_pb2 as pb
from server.domain.errors import InvalidArgument
from server.ledger.schema import card_payments, refunds
from server.services import reconcile

pytestmark = pytest.mark.stripe

OUTCOME_UNKNOWN = "outcome unknown, held pending reconciliation"


@pytest.fixture(scope="module")
def proxied(localstripe: LocalStripe) -> Iterator[tuple[RunningServer, StripeProxy]]:
    proxy = StripeProxy(localstripe.api_base)
    server = start_server(scratch_database(), "postgresql", stripe_secret_key=SECRET_KEY,
                          stripe_api_base=proxy.base, stripe_webhook_secret=WEBHOOK_SECRET,
                          reconcile_interval_ms=200, reconcile_min_age_s=1)
    yield server, proxy
    server.stop()
    proxy.close()


@pytest.fixture
def stack(proxied: tuple[RunningServer, StripeProxy], localstripe: LocalStripe) -> Iterator[CardStack]:
    server, proxy = proxied
    proxy.up()
    _truncate_all(server.db)
    with server.client("app") as app, server.client("admin") as admin:
        yield CardStack(server, None, localstripe, app, admin, localstripe.client())  # type: ignore[arg-type]
    proxy.up()
    record_backend("postgresql")


@pytest.fixture
def proxy(proxied: tuple[RunningServer, StripeProxy]) -> StripeProxy:
    return proxied[1]


def refund_rows(stack: CardStack) -> list:
    with stack.server.db.engine.connect() as conn:
        return list(conn.execute(select(refunds).order_by(refunds.c.id)))


def card_rows_of(stack: CardStack, member_id: int) -> list:
    with stack.server.db.engine.connect() as conn:
        return list(conn.execute(select(card_payments).where(card_payments.c.member_id == member_id)))


def refunds_at_stripe(stack: CardStack, payment_intent_id: str) -> list:
    return list(stack.stripe.v1.refunds.list(params={"payment_intent": payment_intent_id}).data)


def ask_refund(stack: CardStack, member_id: int, payment_intent_id: str, amount_cents: int,
               key: str) -> pb.RefundResponse:
    return stack.app.call("Refund", pb.RefundRequest(idempotency_key=key, payment_intent_id=payment_intent_id,
                                                     amount_cents=amount_cents, member_id=member_id))


def unavailable(call) -> str:  # noqa: ANN001
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
    return err.value.details()


def test_a_refund_with_stripe_down_is_held_then_completed_with_no_retry(stack: CardStack, proxy: StripeProxy) -> None:
    pi = stack.top_up_now(1, 100_00)
    proxy.down()
    key = new_idempotency_key()
    details = unavailable(lambda: ask_refund(stack, 1, pi, 40_00, key))
    assert OUTCOME_UNKNOWN in details and "nothing was" not in details
    # held: the money is off the balance, the refund pending, nothing reported as refunded
    assert stack.app.balance_cents(member_id=1) == 60_00
    [row] = refund_rows(stack)
    assert row.status == "pending" and row.amount_cents == 40_00 and row.card_amount_cents == 38_80
    assert stack.outbox("REFUNDED") == []
    time.sleep(1.5)  # rounds come and go while Stripe is down: still pending
    assert refund_rows(stack)[0].status == "pending" and refunds_at_stripe(stack, pi) == []

    proxy.up()
    wait_until(lambda: stack.outbox("REFUNDED"), timeout_s=20, what="the reconciler to complete the refund")
    [row] = refund_rows(stack)
    [made] = refunds_at_stripe(stack, pi)
    assert row.status == "succeeded" and row.stripe_refund_id == made.id and made.amount == 38_80
    assert stack.app.balance_cents(member_id=1) == 60_00
    [event] = stack.outbox("REFUNDED")
    assert event.member_id == 1 and event.amount_cents == 40_00
    # the caller's retry, whenever it comes, is answered with that refund and does nothing more
    again = ask_refund(stack, 1, pi, 40_00, key)
    assert again.refund_id == made.id and again.amount_cents == 40_00 and again.balance_cents == 60_00
    assert len(refunds_at_stripe(stack, pi)) == 1 and len(stack.outbox("REFUNDED")) == 1
    assert [ln.type_name for ln in stack.app.get_statement(member_id=1).lines] == ["Card Refund", "Manual Top Up"]
    stack.assert_invariants()


def test_a_refund_whose_answer_was_lost_is_completed_not_made_twice(stack: CardStack, proxy: StripeProxy) -> None:
    pi = stack.top_up_now(2, 100_00)
    proxy.lose_next_answer()
    assert OUTCOME_UNKNOWN in unavailable(lambda: ask_refund(stack, 2, pi, 100_00, new_idempotency_key()))
    assert proxy.requests_lost == 1
    [made] = refunds_at_stripe(stack, pi)  # Stripe did it; we did not hear
    assert refund_rows(stack)[0].status == "pending"
    proxy.up()
    wait_until(lambda: stack.outbox("REFUNDED"), timeout_s=20, what="the reconciler to complete the refund")
    assert [r.id for r in refunds_at_stripe(stack, pi)] == [made.id]
    assert refund_rows(stack)[0].stripe_refund_id == made.id
    assert stack.app.balance_cents(member_id=2) == 0
    stack.assert_invariants()


def test_a_refund_stripe_refuses_when_asked_again_gives_the_money_back(stack: CardStack, proxy: StripeProxy) -> None:
    pi = stack.top_up_now(3, 100_00)
    proxy.down()
    unavailable(lambda: ask_refund(stack, 3, pi, 50_00, new_idempotency_key()))
    assert stack.app.balance_cents(member_id=3) == 50_00
    [row] = refund_rows(stack)

    class Refusing:
        currency = "aud"

        def find_refund(self, payment_intent_id: str, cobalt_ref: str) -> None:
            return None  # Stripe has no record of it…

        def refund(self, payment_intent_id: str, amount_cents: int, key: str) -> str:
            raise InvalidArgument("Stripe refused the request (refund): charge already refunded")  # …and refuses it

    reconciler = reconcile.Reconciler(stack.server.db, Refusing(), reconcile.Limits(min_age_s=0))  # type: ignore[arg-type]
    result = reconciler.round()
    assert result.outcomes == {f"refund:{row.id}": reconcile.Outcome.RELEASED}
    assert refund_rows(stack)[0].status == "reversed"
    assert stack.app.balance_cents(member_id=3) == 100_00
    assert stack.outbox("REFUNDED") == []
    stack.assert_invariants()


def test_an_auto_top_up_whose_answer_was_lost_is_credited(stack: CardStack, proxy: StripeProxy) -> None:
    stack.admin.upsert_organisation(7, "Bridge Club")
    stack.admin.adjust(30_00, "opening credit", member_id=4)
    assert stack.auto_top_up_on(4, amount_cents=50_00).status == pb.AUTO_TOP_UP_STATUS_ON
    proxy.lose_next_answer()
    details = unavailable(lambda: stack.app.pay(4, 60_00, organisation_id=7))
    assert "unknown" in details
    [row] = card_rows_of(stack, 4)
    assert row.status == "pending" and row.payment_intent_id.startswith("pending_")
    proxy.up()
    wait_until(lambda: stack.outbox("TOP_UP_SUCCEEDED"), timeout_s=20, what="the reconciler to credit the top-up")
    [row] = card_rows_of(stack, 4)
    assert row.status == "succeeded" and row.payment_intent_id.startswith("pi_")
    assert stack.stripe.v1.payment_intents.retrieve(row.payment_intent_id).status == "succeeded"
    assert stack.app.balance_cents(member_id=4) == 80_00  # the card was charged: its money is there
    assert stack.outbox("PAYMENT_SUCCEEDED") == []  # the Pay was answered UNAVAILABLE, not booked
    assert stack.app.get_balance(member_id=4).auto_top_up_status == pb.AUTO_TOP_UP_STATUS_ON
    stack.assert_invariants()


def test_a_card_payment_paid_with_no_webhook_books_the_pay(stack: CardStack, proxy: StripeProxy) -> None:
    stack.admin.upsert_organisation(7, "Bridge Club")
    resp = stack.app.pay(5, 25_00, organisation_id=7, route_code="EVT")
    assert resp.status == pb.REQUIRES_CARD_PAYMENT
    proxy.down()
    assert stack.pay_intent_with_card(resp.payment_intent_id) == "succeeded"  # the member's side reaches Stripe
    time.sleep(1.5)
    assert stack.app.balance_cents(organisation_id=7) == 0
    proxy.up()
    wait_until(lambda: stack.outbox("PAYMENT_SUCCEEDED"), timeout_s=20, what="the reconciler to book the Pay")
    assert [e.route_code for e in stack.outbox("PAYMENT_SUCCEEDED")] == ["EVT"]
    assert stack.app.balance_cents(organisation_id=7) == 25_00
    assert stack.app.balance_cents(member_id=5) == 0
    stack.assert_invariants()


def test_a_top_up_that_never_reached_stripe_is_voided_and_frees_the_ceiling(stack: CardStack,
                                                                           proxy: StripeProxy) -> None:
    proxy.down()
    unavailable(lambda: stack.start_top_up(6, 2_000_00))
    [row] = card_rows_of(stack, 6)
    assert row.status == "pending"
    with pytest.raises(grpc.RpcError) as err:  # its outcome is unknown: it counts against the ceiling
        stack.start_top_up(6, 50_00)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    proxy.up()
    wait_until(lambda: card_rows_of(stack, 6)[0].status == "failed", timeout_s=20,
               what="the reconciler to void the top-up")
    assert stack.outbox() == [] and stack.posting_count() == 0  # nothing was tried: nothing to report
    assert stack.start_top_up(6, 2_000_00).amount_cents == 2_000_00


def test_a_payment_intent_nobody_paid_is_cancelled_in_time(stack: CardStack) -> None:
    stack.admin.upsert_organisation(7, "Bridge Club")
    started = stack.start_top_up(8, 100_00)
    pay = stack.app.pay(9, 30_00, organisation_id=7)
    reconciler = reconcile.Reconciler(stack.server.db, stack.server.server.servicer.gateway,
                                      reconcile.Limits(min_age_s=0, unpaid_ttl_s=3600))
    assert set(reconciler.round().outcomes.values()) == {reconcile.Outcome.WAITING}  # not yet
    reconciler = reconcile.Reconciler(stack.server.db, stack.server.server.servicer.gateway,
                                      reconcile.Limits(min_age_s=0, unpaid_ttl_s=0))
    assert set(reconciler.round().outcomes.values()) == {reconcile.Outcome.RELEASED}
    for intent_id in (started.payment_intent_id, pay.payment_intent_id):
        assert stack.stripe.v1.payment_intents.retrieve(intent_id).status == "canceled"
    assert [r.status for r in card_rows_of(stack, 8) + card_rows_of(stack, 9)] == ["failed", "failed"]
    [failed] = stack.outbox("PAYMENT_FAILED")  # the Pay's caller hears it will not happen
    assert failed.member_id == 9
    assert stack.posting_count() == 0


def test_a_pending_refunds_key_cannot_be_used_for_another_refund(stack: CardStack, proxy: StripeProxy) -> None:
    pi = stack.top_up_now(10, 100_00)
    proxy.down()
    key = new_idempotency_key()
    unavailable(lambda: ask_refund(stack, 10, pi, 30_00, key))
    proxy.up()
    with pytest.raises(grpc.RpcError) as err:
        ask_refund(stack, 10, pi, 50_00, key)  # the same key, another request
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert stack.app.balance_cents(member_id=10) == 70_00 and len(refund_rows(stack)) == 1
