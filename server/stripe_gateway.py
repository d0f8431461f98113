"""The only module that talks to Stripe (and the only one that imports `stripe`).

Every call that creates something at Stripe carries an idempotency key derived from ours. Calls are
blocking and are made from the worker pool, never inside a database transaction. Stripe's errors
become domain errors: unreachable → Unavailable; a declined card or one that needs authentication
→ CardFailed (the caller decides what failing means for its flow).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import stripe

from server.domain.errors import DomainError, FailedPrecondition, InvalidArgument, NotFound, Unavailable

T = TypeVar("T")

# Stripe's library logs every request at INFO; one line per RPC is ours to write.
logging.getLogger("stripe").setLevel(logging.WARNING)

STRIPE_TIMEOUT_S = 20
STRIPE_NETWORK_RETRIES = 1  # Stripe's library retries safely: the idempotency key is the same
NOT_CONFIGURED = "Stripe is not configured (STRIPE_SECRET_KEY is empty)"


def stripe_key(*parts: object) -> str:
    """A Stripe idempotency key derived from ours (bounded length, no raw principal or key)."""
    return "cobalt-" + hashlib.sha256(":".join(str(p) for p in parts).encode()).hexdigest()[:40]


class CardFailed(DomainError):
    """The card was declined or needs the member to authenticate (off-session)."""

    code = "FAILED_PRECONDITION"

    def __init__(self, reason: str, payment_intent_id: str = "", needs_authentication: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.payment_intent_id = payment_intent_id
        self.needs_authentication = needs_authentication


@dataclass(frozen=True)
class Intent:
    """The parts of a PaymentIntent we use."""

    id: str
    status: str
    amount_cents: int
    client_secret: str = ""
    customer: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    failure_reason: str = ""

    @property
    def succeeded(self) -> bool:
        return self.status == "succeeded"

    @property
    def failed(self) -> bool:
        # a confirmation that failed sends the intent back to requires_payment_method with an error
        return self.status == "canceled" or (self.status == "requires_payment_method" and bool(self.failure_reason))


@dataclass(frozen=True)
class Setup:
    id: str
    status: str
    client_secret: str = ""
    customer: str = ""
    payment_method: str = ""


def _plain(obj: Any) -> dict:
    """Stripe's objects are not dicts: use their plain form."""
    return obj.to_dict() if hasattr(obj, "to_dict") else dict(obj)


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return str(value.get("id") or "")
    return getattr(value, "id", "") or ""


def _intent(obj: Any) -> Intent:
    obj = _plain(obj)
    error = obj.get("last_payment_error") or {}
    reason = error.get("message") or error.get("code") or "" if error else ""
    return Intent(
        id=obj["id"],
        status=obj.get("status") or "",
        amount_cents=int(obj.get("amount") or 0),
        client_secret=obj.get("client_secret") or "",
        customer=_text(obj.get("customer")),
        metadata={k: str(v) for k, v in (obj.get("metadata") or {}).items()},
        failure_reason=reason,
    )


def intent_from_event(payload: dict) -> Intent:
    """A PaymentIntent as carried in a webhook event's data.object."""
    return _intent(payload)


def _setup(obj: Any) -> Setup:
    obj = _plain(obj)
    return Setup(id=obj["id"], status=obj.get("status") or "", client_secret=obj.get("client_secret") or "",
                 customer=_text(obj.get("customer")), payment_method=_text(obj.get("payment_method")))


class StripeGateway:
    def __init__(self, secret_key: str, api_base: str = "", currency: str = "aud"):
        self.configured = bool(secret_key)
        self.currency = currency
        self._client: stripe.StripeClient | None = None
        if self.configured:
            self._client = stripe.StripeClient(
                secret_key,
                base_addresses={"api": api_base} if api_base else None,
                max_network_retries=STRIPE_NETWORK_RETRIES,
                http_client=stripe.RequestsClient(timeout=STRIPE_TIMEOUT_S),
            )

    def require(self) -> None:
        if not self.configured:
            raise FailedPrecondition(NOT_CONFIGURED)

    @property
    def v1(self) -> Any:
        self.require()
        assert self._client is not None
        return self._client.v1

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except stripe.CardError as exc:
            pi = getattr(exc.error, "payment_intent", None) if exc.error else None
            code = exc.code or ""
            raise CardFailed(exc.user_message or str(exc) or "the card was declined", _text(pi),
                             needs_authentication=code == "authentication_required") from exc
        except stripe.APIConnectionError as exc:
            raise Unavailable(f"Stripe is unreachable ({what}); nothing was charged or booked") from exc
        except stripe.AuthenticationError as exc:
            raise FailedPrecondition("Stripe refused the configured secret key") from exc
        except stripe.RateLimitError as exc:
            raise Unavailable(f"Stripe is rate limiting ({what}); retry later") from exc
        except stripe.InvalidRequestError as exc:
            if exc.http_status == 404:
                raise NotFound(f"Stripe does not know this object ({what})") from exc
            raise InvalidArgument(f"Stripe refused the request ({what}): {exc.user_message or exc}") from exc
        except stripe.StripeError as exc:
            raise Unavailable(f"Stripe failed ({what}): {exc.user_message or type(exc).__name__}") from exc

    # ---------------------------------------------------------------- customers and cards
    def create_customer(self, member_id: int, idempotency_key: str) -> str:
        customer = self._call("create customer", lambda: self.v1.customers.create(
            params={"metadata": {"member_id": str(member_id)}}, options={"idempotency_key": idempotency_key}))
        return customer.id

    def create_setup_intent(self, customer_id: str, member_id: int, idempotency_key: str) -> Setup:
        return _setup(self._call("create setup intent", lambda: self.v1.setup_intents.create(
            params={"customer": customer_id, "usage": "off_session", "payment_method_types": ["card"],
                    "metadata": {"member_id": str(member_id)}},
            options={"idempotency_key": idempotency_key})))

    def retrieve_setup_intent(self, setup_intent_id: str) -> Setup:
        return _setup(self._call("retrieve setup intent", lambda: self.v1.setup_intents.retrieve(setup_intent_id)))

    def attach_card(self, payment_method_id: str, customer_id: str) -> None:
        """Make sure the card is attached to the customer (a confirmed SetupIntent attaches it at
        Stripe; a double may not)."""
        pm = self._call("retrieve card", lambda: self.v1.payment_methods.retrieve(payment_method_id))
        if _text(_plain(pm).get("customer")) == customer_id:
            return
        self._call("attach card", lambda: self.v1.payment_methods.attach(
            payment_method_id, params={"customer": customer_id}))

    def detach_card(self, payment_method_id: str) -> None:
        try:
            self._call("detach card", lambda: self.v1.payment_methods.detach(payment_method_id))
        except (NotFound, InvalidArgument):
            pass  # already detached or gone: the goal is reached

    def card_customer(self, payment_method_id: str) -> str:
        pm = self._call("retrieve card", lambda: self.v1.payment_methods.retrieve(payment_method_id))
        return _text(_plain(pm).get("customer"))

    # ---------------------------------------------------------------- payments
    def create_payment_intent(self, amount_cents: int, metadata: dict[str, str], idempotency_key: str,
                              customer_id: str = "") -> Intent:
        """A PaymentIntent the member confirms with a card (on-session)."""
        params: dict[str, Any] = {"amount": amount_cents, "currency": self.currency, "metadata": metadata,
                                  "payment_method_types": ["card"]}
        if customer_id:
            params["customer"] = customer_id
        return _intent(self._call("create payment intent", lambda: self.v1.payment_intents.create(
            params=params, options={"idempotency_key": idempotency_key})))

    def charge_saved_card(self, customer_id: str, payment_method_id: str, amount_cents: int,
                          metadata: dict[str, str], idempotency_key: str) -> Intent:
        """Charge the saved card off-session, confirmed now. Raises CardFailed unless it succeeded."""
        intent = _intent(self._call("charge saved card", lambda: self.v1.payment_intents.create(
            params={"amount": amount_cents, "currency": self.currency, "customer": customer_id,
                    "payment_method": payment_method_id, "confirm": True, "off_session": True,
                    "metadata": metadata},
            options={"idempotency_key": idempotency_key})))
        if intent.status == "requires_action":
            # a double answers requires_action where Stripe raises authentication_required
            raise CardFailed("the card needs the member to authenticate", intent.id, needs_authentication=True)
        if not intent.succeeded:
            raise CardFailed(intent.failure_reason or f"the card payment is {intent.status}", intent.id)
        return intent

    def retrieve_payment_intent(self, payment_intent_id: str) -> Intent:
        return _intent(self._call("retrieve payment intent",
                                  lambda: self.v1.payment_intents.retrieve(payment_intent_id)))

    def refund(self, payment_intent_id: str, amount_cents: int, idempotency_key: str) -> str:
        refund = self._call("refund", lambda: self.v1.refunds.create(
            params={"payment_intent": payment_intent_id, "amount": amount_cents},
            options={"idempotency_key": idempotency_key}))
        return refund.id


# ---------------------------------------------------------------- webhooks
WEBHOOK_TOLERANCE_S = 300


class BadWebhook(ValueError):
    """The webhook is not from Stripe (signature) or not an event (JSON)."""


def verify_webhook(payload: bytes, signature_header: str | None, secret: str,
                   tolerance_s: int = WEBHOOK_TOLERANCE_S) -> dict:
    """Check Stripe-Signature (timestamp within tolerance, HMAC-SHA256 with the endpoint secret) and
    parse the event. Raises BadWebhook."""
    if not signature_header:
        raise BadWebhook("missing Stripe-Signature header")
    try:
        event = stripe.Webhook.construct_event(payload, signature_header, secret, tolerance=tolerance_s)
    except stripe.SignatureVerificationError as exc:
        raise BadWebhook(f"bad signature: {exc.user_message or exc}") from exc
    except ValueError as exc:
        raise BadWebhook("the body is not JSON") from exc
    data = event.to_dict() if hasattr(event, "to_dict") else dict(event)
    if not isinstance(data.get("id"), str) or not isinstance(data.get("type"), str):
        raise BadWebhook("the body is not a Stripe event")
    return data
