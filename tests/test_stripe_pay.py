"""Pay when the balance is short: a card payment for the shortfall, or auto top-up (SPEC §4, §5)."""

from __future__ import annotations

import grpc
import pytest
from stripe_support import DECLINED_CARD, THREE_D_SECURE_CARD, CardStack, post_signed, wait_until

from clients.payments_client import new_idempotency_key
from cobalt.payments.v1 import payments_pb2 as pb

pytestmark = pytest.mark.stripe

ON, FAILED = pb.AUTO_TOP_UP_STATUS_ON, pb.AUTO_TOP_UP_STATUS_FAILED
OFF, PENDING = pb.AUTO_TOP_UP_STATUS_OFF, pb.AUTO_TOP_UP_STATUS_PENDING


def test_short_balance_requires_a_card_payment_which_books_the_pay(cards_any: CardStack) -> None:
    cards = cards_any
    cards.admin.upsert_organisation(7, "Bridge Club")
    cards.admin.adjust(30_00, "opening credit", member_id=1)
    resp = cards.app.pay(1, 80_00, organisation_id=7, description="Congress entry", route_code="EVT",
                         route_payload='{"entry": 42}', event_id=9, payment_type=pb.ENTRY_TO_EVENT)
    assert resp.status == pb.REQUIRES_CARD_PAYMENT
    assert resp.card_amount_cents == 50_00  # amount − max(balance, 0)
    assert resp.payment_intent_id and resp.client_secret and resp.payment_id
    assert cards.app.balance_cents(member_id=1) == 30_00  # nothing booked yet
    assert cards.app.balance_cents(organisation_id=7) == 0

    assert cards.pay_intent_with_card(resp.payment_intent_id) == "succeeded"
    wait_until(lambda: cards.app.balance_cents(organisation_id=7) == 80_00, what="the webhook to book the Pay")
    assert cards.app.balance_cents(member_id=1) == 0

    succeeded = cards.outbox("PAYMENT_SUCCEEDED")
    assert len(succeeded) == 1
    event = succeeded[0]
    assert (event.route_code, event.route_payload, event.payment_id) == ("EVT", '{"entry": 42}', resp.payment_id)
    assert (event.member_id, event.organisation_id, event.amount_cents, event.event_id) == (1, 7, 80_00, 9)
    lines = cards.app.get_statement(member_id=1).lines
    assert [(line.type_name, line.amount_cents) for line in lines[:2]] == [("Entry to an event", -80_00),
                                                                          ("CC Payment", 50_00)]
    assert {line.payment_id for line in lines[:2]} == {resp.payment_id}
    # the client's confirmation afterwards changes nothing
    assert cards.confirm_card_payment(resp.payment_intent_id).applied_now is False
    assert cards.app.balance_cents(organisation_id=7) == 80_00
    cards.assert_invariants()


def test_declined_card_payment_fails_the_pay_and_books_nothing(cards: CardStack) -> None:
    cards.admin.upsert_organisation(7, "Bridge Club")
    resp = cards.app.pay(2, 60_00, organisation_id=7, description="Entry", route_code="EV2")
    assert resp.status == pb.REQUIRES_CARD_PAYMENT and resp.card_amount_cents == 60_00
    before = cards.balances()

    assert cards.pay_intent_with_card(resp.payment_intent_id, DECLINED_CARD) == "declined"
    failed = wait_until(lambda: cards.outbox("PAYMENT_FAILED"), what="the payment_failed webhook")
    assert [(e.route_code, e.payment_id, e.amount_cents) for e in failed] == [("EV2", resp.payment_id, 60_00)]
    assert cards.balances() == before
    assert cards.posting_count() == 0
    assert cards.outbox("PAYMENT_SUCCEEDED") == []
    assert cards.confirm_card_payment(resp.payment_intent_id).status == pb.CARD_PAYMENT_FAILED
    assert len(cards.outbox("PAYMENT_FAILED")) == 1


def test_pay_with_a_card_payment_is_idempotent(cards: CardStack) -> None:
    cards.admin.upsert_organisation(7, "Bridge Club")
    key = new_idempotency_key()
    first = cards.app.pay(3, 70_00, organisation_id=7, idempotency_key=key)
    again = cards.app.pay(3, 70_00, organisation_id=7, idempotency_key=key)
    assert first.status == again.status == pb.REQUIRES_CARD_PAYMENT
    assert again.payment_intent_id == first.payment_intent_id


def test_auto_top_up_covers_a_pay_by_the_rule_amount(cards_any: CardStack) -> None:
    cards = cards_any
    cards.admin.upsert_organisation(7, "Bridge Club")
    cards.admin.adjust(30_00, "opening credit", member_id=4)
    state = cards.auto_top_up_on(4, amount_cents=50_00)
    assert state.status == ON and state.amount_cents == 50_00
    assert state.topped_up_cents == 0  # $30.00 is above the $20.00 low limit

    resp = cards.app.pay(4, 120_00, organisation_id=7, description="Entry", route_code="EVT",
                         payment_type=pb.ENTRY_TO_EVENT)
    # smallest multiple of $50 covering $120 and leaving $20: 30 + x − 120 ≥ 20 → x ≥ 110 → $150
    assert resp.status == pb.SUCCEEDED
    assert resp.topped_up_cents == 150_00
    assert resp.balance_cents == 60_00
    assert cards.app.balance_cents(organisation_id=7) == 120_00
    types = [line.type_name for line in cards.app.get_statement(member_id=4).lines]
    assert types[:2] == ["Entry to an event", "Auto Top Up"]
    # the charge really happened at Stripe, off-session, for that amount
    top_ups = cards.outbox("TOP_UP_SUCCEEDED")
    assert [e.amount_cents for e in top_ups] == [150_00]
    [event] = cards.outbox("PAYMENT_SUCCEEDED")
    assert event.route_code == "EVT"
    cards.assert_invariants()


def test_auto_top_up_on_activation_and_after_a_payment_below_the_low_limit(cards: CardStack) -> None:
    cards.admin.upsert_organisation(7, "Bridge Club")
    cards.admin.adjust(5_00, "opening credit", member_id=5)
    state = cards.auto_top_up_on(5)  # default amount $100.00
    assert state.status == ON and state.amount_cents == 100_00
    assert state.topped_up_cents == 100_00 and state.balance_cents == 105_00

    resp = cards.app.pay(5, 95_00, organisation_id=7)  # leaves $10.00, below the $20.00 limit
    assert resp.status == pb.SUCCEEDED and resp.balance_cents == 10_00 and resp.topped_up_cents == 0
    assert cards.app.balance_cents(member_id=5) == 110_00  # topped up by one auto amount after the Pay
    assert cards.outbox("LOW_BALANCE") == []
    assert [e.amount_cents for e in cards.outbox("TOP_UP_SUCCEEDED")] == [100_00, 100_00]
    cards.assert_invariants()


def test_declined_auto_top_up_fails_books_nothing_and_sets_failed(cards_any: CardStack) -> None:
    cards = cards_any
    cards.admin.upsert_organisation(7, "Bridge Club")
    cards.admin.adjust(25_00, "opening credit", member_id=6)
    assert cards.auto_top_up_on(6, number=DECLINED_CARD).status == ON  # saving the card works; charging fails
    before, postings_before = cards.balances(), cards.posting_count()

    resp = cards.app.pay(6, 40_00, organisation_id=7, route_code="EVT")
    assert resp.status == pb.FAILED
    assert "declined" in resp.failure_reason
    assert cards.balances() == before and cards.posting_count() == postings_before
    assert cards.app.get_balance(member_id=6).auto_top_up_status == FAILED
    [failed] = cards.outbox("AUTO_TOP_UP_FAILED")
    assert failed.member_id == 6 and failed.amount_cents == 100_00 and failed.route_code == "EVT"
    assert cards.outbox("PAYMENT_SUCCEEDED") == []
    # FAILED is not ON: the next short Pay asks for a card payment instead
    assert cards.app.pay(6, 40_00, organisation_id=7).status == pb.REQUIRES_CARD_PAYMENT
    cards.assert_invariants()


def test_card_needing_authentication_off_session_fails_cleanly(cards: CardStack) -> None:
    """localstripe will not complete a SetupIntent for a 3-D Secure card, so the
    setup_intent.succeeded event is posted signed, as Stripe would send it."""
    cards.admin.upsert_organisation(7, "Bridge Club")
    cards.admin.adjust(30_00, "opening credit", member_id=8)
    setup = cards.app.call("SetupAutoTopUp", pb.SetupAutoTopUpRequest(
        idempotency_key=new_idempotency_key(), member_id=8, amount_cents=50_00))
    assert setup.status == PENDING
    pm = cards.new_card(THREE_D_SECURE_CARD)
    status, body = post_signed(cards.bridge.webhook_url, "setup_intent.succeeded", {
        "id": setup.setup_intent_id, "object": "setup_intent", "status": "succeeded",
        "customer": setup.customer_id, "payment_method": pm})
    assert status == 200, body
    assert cards.app.get_balance(member_id=8).auto_top_up_status == ON
    assert cards.stripe.v1.payment_methods.retrieve(pm).customer == setup.customer_id  # attached by the server

    resp = cards.app.pay(8, 60_00, organisation_id=7)
    assert resp.status == pb.FAILED and "authenticate" in resp.failure_reason
    assert cards.app.balance_cents(member_id=8) == 30_00
    assert cards.app.get_balance(member_id=8).auto_top_up_status == FAILED
    assert len(cards.outbox("AUTO_TOP_UP_FAILED")) == 1


def test_transfer_uses_auto_top_up(cards: CardStack) -> None:
    cards.admin.adjust(10_00, "opening credit", member_id=9)
    cards.auto_top_up_on(9, amount_cents=50_00)  # tops up $50 at once: $10 is below the limit
    assert cards.app.balance_cents(member_id=9) == 60_00
    resp = cards.app.transfer(10, 100_00, from_member_id=9)
    # 60 + x − 100 ≥ 20 → x ≥ 60 → $100 (two auto amounts)
    assert resp.topped_up_cents == 100_00
    assert resp.from_balance_cents == 60_00 and resp.to_balance_cents == 100_00
    cards.assert_invariants()


def test_top_up_above_one_charge_fails_with_a_reason(cards: CardStack) -> None:
    cards.admin.upsert_organisation(7, "Bridge Club")
    cards.admin.adjust(30_00, "opening credit", member_id=11)
    cards.auto_top_up_on(11, amount_cents=50_00)
    resp = cards.app.pay(11, 2_500_00, organisation_id=7)
    assert resp.status == pb.FAILED and "2,000.00" in resp.failure_reason
    assert cards.app.balance_cents(member_id=11) == 30_00
    assert cards.app.get_balance(member_id=11).auto_top_up_status == ON  # no card was charged


def test_update_and_cancel_auto_top_up_detaches_the_card_at_stripe(cards: CardStack) -> None:
    cards.admin.adjust(50_00, "opening credit", member_id=12)
    cards.auto_top_up_on(12)
    updated = cards.app.call("UpdateAutoTopUp", pb.UpdateAutoTopUpRequest(
        idempotency_key=new_idempotency_key(), member_id=12, amount_cents=75_00))
    assert updated.status == ON and updated.amount_cents == 75_00
    with pytest.raises(grpc.RpcError) as bad:
        cards.app.call("UpdateAutoTopUp", pb.UpdateAutoTopUpRequest(
            idempotency_key=new_idempotency_key(), member_id=12, amount_cents=10_00))
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    with cards.server.db.engine.connect() as conn:
        from sqlalchemy import select

        from server.ledger.schema import member_cards
        pm = conn.execute(select(member_cards.c.payment_method_id).where(member_cards.c.member_id == 12)).scalar()
    assert cards.stripe.v1.payment_methods.retrieve(pm).customer  # attached while ON

    cancelled = cards.app.call("CancelAutoTopUp", pb.CancelAutoTopUpRequest(
        idempotency_key=new_idempotency_key(), member_id=12))
    assert cancelled.status == OFF
    assert cards.stripe.v1.payment_methods.retrieve(pm).customer is None  # detached at Stripe
    assert cards.app.get_balance(member_id=12).auto_top_up_status == OFF
    with pytest.raises(grpc.RpcError) as err:
        cards.app.call("ConfirmAutoTopUp", pb.ConfirmAutoTopUpRequest(member_id=12))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_setup_reuses_the_members_stripe_customer(cards: CardStack) -> None:
    first = cards.app.call("SetupAutoTopUp", pb.SetupAutoTopUpRequest(
        idempotency_key=new_idempotency_key(), member_id=13))
    second = cards.app.call("SetupAutoTopUp", pb.SetupAutoTopUpRequest(
        idempotency_key=new_idempotency_key(), member_id=13))
    assert first.customer_id == second.customer_id and first.customer_id.startswith("cus_")
    assert first.setup_intent_id != second.setup_intent_id
    with pytest.raises(grpc.RpcError) as err:
        cards.app.call("SetupAutoTopUp", pb.SetupAutoTopUpRequest(
            idempotency_key=new_idempotency_key(), member_id=13, amount_cents=2_000_01))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_short_pay_to_an_unknown_organisation_charges_no_card(cards: CardStack) -> None:
    with pytest.raises(grpc.RpcError) as err:
        cards.app.pay(14, 60_00, organisation_id=404)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with cards.server.db.engine.connect() as conn:
        from sqlalchemy import func, select

        from server.ledger.schema import card_payments
        assert conn.execute(select(func.count()).select_from(card_payments)).scalar_one() == 0


def test_crash_between_the_charge_and_the_booking_is_recovered_by_the_webhook(cards: CardStack) -> None:
    """The card is charged, then the process dies before its booking commits: the pending row written
    before the charge, and the key the PaymentIntent carries, let the webhook credit it, once."""
    import secrets

    from server.services import auto_top_up

    cards.admin.adjust(30_00, "opening credit", member_id=15)
    cards.auto_top_up_on(15, amount_cents=50_00)
    servicer = cards.server.server.servicer

    class Crash(Exception):
        pass

    def crash(conn, applied):  # noqa: ANN001, ANN202
        raise Crash()

    ref = "cobalt-crash-" + secrets.token_hex(8)
    with pytest.raises(Crash):
        auto_top_up.charge(servicer.db, servicer.gateway, 15, 50_00, ref, "app-svc", crash, lambda *a: None)
    assert cards.app.balance_cents(member_id=15) == 30_00  # the booking rolled back with the crash

    wait_until(lambda: cards.app.balance_cents(member_id=15) == 80_00, what="the webhook to credit the charge")
    assert [e.amount_cents for e in cards.outbox("TOP_UP_SUCCEEDED")] == [50_00]
    with cards.server.db.engine.connect() as conn:
        from sqlalchemy import select

        from server.ledger.schema import card_payments
        rows = list(conn.execute(select(card_payments.c.payment_intent_id, card_payments.c.status)
                                 .where(card_payments.c.member_id == 15)))
    assert len(rows) == 1 and rows[0].status == "succeeded" and rows[0].payment_intent_id.startswith("pi_")
    assert cards.confirm_card_payment(rows[0].payment_intent_id).applied_now is False
    cards.assert_invariants()


def test_card_payment_needing_3d_secure_books_only_after_authentication(cards: CardStack) -> None:
    cards.admin.upsert_organisation(7, "Bridge Club")
    resp = cards.app.pay(16, 45_00, organisation_id=7, route_code="UPP")
    assert cards.pay_intent_with_card(resp.payment_intent_id, THREE_D_SECURE_CARD) == "requires_action"
    state = cards.confirm_card_payment(resp.payment_intent_id)
    assert state.status == pb.CARD_PAYMENT_PENDING and not state.applied_now
    assert cards.posting_count() == 0
    # the member passes 3-D Secure in the browser (localstripe's stand-in for the bank's page)
    cards.stripe.raw_request("post", f"/v1/payment_intents/{resp.payment_intent_id}/_authenticate",
                             client_secret=resp.client_secret, success="true")
    assert cards.confirm_card_payment(resp.payment_intent_id).applied_now is True
    assert cards.app.balance_cents(organisation_id=7) == 45_00
    assert [e.route_code for e in cards.outbox("PAYMENT_SUCCEEDED")] == ["UPP"]


def test_concurrent_retries_of_a_pay_with_auto_top_up_book_it_once_and_lose_no_card_money(
        cards_any: CardStack) -> None:
    """The same Pay (one idempotency key) sent three times at once. localstripe ignores idempotency
    keys, so each attempt may charge the card: the Pay is booked once, every charge is credited once."""
    import threading

    cards = cards_any
    cards.admin.upsert_organisation(7, "Bridge Club")
    cards.admin.adjust(30_00, "opening credit", member_id=17)
    setup = cards.auto_top_up_on(17, amount_cents=50_00)
    assert setup.status == ON
    responses: list = []
    key = new_idempotency_key()

    def pay() -> None:
        try:
            responses.append(cards.app.pay(17, 120_00, organisation_id=7, idempotency_key=key))
        except grpc.RpcError as err:
            responses.append(f"{err.code().name}: {err.details()}")

    threads = [threading.Thread(target=pay) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    # whichever attempt committed first answers for all (one may have found the others' top-ups
    # already credited and paid from the balance)
    assert len(responses) == 3 and all(r == responses[0] for r in responses), responses
    assert responses[0].status == pb.SUCCEEDED
    assert cards.app.balance_cents(organisation_id=7) == 120_00  # the Pay, once

    with cards.server.db.engine.connect() as conn:
        from sqlalchemy import select

        from server.ledger.schema import member_cards
        customer = conn.execute(select(member_cards.c.stripe_customer_id)
                                .where(member_cards.c.member_id == 17)).scalar()
    charged = [pi.amount for pi in cards.stripe.v1.payment_intents.list(params={"limit": 100}).data
               if pi.customer == customer and pi.status == "succeeded"]
    assert charged and all(amount == 150_00 for amount in charged)
    wait_until(lambda: sum(e.amount_cents for e in cards.outbox("TOP_UP_SUCCEEDED")) == sum(charged),
               what="every card charge to be credited (some only by their webhook)")
    credited = [e.amount_cents for e in cards.outbox("TOP_UP_SUCCEEDED")]
    assert sorted(credited) == sorted(charged)
    assert cards.app.balance_cents(member_id=17) == 30_00 + sum(charged) - 120_00
    cards.assert_invariants()
