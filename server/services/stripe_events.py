"""Stripe events forwarded by the webhook bridge (SPEC §7).

Each event id is recorded in `stripe_events` in the same transaction as its effect, so a duplicate
does nothing; events may come twice or out of order (a late `payment_failed` after `succeeded`
changes nothing, because only a pending card payment can fail).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, insert, select

from server.domain.errors import InvalidArgument
from server.ledger.db import Database, utcnow
from server.ledger.schema import stripe_events
from server.services import auto_top_up, cards
from server.stripe_gateway import StripeGateway, intent_from_event

log = logging.getLogger("payments.stripe_events")

MAX_PAYLOAD_CHARS = 512 * 1024
HANDLED_TYPES = ("payment_intent.succeeded", "payment_intent.payment_failed", "setup_intent.succeeded",
                 "charge.refunded")


@dataclass(frozen=True)
class EventOutcome:
    duplicate: bool
    handled: bool
    top_up_member_id: int | None = None  # auto top-up just turned ON: top up at once if low
    top_up_ref: str = ""


def parse(event_id: str, event_type: str, payload_json: str) -> dict[str, Any]:
    if not event_id or len(event_id) > 100:
        raise InvalidArgument.field("event_id", "is required (at most 100 characters)")
    if not event_type or len(event_type) > 100:
        raise InvalidArgument.field("type", "is required (at most 100 characters)")
    if len(payload_json) > MAX_PAYLOAD_CHARS:
        raise InvalidArgument.field("payload_json", f"is longer than {MAX_PAYLOAD_CHARS} characters")
    try:
        event = json.loads(payload_json)
    except ValueError as exc:
        raise InvalidArgument.field("payload_json", "is not JSON") from exc
    obj = (event.get("data") or {}).get("object") if isinstance(event, dict) else None
    if event_type in HANDLED_TYPES and (not isinstance(obj, dict) or not obj.get("id")):
        raise InvalidArgument.field("payload_json", "has no data.object with an id")
    return obj or {}


def _seen(conn: Connection, event_id: str) -> bool:
    return conn.execute(select(stripe_events.c.event_id).where(stripe_events.c.event_id == event_id)).first() is not None


def _remember(conn: Connection, event_id: str, event_type: str) -> None:
    conn.execute(insert(stripe_events).values(event_id=event_id, type=event_type, received_at=utcnow()))


def handle(db: Database, gateway: StripeGateway, event_id: str, event_type: str, payload_json: str) -> EventOutcome:
    """Apply one event. When a setup turned auto top-up ON the outcome names the member, whom the
    caller tops up at once if low (after this transaction: Stripe is never called inside one)."""
    obj = parse(event_id, event_type, payload_json)
    if db.read(lambda conn: _seen(conn, event_id)):
        return EventOutcome(True, False)

    if event_type == "setup_intent.succeeded":
        return _setup_succeeded(db, gateway, event_id, event_type, obj)

    def apply(conn: Connection) -> EventOutcome:
        if _seen(conn, event_id):
            return EventOutcome(True, False)
        _remember(conn, event_id, event_type)
        if event_type in ("payment_intent.succeeded", "payment_intent.payment_failed"):
            intent = intent_from_event(obj)
            if event_type == "payment_intent.succeeded":
                row = cards.find_for_intent(conn, intent.id, intent.metadata, intent.amount_cents)
            else:  # a failure of an intent we hold no row for changes nothing
                row = cards.bind_intent(conn, intent.metadata.get("cobalt_ref", ""), intent.id)
            if row is None:
                log.warning("stripe event %s: payment intent %s is not ours", event_id, intent.id)
                return EventOutcome(False, False)
            if event_type == "payment_intent.succeeded":
                cards.apply_success(conn, row, intent.amount_cents)
            else:
                cards.mark_failed(conn, row, intent.failure_reason or "the card payment failed")
            return EventOutcome(False, True)
        if event_type == "charge.refunded":
            # refunds are booked when we ask Stripe for them; a refund made elsewhere needs a person
            known = cards.get(conn, str(obj.get("payment_intent") or ""))
            if known is not None and int(obj.get("amount_refunded") or 0) > known.refunded_cents:
                log.warning("stripe event %s: card payment %s refunded at Stripe beyond our refunds",
                            event_id, known.payment_intent_id)
            return EventOutcome(False, known is not None)
        log.info("stripe event %s of type %s acknowledged; nothing to do", event_id, event_type)
        return EventOutcome(False, False)

    return db.run(apply)


def _setup_succeeded(db: Database, gateway: StripeGateway, event_id: str, event_type: str,
                     obj: dict[str, Any]) -> EventOutcome:
    setup_intent_id = str(obj["id"])
    payment_method_id = obj.get("payment_method")
    payment_method_id = payment_method_id.get("id") if isinstance(payment_method_id, dict) else payment_method_id
    member_id = db.read(lambda conn: auto_top_up.member_for_setup_intent(conn, setup_intent_id))
    card = db.read(lambda conn: auto_top_up.card_of(conn, member_id)) if member_id else None
    if gateway.configured and card is not None and payment_method_id and card.customer_id:
        gateway.attach_card(str(payment_method_id), card.customer_id)  # idempotent; before any transaction

    def apply(conn: Connection) -> tuple[EventOutcome, bool]:
        if _seen(conn, event_id):
            return EventOutcome(True, False), False
        _remember(conn, event_id, event_type)
        if member_id is None or not payment_method_id:
            log.warning("stripe event %s: setup intent %s is not ours", event_id, setup_intent_id)
            return EventOutcome(False, False), False
        turned_on = auto_top_up.activate(conn, member_id, setup_intent_id, str(payment_method_id))
        return EventOutcome(False, True), turned_on

    outcome, turned_on = db.run(apply)
    if turned_on:
        return EventOutcome(False, True, member_id, auto_top_up.activation_ref(setup_intent_id))
    return outcome


