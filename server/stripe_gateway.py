"""The only module that talks to Stripe (and the only one that imports `stripe`).

Every call that creates something at Stripe carries an idempotency key derived from ours. Calls are
blocking and are made from the worker pool, never inside a database transaction. Stripe's errors
become domain errors: unreachable → Unavailable; a declined card or one that needs authentication
→ CardFailed (the caller decides what failing means for its flow).
"""

from __future__ import annotations

import hashlib
import json
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
MAX_LIST_PAGES = 20  # of 100: searching a list of Stripe objects stops there
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
    currency: str = ""
    created_s: int = 0

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
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class StripeRefund:
    id: str
    status: str  # succeeded | pending | requires_action | failed | canceled
    amount_cents: int
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def made(self) -> bool:
        """Stripe took it: the card gets the money (a pending refund completes at Stripe)."""
        return self.status in ("succeeded", "pending", "requires_action")


class BadObject(ValueError):
    """A Stripe object (from an event) that does not have the shape Stripe gives it."""


def _plain(obj: Any) -> dict:
    """Stripe's objects are not dicts: use their plain form."""
    return obj.to_dict() if hasattr(obj, "to_dict") else dict(obj)


def _text(value: Any) -> str:
    """An id, or an expanded object's id; "" for anything else."""
    if isinstance(value, dict):
        value = value.get("id")
    elif value is not None and not isinstance(value, str):
        value = getattr(value, "id", "")
    return _checked("an id", value) if isinstance(value, str) else ""


MAX_STRIPE_TEXT_CHARS = 500  # Stripe's own limit on a metadata value; its ids and codes are far shorter


def _checked(what: str, value: str) -> str:
    """Text from an object that came in an event: it is looked up and stored, so nothing a database or
    a log line cannot hold (NUL, control characters, lone surrogates), and nothing longer than Stripe writes."""
    if len(value) > MAX_STRIPE_TEXT_CHARS or not value.isprintable():
        raise BadObject(f"{what} is not text Stripe writes")
    return value


def _str(obj: dict, key: str) -> str:
    value = obj.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BadObject(f"{key} is not a string")
    return _checked(key, value)


def _reason(value: Any) -> str:
    """A failure message is shown, not looked up: what cannot be shown is left out."""
    if not isinstance(value, str):
        return ""
    return "".join(ch if ch.isprintable() else " " for ch in value[:MAX_STRIPE_TEXT_CHARS]).strip()


def _cents(obj: dict, key: str) -> int:
    value = obj.get(key)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        raise BadObject(f"{key} is not an amount in cents")
    return value


def _metadata(obj: dict) -> dict[str, str]:
    value = obj.get("metadata")
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadObject("metadata is not an object")
    return {_checked("a metadata key", str(k)): _checked("a metadata value", v if isinstance(v, str) else str(v))
            for k, v in value.items()}


def _object_id(obj: dict) -> str:
    found = obj.get("id")
    if not isinstance(found, str) or not found:
        raise BadObject("the object has no id")
    return _checked("id", found)


def _intent(obj: Any) -> Intent:
    obj = _plain(obj)
    error = obj.get("last_payment_error") or {}
    if not isinstance(error, dict):
        raise BadObject("last_payment_error is not an object")
    reason = _reason(error.get("message")) or _reason(error.get("code")) if error else ""
    return Intent(
        id=_object_id(obj),
        status=_str(obj, "status"),
        amount_cents=_cents(obj, "amount"),
        client_secret=_str(obj, "client_secret"),
        customer=_text(obj.get("customer")),
        metadata=_metadata(obj),
        failure_reason=reason,
        currency=_str(obj, "currency").lower(),
        created_s=_cents(obj, "created"),
    )


def intent_from_event(payload: dict) -> Intent:
    """A PaymentIntent as carried in a webhook event's data.object. Raises BadObject."""
    return _intent(payload)


def _setup(obj: Any) -> Setup:
    obj = _plain(obj)
    return Setup(id=_object_id(obj), status=_str(obj, "status"), client_secret=_str(obj, "client_secret"),
                 customer=_text(obj.get("customer")), payment_method=_text(obj.get("payment_method")),
                 metadata=_metadata(obj))


def setup_from_event(payload: dict) -> Setup:
    """A SetupIntent as carried in a webhook event's data.object. Raises BadObject."""
    return _setup(payload)


@dataclass(frozen=True)
class Charge:
    id: str
    payment_intent_id: str
    amount_refunded_cents: int


def charge_from_event(payload: dict) -> Charge:
    """A Charge as carried in a webhook event's data.object. Raises BadObject."""
    return Charge(id=_object_id(payload), payment_intent_id=_text(payload.get("payment_intent")),
                  amount_refunded_cents=_cents(payload, "amount_refunded"))


def _refund(obj: Any) -> StripeRefund:
    obj = _plain(obj)
    return StripeRefund(id=_object_id(obj), status=_str(obj, "status"), amount_cents=_cents(obj, "amount"),
                        metadata=_metadata(obj))


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
            # the request may have reached Stripe: the caller's flow says what that means for it
            raise Unavailable(f"Stripe is unreachable ({what})") from exc
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

    def find_payment_intent(self, cobalt_ref: str, customer_id: str = "", created_since_s: int = 0) -> Intent | None:
        """The PaymentIntent made with our key `cobalt_ref` (its metadata carries it), or None when
        Stripe has none: for a create whose answer never came. Stripe's list filters narrow the
        search (its newest-first order ends it at `created_since_s`); a double that lacks the filters
        is read whole."""
        params: dict[str, Any] = {"limit": 100}
        if customer_id:
            params["customer"] = customer_id
        if created_since_s:
            params["created"] = {"gte": created_since_s}

        def older(items: list[dict]) -> bool:
            return bool(created_since_s) and min(int(item.get("created") or 0) for item in items) < created_since_s

        lister = self.v1.payment_intents.list
        try:
            found = self._first("list payment intents", lister, params, _made_with(cobalt_ref), older)
        except InvalidArgument:
            found = self._first("list payment intents", lister, {"limit": 100}, _made_with(cobalt_ref))
        return None if found is None else _intent(found)

    def cancel_payment_intent(self, payment_intent_id: str) -> Intent:
        """Cancel a PaymentIntent nobody paid (nothing was charged). A PaymentIntent that succeeded
        meanwhile cannot be cancelled: Stripe's refusal is answered with its current state."""
        try:
            return _intent(self._call("cancel payment intent",
                                      lambda: self.v1.payment_intents.cancel(payment_intent_id)))
        except InvalidArgument:
            return self.retrieve_payment_intent(payment_intent_id)

    def refund(self, payment_intent_id: str, amount_cents: int, idempotency_key: str) -> str:
        """Refund to the card. The refund carries our key in its metadata, so that `find_refund`
        finds it when Stripe's answer never came."""
        refund = self._call("refund", lambda: self.v1.refunds.create(
            params={"payment_intent": payment_intent_id, "amount": amount_cents,
                    "metadata": {"cobalt_ref": idempotency_key}},
            options={"idempotency_key": idempotency_key}))
        return refund.id

    def find_refund(self, payment_intent_id: str, cobalt_ref: str) -> StripeRefund | None:
        """The refund of a PaymentIntent made with our key `cobalt_ref`, or None when Stripe has none."""
        found = self._first("list refunds", self.v1.refunds.list, {"payment_intent": payment_intent_id, "limit": 100},
                            _made_with(cobalt_ref))
        return None if found is None else _refund(found)

    def _first(self, what: str, lister: Callable[..., Any], params: dict[str, Any],
               match: Callable[[dict], bool], done: Callable[[list[dict]], bool] | None = None) -> dict | None:
        """The first object of a Stripe list that `match`es, page by page (at most MAX_LIST_PAGES)."""
        for _ in range(MAX_LIST_PAGES):
            page = self._call(what, lambda p=params: lister(params=p))
            items = [_plain(item) for item in page.data]
            for item in items:
                if match(item):
                    return item
            if not page.has_more or not items or (done is not None and done(items)):
                return None
            params = {**params, "starting_after": items[-1]["id"]}
        raise Unavailable(f"Stripe's list is too long to search ({what})")


def _made_with(cobalt_ref: str) -> Callable[[dict], bool]:
    return lambda item: isinstance(item.get("metadata"), dict) and item["metadata"].get("cobalt_ref") == cobalt_ref


# ---------------------------------------------------------------- webhooks
WEBHOOK_TOLERANCE_S = 300


class BadWebhook(ValueError):
    """The webhook is not from Stripe (signature) or not an event (JSON)."""


def verify_webhook(payload: bytes, signature_header: str | None, secret: str,
                   tolerance_s: int = WEBHOOK_TOLERANCE_S) -> dict:
    """Check Stripe-Signature (timestamp within tolerance, HMAC-SHA256 with the endpoint secret) and
    parse the event: a JSON object with a string id and type. Raises BadWebhook (the bridge's 400)."""
    if not signature_header:
        raise BadWebhook("missing Stripe-Signature header")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadWebhook("the body is not UTF-8 JSON") from exc
    try:
        stripe.WebhookSignature.verify_header(text, signature_header, secret, tolerance_s)
    except stripe.SignatureVerificationError as exc:
        raise BadWebhook(f"bad signature: {exc.user_message or exc}") from exc
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:  # RecursionError: nesting deeper than the parser goes
        raise BadWebhook("the body is not JSON") from exc
    if not isinstance(data, dict):
        raise BadWebhook("the body is not a JSON object")
    event_id, event_type = data.get("id"), data.get("type")
    if not isinstance(event_id, str) or not isinstance(event_type, str):
        raise BadWebhook("the body is not a Stripe event (no id and type)")
    if not event_id.isprintable() or not event_type.isprintable():  # lone surrogates cannot even be forwarded
        raise BadWebhook("the event's id or type is not printable text")
    return data
