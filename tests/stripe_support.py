"""Fixtures for the card-money tests: localstripe on 127.0.0.1 (its disk store off), a payments
server configured for it, and the webhook bridge over HTTP, with localstripe's webhook aimed at the
bridge. One localstripe and one stack per session; tables are emptied per test.

Also: the member's side of Stripe (confirming a PaymentIntent or SetupIntent with a test card, as
Stripe.js would), and posting events signed exactly as Stripe signs them.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import secrets
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import stripe
from conftest import TOKENS, RunningServer, _truncate_all, record_backend, run_in_own_loop, start_server
from sqlalchemy import func, select

from clients.payments_client import PaymentsClient, new_idempotency_key
from cobalt.payments.v1 import payments_pb2 as pb
from server.ledger.schema import accounts, outbox_events, postings, stripe_events
from server.localdev import configure_localstripe_webhook, start_localstripe_process
from webhook_bridge.app import Bridge, BridgeConfig

WEBHOOK_SECRET = "whsec_test_" + secrets.token_hex(12)
SECRET_KEY = "sk_test_cobalt_payments"
GOOD_CARD = "4242424242424242"
DECLINED_CARD = "4000000000000341"
THREE_D_SECURE_CARD = "4000002500003155"


# ---------------------------------------------------------------- localstripe
@dataclass
class LocalStripe:
    process: subprocess.Popen
    api_base: str

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def client(self) -> stripe.StripeClient:
        return stripe.StripeClient(SECRET_KEY, base_addresses={"api": self.api_base}, max_network_retries=0)


def start_localstripe() -> LocalStripe:
    proc, base = start_localstripe_process()
    return LocalStripe(proc, base)


@pytest.fixture(scope="session")
def localstripe() -> Iterator[LocalStripe]:
    ls = start_localstripe()
    yield ls
    ls.stop()


# ---------------------------------------------------------------- the bridge
@dataclass
class RunningBridge:
    bridge: Bridge
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread
    url: str

    @property
    def webhook_url(self) -> str:
        return self.url + "/stripe/webhook"

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.bridge.stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)


def start_bridge(grpc_target: str, secret: str = WEBHOOK_SECRET) -> RunningBridge:
    bridge = Bridge(BridgeConfig(http_addr="127.0.0.1:0", grpc_target=grpc_target, token=TOKENS["bridge"],
                                 webhook_secret=secret))
    loop, thread, port = run_in_own_loop(bridge.start, "bridge")
    return RunningBridge(bridge, loop, thread, f"http://127.0.0.1:{port}")


def start_server_at(database_url: str, addr: str, **overrides) -> RunningServer:  # noqa: ANN003
    """A server on a fixed address (to stop it and start it again where the bridge points)."""
    return start_server(database_url, "postgresql", addr=addr, **overrides)


def stop_if_running(server: RunningServer) -> None:
    if server.thread.is_alive():
        server.stop()


def stripe_settings(ls: LocalStripe) -> dict:
    return dict(stripe_secret_key=SECRET_KEY, stripe_api_base=ls.api_base, stripe_webhook_secret=WEBHOOK_SECRET)


# ---------------------------------------------------------------- the stack
@dataclass
class CardStack:
    server: RunningServer
    bridge: RunningBridge
    localstripe: LocalStripe
    app: PaymentsClient
    admin: PaymentsClient
    stripe: stripe.StripeClient

    # ---- the member's side of Stripe (what Stripe.js does in a browser)
    def new_card(self, number: str = GOOD_CARD) -> str:
        pm = self.stripe.v1.payment_methods.create(params={
            "type": "card", "card": {"number": number, "exp_month": 12, "exp_year": 2031, "cvc": "123"}})
        return pm.id

    def pay_intent_with_card(self, payment_intent_id: str, number: str = GOOD_CARD) -> str:
        """Confirm a PaymentIntent with a test card; returns its status (a decline is 'declined')."""
        self.stripe.v1.payment_intents.update(payment_intent_id, params={"payment_method": self.new_card(number)})
        try:
            return self.stripe.v1.payment_intents.confirm(payment_intent_id).status
        except stripe.CardError:
            return "declined"

    def confirm_setup_with_card(self, setup_intent_id: str, number: str = GOOD_CARD) -> str:
        pm = self.new_card(number)
        self.stripe.v1.setup_intents.confirm(setup_intent_id, params={"payment_method": pm})
        return pm

    # ---- gRPC helpers
    def start_top_up(self, member_id: int, amount_cents: int, key: str | None = None,
                     client: PaymentsClient | None = None) -> pb.StartTopUpResponse:
        return (client or self.app).call("StartTopUp", pb.StartTopUpRequest(
            idempotency_key=key or new_idempotency_key(), member_id=member_id, amount_cents=amount_cents))

    def confirm_card_payment(self, payment_intent_id: str) -> pb.ConfirmCardPaymentResponse:
        return self.app.call("ConfirmCardPayment", pb.ConfirmCardPaymentRequest(payment_intent_id=payment_intent_id))

    def top_up_now(self, member_id: int, amount_cents: int, client: PaymentsClient | None = None) -> str:
        """A manual top-up paid with a good card and confirmed by the client; returns the PaymentIntent id."""
        started = self.start_top_up(member_id, amount_cents, client=client)
        assert self.pay_intent_with_card(started.payment_intent_id) == "succeeded"
        assert self.confirm_card_payment(started.payment_intent_id).status == pb.CARD_PAYMENT_SUCCEEDED
        return started.payment_intent_id

    def auto_top_up_on(self, member_id: int, amount_cents: int = 0, number: str = GOOD_CARD) -> pb.AutoTopUpResponse:
        setup = self.app.call("SetupAutoTopUp", pb.SetupAutoTopUpRequest(
            idempotency_key=new_idempotency_key(), member_id=member_id, amount_cents=amount_cents))
        self.confirm_setup_with_card(setup.setup_intent_id, number)
        return self.app.call("ConfirmAutoTopUp", pb.ConfirmAutoTopUpRequest(member_id=member_id))

    # ---- looking at the ledger
    def outbox(self, kind: str | None = None) -> list:
        with self.server.db.engine.connect() as conn:
            q = select(outbox_events).order_by(outbox_events.c.sequence)
            if kind:
                q = q.where(outbox_events.c.kind == kind)
            return list(conn.execute(q))

    def posting_count(self) -> int:
        with self.server.db.engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(postings)).scalar_one()

    def stripe_event_count(self, event_type: str | None = None) -> int:
        with self.server.db.engine.connect() as conn:
            q = select(func.count()).select_from(stripe_events)
            if event_type:
                q = q.where(stripe_events.c.type == event_type)
            return conn.execute(q).scalar_one()

    def stripe_event_applied(self, event_id: str) -> bool:
        with self.server.db.engine.connect() as conn:
            return conn.execute(select(stripe_events.c.event_id).where(stripe_events.c.event_id == event_id)
                                ).first() is not None

    def localstripe_event_id(self, event_type: str, object_id: str) -> str | None:
        """The id of the event localstripe made about object_id (to wait for its webhook)."""
        events = self.stripe.v1.events.list(params={"type": event_type, "limit": 100})
        for event in events.data:
            if event.to_dict()["data"]["object"].get("id") == object_id:
                return event.id
        return None

    def wait_for_webhook(self, event_type: str, object_id: str) -> str:
        """Wait until localstripe's webhook about object_id went through the bridge and was applied."""
        event_id = wait_until(lambda: self.localstripe_event_id(event_type, object_id),
                              what=f"localstripe to make a {event_type} event")
        wait_until(lambda: self.stripe_event_applied(event_id), what=f"the {event_type} webhook")
        return event_id

    def balances(self) -> dict[int, int]:
        with self.server.db.engine.connect() as conn:
            return {r.id: r.balance_cents for r in conn.execute(select(accounts.c.id, accounts.c.balance_cents))}

    def assert_invariants(self) -> None:
        """Money is conserved, every balance equals its postings, no member is below zero."""
        with self.server.db.engine.connect() as conn:
            rows = list(conn.execute(select(accounts.c.id, accounts.c.kind, accounts.c.balance_cents)))
            sums = dict(conn.execute(select(postings.c.account_id, func.sum(postings.c.amount_cents))
                                     .group_by(postings.c.account_id)).all())
        assert sum(r.balance_cents for r in rows) == 0
        for r in rows:
            assert r.balance_cents == (sums.get(r.id) or 0)
            if r.kind == 1:
                assert r.balance_cents >= 0


def wait_until(check: Callable[[], object], timeout_s: float = 8.0, what: str = "condition") -> object:
    """Poll (localstripe's webhooks come about 1 s late) until check() is truthy."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)


def _card_stack(localstripe: LocalStripe, database_url: str, backend: str) -> Iterator[CardStack]:
    server = start_server(database_url, backend, **stripe_settings(localstripe))
    bridge = start_bridge(server.target)
    # localstripe sends every event to every configured webhook; a server ignores intents not its own
    configure_localstripe_webhook(localstripe.api_base, bridge.webhook_url, WEBHOOK_SECRET, name=f"bridge-{backend}")
    with server.client("app") as app, server.client("admin") as admin:
        yield CardStack(server, bridge, localstripe, app, admin, localstripe.client())
    bridge.stop()
    server.stop()


@pytest.fixture(scope="session")
def card_stack_postgresql(localstripe: LocalStripe, postgres_url: str) -> Iterator[CardStack]:
    yield from _card_stack(localstripe, postgres_url, "postgresql")


def _fresh(stack: CardStack) -> CardStack:
    _truncate_all(stack.server.db)
    return stack


@pytest.fixture
def cards(card_stack_postgresql: CardStack) -> Iterator[CardStack]:
    """The card stack, with empty tables."""
    yield _fresh(card_stack_postgresql)
    record_backend("postgresql")


@pytest.fixture
def cards_any(cards: CardStack) -> CardStack:
    """The same as `cards` (kept for the files that name it)."""
    return cards


# ---------------------------------------------------------------- signed events, as Stripe sends them
def stripe_signature(payload: bytes, secret: str = WEBHOOK_SECRET, timestamp: int | None = None) -> str:
    t = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{t}.".encode() + payload, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def event_body(event_type: str, obj: dict, event_id: str | None = None) -> bytes:
    return json.dumps({"id": event_id or "evt_" + secrets.token_hex(8), "object": "event", "type": event_type,
                       "created": int(time.time()), "api_version": "2024-06-20",
                       "data": {"object": obj}}).encode()


def post_webhook(url: str, body: bytes, signature: str | None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if signature is not None:
        headers["Stripe-Signature"] = signature
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def post_signed(url: str, event_type: str, obj: dict, event_id: str | None = None,
                timestamp: int | None = None) -> tuple[int, dict]:
    body = event_body(event_type, obj, event_id)
    return post_webhook(url, body, stripe_signature(body, timestamp=timestamp))
