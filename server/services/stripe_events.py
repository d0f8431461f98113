"""Stripe events forwarded by the webhook bridge (SPEC §7).

Each event id is recorded in `stripe_events` in the same transaction as its effect, so a duplicate
does nothing; events may come twice or out of order (a late `payment_failed` after `succeeded`
changes nothing, because only a pending card payment can fail).

A signature proves the sender, not the content. An event about a PaymentIntent we hold a row for is
applied only when it matches that row (member, purpose, amount, currency: `cards.mismatch`). One
about a PaymentIntent we do not know, that says it is ours (our key in its metadata), is never taken
at its word: the PaymentIntent is retrieved from Stripe first (outside any transaction), and only
Stripe's object is acted on, under the same matching rule. A SetupIntent turns auto top-up on only
when it is the member's pending one, for the member's Stripe customer. A mismatch is logged at error
level and credits nothing.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, insert, select

from server.domain.errors import InvalidArgument, NotFound
from server.ledger.db import Database, utcnow
from server.ledger.schema import stripe_events
from server.services import auto_top_up, cards
from server.stripe_gateway import (
    BadObject,
    Intent,
    StripeGateway,
    charge_from_event,
    intent_from_event,
    setup_from_event,
)

log = logging.getLogger("payments.stripe_events")

HANDLED_TYPES = ("payment_intent.succeeded", "payment_intent.payment_failed", "setup_intent.succeeded",
                 "charge.refunded")
INTENT_TYPES = ("payment_intent.succeeded", "payment_intent.payment_failed")
_STRIPE_ID = re.compile(r"pi_[A-Za-z0-9_]{1,97}")


@dataclass(frozen=True)
class EventOutcome:
    duplicate: bool
    handled: bool
    top_up_member_id: int | None = None  # auto top-up just turned ON: top up at once if low
    top_up_ref: str = ""


def parse(event_id: str, event_type: str, payload_json: str) -> dict[str, Any]:
    """The event's data.object. The fields' lengths and characters were checked with every request's
    (server.api.request_check); here the JSON: an object, the event the request names."""
    try:
        event = json.loads(payload_json)
    except (ValueError, RecursionError) as exc:  # RecursionError: nesting deeper than the parser goes
        raise InvalidArgument.field("payload_json", "is not JSON") from exc
    if not isinstance(event, dict):
        raise InvalidArgument.field("payload_json", "is not a JSON object")
    if event.get("id") != event_id:
        raise InvalidArgument.field("event_id", "is not the id of the event in payload_json")
    if event.get("type") != event_type:
        raise InvalidArgument.field("type", "is not the type of the event in payload_json")
    data = event.get("data")
    obj = data.get("object") if isinstance(data, dict) else None
    if event_type in HANDLED_TYPES and (not isinstance(obj, dict) or not isinstance(obj.get("id"), str)
                                        or not obj["id"]):
        raise InvalidArgument.field("payload_json", "has no data.object with an id")
    return obj if isinstance(obj, dict) else {}


def _bad_object(exc: BadObject) -> InvalidArgument:
    return InvalidArgument.field("payload_json", f"data.object: {exc}")


def _seen(conn: Connection, event_id: str) -> bool:
    return conn.execute(select(stripe_events.c.event_id).where(stripe_events.c.event_id == event_id)).first() is not None


def _remember(conn: Connection, event_id: str, event_type: str) -> None:
    conn.execute(insert(stripe_events).values(event_id=event_id, type=event_type, received_at=utcnow()))


def _only_remember(db: Database, event_id: str, event_type: str) -> EventOutcome:
    def apply(conn: Connection) -> EventOutcome:
        if _seen(conn, event_id):
            return EventOutcome(True, False)
        _remember(conn, event_id, event_type)
        return EventOutcome(False, False)

    return db.run(apply)


def handle(db: Database, gateway: StripeGateway, event_id: str, event_type: str, payload_json: str) -> EventOutcome:
    """Apply one event. When a setup turned auto top-up ON the outcome names the member, whom the
    caller tops up at once if low (after this transaction: Stripe is never called inside one)."""
    obj = parse(event_id, event_type, payload_json)
    if db.read(lambda conn: _seen(conn, event_id)):
        return EventOutcome(True, False)
    if event_type == "setup_intent.succeeded":
        return _setup_succeeded(db, gateway, event_id, event_type, obj)
    if event_type in INTENT_TYPES:
        return _intent_event(db, gateway, event_id, event_type, obj)

    def apply(conn: Connection) -> EventOutcome:
        if _seen(conn, event_id):
            return EventOutcome(True, False)
        _remember(conn, event_id, event_type)
        if event_type == "charge.refunded":
            # refunds are booked when we ask Stripe for them; a refund made elsewhere needs a person
            try:
                charge = charge_from_event(obj)
            except BadObject as exc:
                raise _bad_object(exc) from exc
            known = cards.get(conn, charge.payment_intent_id) if charge.payment_intent_id else None
            if known is not None and charge.amount_refunded_cents > known.refunded_cents:
                log.warning("stripe event %s: card payment %s refunded at Stripe beyond our refunds",
                            event_id, known.payment_intent_id)
            return EventOutcome(False, known is not None)
        log.info("stripe event %s of type %s acknowledged; nothing to do", event_id, event_type)
        return EventOutcome(False, False)

    return db.run(apply)


def _stripes_own(gateway: StripeGateway, event_id: str, claimed: Intent) -> Intent | None:
    """Stripe's PaymentIntent for an event's claim about one we do not know, or None (logged at error
    level) when Stripe does not have it: nothing is applied from the event's word alone."""
    if not _STRIPE_ID.fullmatch(claimed.id):
        log.error("stripe event %s: %r is not a Stripe PaymentIntent id; nothing applied", event_id, claimed.id)
        return None
    if not gateway.configured:
        log.error("stripe event %s: payment intent %s is unknown here and Stripe is not configured to ask; "
                  "nothing applied", event_id, claimed.id)
        return None
    try:
        return gateway.retrieve_payment_intent(claimed.id)  # Unavailable: the bridge answers 5xx, Stripe retries
    except NotFound:
        log.error("stripe event %s: payment intent %s carries our metadata but Stripe does not know it; "
                  "nothing applied", event_id, claimed.id)
        return None


def _intent_event(db: Database, gateway: StripeGateway, event_id: str, event_type: str,
                  obj: dict[str, Any]) -> EventOutcome:
    try:
        intent = intent_from_event(obj)
    except BadObject as exc:
        raise _bad_object(exc) from exc
    succeeded, failed = event_type == "payment_intent.succeeded", event_type == "payment_intent.payment_failed"
    if db.read(lambda conn: cards.get(conn, intent.id)) is None:
        if not intent.metadata.get("cobalt_ref"):
            log.warning("stripe event %s: payment intent %s is not ours", event_id, intent.id)
            return _only_remember(db, event_id, event_type)
        found = _stripes_own(gateway, event_id, intent)
        if found is None:
            return _only_remember(db, event_id, event_type)
        intent, succeeded, failed = found, found.succeeded, found.failed  # Stripe's state, not the event's

    def apply(conn: Connection) -> EventOutcome:
        if _seen(conn, event_id):
            return EventOutcome(True, False)
        _remember(conn, event_id, event_type)
        if not (succeeded or failed):
            log.info("stripe event %s: payment intent %s is %s at Stripe; nothing to do yet", event_id, intent.id,
                     intent.status)
            return EventOutcome(False, False)
        # a failure is not adopted: only money that arrived needs a row it did not have
        row = cards.find_for_intent(conn, intent, gateway.currency, adopt_twin=succeeded)
        if row is None:  # not ours, or not what we asked for (logged at error level)
            return EventOutcome(False, False)
        if succeeded:
            cards.apply_success(conn, row, intent, gateway.currency)
        else:
            cards.mark_failed(conn, row, intent.failure_reason or "the card payment failed")
        return EventOutcome(False, True)

    return db.run(apply)


def _setup_succeeded(db: Database, gateway: StripeGateway, event_id: str, event_type: str,
                     obj: dict[str, Any]) -> EventOutcome:
    try:
        setup = setup_from_event(obj)
    except BadObject as exc:
        raise _bad_object(exc) from exc
    member_id = db.read(lambda conn: auto_top_up.member_for_setup_intent(conn, setup.id))
    card = db.read(lambda conn: auto_top_up.card_of(conn, member_id)) if member_id else None
    if member_id is None or card is None:
        log.warning("stripe event %s: setup intent %s is not ours", event_id, setup.id)
        return _only_remember(db, event_id, event_type)
    problem = None
    if setup.status != "succeeded" or not setup.payment_method:
        problem = f"status {setup.status!r}, payment method {setup.payment_method!r}"
    elif not card.customer_id or setup.customer != card.customer_id:
        problem = f"customer {setup.customer!r}, the member's {card.customer_id!r}"
    elif setup.metadata.get("member_id", str(member_id)) != str(member_id):
        problem = f"member {setup.metadata.get('member_id')!r}, ours {member_id}"
    if problem is not None:
        log.error("stripe event %s: setup intent %s of member %s differs from ours: %s; nothing applied",
                  event_id, setup.id, member_id, problem)
        return _only_remember(db, event_id, event_type)
    if gateway.configured:
        try:
            gateway.attach_card(setup.payment_method, card.customer_id)  # idempotent; before any transaction
        except (NotFound, InvalidArgument) as refused:  # not a card Stripe has, or not one it lets us attach
            log.error("stripe event %s: the card %s of setup intent %s cannot be attached: %s; nothing applied",
                      event_id, setup.payment_method, setup.id, refused.message)
            return _only_remember(db, event_id, event_type)

    def apply(conn: Connection) -> tuple[EventOutcome, bool]:
        if _seen(conn, event_id):
            return EventOutcome(True, False), False
        _remember(conn, event_id, event_type)
        turned_on = auto_top_up.activate(conn, member_id, setup.id, setup.payment_method)
        return EventOutcome(False, True), turned_on

    outcome, turned_on = db.run(apply)
    if turned_on:
        return EventOutcome(False, True, member_id, auto_top_up.activation_ref(setup.id))
    return outcome
