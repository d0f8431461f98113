"""The webhook bridge over HTTP (SPEC §7): signature checks, forwarding, dedupe, and the server
being down. Events are posted signed exactly as Stripe signs them (t=…,v1=HMAC-SHA256 of "t.payload")."""

from __future__ import annotations

import json
import secrets
import threading
import time
import urllib.request

import pytest
from conftest import scratch_database
from stripe_support import (
    CardStack,
    event_body,
    post_signed,
    post_webhook,
    start_bridge,
    start_server_at,
    stop_if_running,
    stripe_settings,
    stripe_signature,
    wait_until,
)

from cobalt.payments.v1 import payments_pb2 as pb
from server.localdev import free_port

pytestmark = pytest.mark.stripe


def intent_object(cards: CardStack, payment_intent_id: str, status: str = "succeeded") -> dict:
    """The PaymentIntent as Stripe would put it in an event (taken from the Stripe double)."""
    obj = cards.stripe.v1.payment_intents.retrieve(payment_intent_id).to_dict()
    obj["status"] = status
    if status == "requires_payment_method":
        obj["last_payment_error"] = {"code": "card_declined", "message": "Your card was declined."}
    return obj


def test_healthz(cards: CardStack) -> None:
    with urllib.request.urlopen(cards.bridge.url + "/healthz", timeout=5) as resp:
        assert resp.status == 200 and json.loads(resp.read())["status"] == "ok"


def test_unverifiable_webhooks_get_400_and_nothing_is_forwarded(cards: CardStack) -> None:
    started = cards.start_top_up(1, 100_00)
    body = event_body("payment_intent.succeeded", intent_object(cards, started.payment_intent_id), "evt_unverified")
    url = cards.bridge.webhook_url

    bad_mac = stripe_signature(body, secret="whsec_wrong")
    assert post_webhook(url, body, bad_mac)[0] == 400
    assert post_webhook(url, body, None)[0] == 400  # no Stripe-Signature header
    assert post_webhook(url, body, "garbage")[0] == 400
    stale = stripe_signature(body, timestamp=int(time.time()) - 301)  # outside the 300 s tolerance
    assert post_webhook(url, body, stale)[0] == 400
    tampered = body.replace(b"10000", b"99999")
    assert post_webhook(url, tampered, stripe_signature(body))[0] == 400
    not_json = b'{"id": "evt_1", "type": "payment_intent.succeeded", '
    status, answer = post_webhook(url, not_json, stripe_signature(not_json))
    assert status == 400 and "JSON" in answer["message"]

    assert not cards.stripe_event_applied("evt_unverified")
    assert not cards.stripe_event_applied("evt_1")
    assert cards.app.balance_cents(member_id=1) == 0
    assert cards.posting_count() == 0


def test_duplicate_and_out_of_order_events_apply_once(cards_any: CardStack) -> None:
    cards = cards_any
    started = cards.start_top_up(2, 100_00)
    url = cards.bridge.webhook_url
    succeeded = intent_object(cards, started.payment_intent_id)
    event_id = "evt_" + secrets.token_hex(8)

    assert post_signed(url, "payment_intent.succeeded", succeeded, event_id) == (200, {"status": 200,
                                                                                       "message": "applied"})
    status, answer = post_signed(url, "payment_intent.succeeded", succeeded, event_id)
    assert status == 200 and answer["message"].startswith("duplicate")
    # another delivery of the same fact under another event id changes nothing either
    assert post_signed(url, "payment_intent.succeeded", succeeded, "evt_again_" + event_id)[0] == 200
    # a failure that was sent earlier but arrives late changes nothing
    late = intent_object(cards, started.payment_intent_id, "requires_payment_method")
    assert post_signed(url, "payment_intent.payment_failed", late, "evt_late_" + event_id,
                       timestamp=int(time.time()) - 60)[0] == 200

    assert cards.app.balance_cents(member_id=2) == 100_00
    assert len(cards.outbox("TOP_UP_SUCCEEDED")) == 1
    assert cards.outbox("PAYMENT_FAILED") == [] and cards.outbox("AUTO_TOP_UP_FAILED") == []
    assert all(cards.stripe_event_applied(e) for e in (event_id, "evt_again_" + event_id, "evt_late_" + event_id))


def test_same_event_delivered_concurrently_applies_once(cards_any: CardStack) -> None:
    cards = cards_any
    started = cards.start_top_up(3, 80_00)
    event_id = "evt_" + secrets.token_hex(8)
    body = event_body("payment_intent.succeeded", intent_object(cards, started.payment_intent_id), event_id)
    signature = stripe_signature(body)
    statuses: list[int] = []
    threads = [threading.Thread(target=lambda: statuses.append(post_webhook(cards.bridge.webhook_url, body,
                                                                            signature)[0])) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert statuses == [200] * 4
    assert cards.app.balance_cents(member_id=3) == 80_00
    assert cards.stripe_event_applied(event_id)
    assert len(cards.outbox("TOP_UP_SUCCEEDED")) == 1


def test_a_card_payment_that_failed_then_succeeded_books_the_pay_once(cards_any: CardStack) -> None:
    """A PaymentIntent can be retried with another card: failed, then succeeded."""
    cards = cards_any
    cards.admin.upsert_organisation(7, "Bridge Club")
    resp = cards.app.pay(4, 60_00, organisation_id=7, route_code="EVT")
    url = cards.bridge.webhook_url
    failed = intent_object(cards, resp.payment_intent_id, "requires_payment_method")
    assert post_signed(url, "payment_intent.payment_failed", failed)[0] == 200
    assert [e.route_code for e in cards.outbox("PAYMENT_FAILED")] == ["EVT"]
    succeeded = intent_object(cards, resp.payment_intent_id)
    assert post_signed(url, "payment_intent.succeeded", succeeded)[0] == 200
    assert post_signed(url, "payment_intent.succeeded", succeeded)[0] == 200
    assert cards.app.balance_cents(organisation_id=7) == 60_00
    assert [e.route_code for e in cards.outbox("PAYMENT_SUCCEEDED")] == ["EVT"]
    cards.assert_invariants()


def test_other_events_are_acknowledged(cards: CardStack) -> None:
    status, answer = post_signed(cards.bridge.webhook_url, "customer.created", {"id": "cus_x", "object": "customer"})
    assert status == 200 and answer["message"] == "acknowledged"
    status, answer = post_signed(cards.bridge.webhook_url, "payment_intent.succeeded",
                                 {"id": "pi_notours", "object": "payment_intent", "amount": 100, "metadata": {}})
    assert status == 200 and answer["message"] == "acknowledged"
    # an intent that carries our metadata but a key this database never issued (another deployment
    # sharing the Stripe account) is not credited
    status, answer = post_signed(cards.bridge.webhook_url, "payment_intent.succeeded", {
        "id": "pi_elsewhere", "object": "payment_intent", "amount": 100_00, "status": "succeeded",
        "metadata": {"cobalt_ref": "cobalt-" + "0" * 40, "member_id": "1", "purpose": "manual_top_up"}})
    assert status == 200 and answer["message"] == "acknowledged"
    assert cards.posting_count() == 0


def test_server_down_gives_5xx_and_a_redelivery_applies_once(cards: CardStack, tmp_path) -> None:  # noqa: ANN001
    addr = f"127.0.0.1:{free_port()}"
    database_url = scratch_database()
    server = start_server_at(database_url, addr, **stripe_settings(cards.localstripe))
    bridge = start_bridge(addr)
    try:
        with server.client("app") as app:
            started = app.call("StartTopUp", pb.StartTopUpRequest(idempotency_key="k", member_id=1,
                                                                  amount_cents=100_00))
        body = event_body("payment_intent.succeeded", intent_object(cards, started.payment_intent_id))
        server.stop()

        status, _ = post_webhook(bridge.webhook_url, body, stripe_signature(body))
        assert status >= 500  # Stripe will deliver again

        server = start_server_at(database_url, addr, **stripe_settings(cards.localstripe))
        # Stripe delivers again (with backoff) until it gets a 2xx
        delivered = wait_until(lambda: (lambda r: r if r[0] == 200 else None)(
            post_webhook(bridge.webhook_url, body, stripe_signature(body))), what="a redelivery to get through")
        assert delivered == (200, {"status": 200, "message": "applied"})
        status, answer = post_webhook(bridge.webhook_url, body, stripe_signature(body))
        assert status == 200 and answer["message"].startswith("duplicate")
        with server.client("app") as app:
            assert app.balance_cents(member_id=1) == 100_00
            assert [line.amount_cents for line in app.get_statement(member_id=1).lines] == [100_00]
    finally:
        bridge.stop()
        stop_if_running(server)


def test_webhooks_and_confirmations_racing_credit_once(cards_any: CardStack) -> None:
    """ConfirmCardPayment calls and webhook deliveries (distinct event ids) for one PaymentIntent,
    all at once: the money is credited once (on PostgreSQL the row claim serialises them)."""
    cards = cards_any
    started = cards.start_top_up(5, 90_00)
    assert cards.pay_intent_with_card(started.payment_intent_id) == "succeeded"
    succeeded = intent_object(cards, started.payment_intent_id)
    applied_now: list[bool] = []
    statuses: list[int] = []

    def confirm() -> None:
        applied_now.append(cards.confirm_card_payment(started.payment_intent_id).applied_now)

    def deliver() -> None:
        statuses.append(post_signed(cards.bridge.webhook_url, "payment_intent.succeeded", succeeded)[0])

    threads = [threading.Thread(target=fn) for fn in (confirm, deliver) * 4]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert statuses == [200] * 4 and len(applied_now) == 4
    assert applied_now.count(True) <= 1
    assert cards.app.balance_cents(member_id=5) == 90_00
    assert [e.amount_cents for e in cards.outbox("TOP_UP_SUCCEEDED")] == [90_00]
    cards.assert_invariants()


def test_charge_refunded_is_recorded_and_moves_no_money(cards: CardStack) -> None:
    pi = cards.top_up_now(6, 100_00)
    before = cards.balances()
    charge = {"id": "ch_x", "object": "charge", "payment_intent": pi, "amount": 100_00, "amount_refunded": 0}
    event_id = "evt_" + secrets.token_hex(8)
    status, answer = post_signed(cards.bridge.webhook_url, "charge.refunded", charge, event_id)
    assert status == 200 and answer["message"] == "applied"
    assert cards.stripe_event_applied(event_id)
    assert cards.balances() == before


def test_the_bridge_will_not_start_without_its_secret_and_token(monkeypatch) -> None:  # noqa: ANN001
    from webhook_bridge.app import BridgeConfig

    monkeypatch.setenv("STRIPE_WEBHOOK_SECRET", "")
    monkeypatch.setenv("BRIDGE_TOKEN", "t")
    with pytest.raises(ValueError, match="STRIPE_WEBHOOK_SECRET"):
        BridgeConfig.from_env()
    monkeypatch.setenv("STRIPE_WEBHOOK_SECRET", "whsec_x")
    monkeypatch.setenv("BRIDGE_TOKEN", "")
    with pytest.raises(ValueError, match="BRIDGE_TOKEN"):
        BridgeConfig.from_env()
    monkeypatch.setenv("BRIDGE_TOKEN", "t")
    monkeypatch.setenv("BRIDGE_HTTP_ADDR", "127.0.0.1:9999")
    assert BridgeConfig.from_env().host_port == ("127.0.0.1", 9999)
