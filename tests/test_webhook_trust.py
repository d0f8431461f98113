"""A signature proves the sender, not the content (SPEC §7). Correctly signed events that lie credit
nothing: a PaymentIntent Stripe never issued (with a real member's metadata), one whose member,
purpose, amount or currency differ from the pending row, a SetupIntent for another customer. The
server asks Stripe about objects it does not know, and logs each mismatch at error level."""

from __future__ import annotations

import json
import logging
import secrets

import pytest
from sqlalchemy import select
from stripe_support import CardStack, post_signed, post_webhook, stripe_signature

from clients.payments_client import new_idempotency_key
from cobalt.payments.v1 import payments_pb2 as pb
from server.ledger.schema import card_payments
from server.services import cards as card_rows

pytestmark = pytest.mark.stripe



def forged_intent(metadata: dict, amount_cents: int, *, intent_id: str | None = None, currency: str = "aud",
                  status: str = "succeeded") -> dict:
    return {"id": intent_id or "pi_" + secrets.token_hex(12), "object": "payment_intent", "amount": amount_cents,
            "currency": currency, "status": status, "metadata": metadata}


def errors_about(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.ERROR and text in r.getMessage()]


def money(cards: CardStack) -> tuple[dict[int, int], int]:
    return cards.balances(), cards.posting_count()


def test_an_intent_stripe_never_issued_is_not_adopted(cards: CardStack, caplog: pytest.LogCaptureFixture) -> None:
    """The hole: a real member's metadata (from a real top-up) on an intent Stripe never made, $5,000.00."""
    real = cards.top_up_now(1, 100_00)
    metadata = cards.stripe.v1.payment_intents.retrieve(real).to_dict()["metadata"]
    assert metadata["member_id"] == "1" and metadata["cobalt_ref"]
    before = money(cards)
    caplog.set_level(logging.ERROR)
    for amount_cents in (5_000_00, 100_00):  # more than asked for, and a twin's amount
        forged = forged_intent(metadata, amount_cents)
        status, answer = post_signed(cards.bridge.webhook_url, "payment_intent.succeeded", forged)
        assert (status, answer["message"]) == (200, "acknowledged")
        assert errors_about(caplog, forged["id"]), "the forgery is logged at error level"
    assert money(cards) == before
    assert cards.app.balance_cents(member_id=1) == 100_00
    assert len(cards.outbox("TOP_UP_SUCCEEDED")) == 1
    cards.assert_invariants()


def test_an_unknown_intent_cannot_take_over_a_pending_row(cards: CardStack, caplog: pytest.LogCaptureFixture) -> None:
    """A pending row whose PaymentIntent's id we never learned (Stripe's answer was lost): an event
    naming an intent Stripe does not have, with that row's key, neither binds nor credits it."""
    ref = "cobalt-" + secrets.token_hex(20)
    cards.server.db.run(lambda conn: card_rows.start_pending(conn, ref, 2, card_rows.MANUAL_TOP_UP, 100_00, "app-svc"))
    caplog.set_level(logging.ERROR)
    forged = forged_intent(card_rows.intent_metadata(ref, 2, card_rows.MANUAL_TOP_UP), 100_00)
    assert post_signed(cards.bridge.webhook_url, "payment_intent.succeeded", forged)[0] == 200
    failed = forged_intent(card_rows.intent_metadata(ref, 2, card_rows.MANUAL_TOP_UP), 100_00,
                           status="requires_payment_method")
    assert post_signed(cards.bridge.webhook_url, "payment_intent.payment_failed", failed)[0] == 200
    with cards.server.db.engine.connect() as conn:
        rows = conn.execute(select(card_payments.c.payment_intent_id, card_payments.c.status)).all()
    assert [(r.payment_intent_id, r.status) for r in rows] == [(card_rows.placeholder_id(ref), "pending")]
    assert cards.app.balance_cents(member_id=2) == 0 and cards.posting_count() == 0
    assert errors_about(caplog, forged["id"])


@pytest.mark.parametrize(("change", "value"), [
    ("amount", 5_000_00), ("currency", "usd"), ("member_id", "4"), ("purpose", "pay"), ("purpose", "auto_top_up"),
])
def test_an_event_that_differs_from_the_pending_row_credits_nothing(
        cards: CardStack, caplog: pytest.LogCaptureFixture, change: str, value) -> None:  # noqa: ANN001
    started = cards.start_top_up(3, 100_00)
    genuine = cards.stripe.v1.payment_intents.retrieve(started.payment_intent_id).to_dict()
    genuine["status"] = "succeeded"
    lie = {**genuine, "metadata": dict(genuine["metadata"])}
    if change in ("amount", "currency"):
        lie[change] = value
    else:
        lie["metadata"][change] = value
    caplog.set_level(logging.ERROR)
    status, answer = post_signed(cards.bridge.webhook_url, "payment_intent.succeeded", lie)
    assert (status, answer["message"]) == (200, "acknowledged")
    assert cards.app.balance_cents(member_id=3) == 0 and cards.posting_count() == 0
    assert cards.app.balance_cents(member_id=4) == 0
    assert errors_about(caplog, started.payment_intent_id)
    # the genuine event still applies afterwards, once
    assert post_signed(cards.bridge.webhook_url, "payment_intent.succeeded", genuine)[1]["message"] == "applied"
    assert cards.app.balance_cents(member_id=3) == 100_00
    cards.assert_invariants()


def test_a_twin_stripe_made_is_credited_only_when_it_is_the_same_request(
        cards: CardStack, caplog: pytest.LogCaptureFixture) -> None:
    """Adoption (card money is never lost) needs Stripe's own word and the issued row's amount."""
    real = cards.top_up_now(5, 100_00)
    metadata = cards.stripe.v1.payment_intents.retrieve(real).to_dict()["metadata"]
    caplog.set_level(logging.ERROR)
    paid = {}
    for amount_cents in (5_000_00, 100_00):
        twin = cards.stripe.v1.payment_intents.create(params={
            "amount": amount_cents, "currency": "aud", "metadata": metadata, "payment_method_types": ["card"]})
        assert cards.pay_intent_with_card(twin.id) == "succeeded"
        paid[amount_cents] = twin.id
        # the event says nothing of the amount: the server takes Stripe's
        post_signed(cards.bridge.webhook_url, "payment_intent.succeeded",
                    forged_intent(metadata, 100_00, intent_id=twin.id))
    assert errors_about(caplog, paid[5_000_00])
    assert cards.app.balance_cents(member_id=5) == 200_00  # the real top-up and its true twin
    cards.assert_invariants()


def test_a_setup_intent_for_another_customer_or_card_turns_nothing_on(
        cards: CardStack, caplog: pytest.LogCaptureFixture) -> None:
    setup = cards.app.call("SetupAutoTopUp", pb.SetupAutoTopUpRequest(
        idempotency_key=new_idempotency_key(), member_id=6, amount_cents=50_00))
    card = cards.new_card()
    caplog.set_level(logging.ERROR)
    base = {"id": setup.setup_intent_id, "object": "setup_intent", "status": "succeeded",
            "customer": setup.customer_id, "payment_method": card, "metadata": {"member_id": "6"}}
    lies = [{**base, "customer": "cus_someone_else"}, {**base, "metadata": {"member_id": "7"}},
            {**base, "status": "requires_payment_method"}, {**base, "payment_method": "pm_stripe_never_made"}]
    for lie in lies:
        status, answer = post_signed(cards.bridge.webhook_url, "setup_intent.succeeded", lie)
        assert (status, answer["message"]) == (200, "acknowledged"), answer
        assert cards.app.get_balance(member_id=6).auto_top_up_status == pb.AUTO_TOP_UP_STATUS_PENDING
    assert len(errors_about(caplog, setup.setup_intent_id)) == len(lies)
    assert post_signed(cards.bridge.webhook_url, "setup_intent.succeeded", base)[1]["message"] == "applied"
    assert cards.app.get_balance(member_id=6).auto_top_up_status == pb.AUTO_TOP_UP_STATUS_ON


def test_a_refund_event_for_an_intent_we_did_not_make_moves_nothing(cards: CardStack) -> None:
    before = money(cards)
    charge = {"id": "ch_" + secrets.token_hex(8), "object": "charge", "payment_intent": "pi_" + secrets.token_hex(8),
              "amount": 5_000_00, "amount_refunded": 5_000_00}
    status, answer = post_signed(cards.bridge.webhook_url, "charge.refunded", charge)
    assert (status, answer["message"]) == (200, "acknowledged")
    assert money(cards) == before


def test_text_people_typed_inside_a_genuine_event_does_not_stop_it(cards: CardStack) -> None:
    """Stripe's JSON quotes free text raw (a description, a name): the event applies all the same."""
    started = cards.start_top_up(9, 60_00)
    genuine = cards.stripe.v1.payment_intents.retrieve(started.payment_intent_id).to_dict()
    genuine["status"] = "succeeded"
    genuine["description"] = "Zoë\u2028\u202e\x85 — pasted text\ttab"
    body = json.dumps({"id": "evt_" + secrets.token_hex(8), "object": "event", "type": "payment_intent.succeeded",
                       "data": {"object": genuine}}, ensure_ascii=False, indent=2).encode()
    status, answer = post_webhook(cards.bridge.webhook_url, body, stripe_signature(body))
    assert (status, answer["message"]) == (200, "applied")
    assert cards.app.balance_cents(member_id=9) == 60_00
