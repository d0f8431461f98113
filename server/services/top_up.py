"""Manual top-up by card (SPEC §4 StartTopUp) and the client's ConfirmCardPayment."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from sqlalchemy import Connection

from server.domain import validation
from server.domain.errors import InvalidArgument, NotFound, Unavailable, format_cents
from server.domain.money import MAX_TOP_UP_CENTS, MIN_TOP_UP_CENTS
from server.ledger.db import Database
from server.services import auto_top_up, cards
from server.services.cards import Once, Replayed
from server.stripe_gateway import Intent, StripeGateway

R = TypeVar("R")


@dataclass(frozen=True)
class TopUpStarted:
    payment_intent_id: str
    client_secret: str
    amount_cents: int


@dataclass(frozen=True)
class CardPaymentState:
    status: str  # pending | succeeded | failed
    applied_now: bool
    balance_cents: int
    payment_id: str


def check_amount(amount_cents: int, balance_cents: int, pending_cents: int = 0) -> None:
    """$50.00 ≤ amount ≤ $2,000.00 − balance − the member's top-ups still pending."""
    ceiling = MAX_TOP_UP_CENTS - max(balance_cents, 0) - pending_cents
    if amount_cents < MIN_TOP_UP_CENTS:
        raise InvalidArgument.field("amount_cents", f"a top-up is at least {format_cents(MIN_TOP_UP_CENTS)}")
    if amount_cents > ceiling:
        pending = f" (with {format_cents(pending_cents)} of top-ups pending)" if pending_cents else ""
        raise InvalidArgument.field(
            "amount_cents", f"a top-up may lift the balance to at most {format_cents(MAX_TOP_UP_CENTS)}: "
                            f"at most {format_cents(max(ceiling, 0))} now{pending}")


def open_payment_intent(db: Database, gateway: StripeGateway, once: Once, ref: str, member_id: int, purpose: str,
                        amount_cents: int, principal: str, answer: Callable[[Connection, cards.CardPayment, Intent], R],
                        pending_request: str | None = None,
                        check: Callable[[Connection], None] | None = None) -> R | Replayed:
    """The pending card payment first (so a crash after Stripe's answer is recovered from the webhook),
    then the PaymentIntent with Stripe, outside any transaction, for the member's customer if any; then,
    in one transaction, the pending row gets its intent and `answer` is stored as the response. `check`
    may refuse the pending row, in the transaction that writes it."""
    pending = db.run(lambda conn: cards.start_pending(conn, ref, member_id, purpose, amount_cents, principal,
                                                     pending_request, once=once, check=check))
    if isinstance(pending, Replayed):
        return pending
    card = db.read(lambda conn: auto_top_up.card_of(conn, member_id))
    try:
        intent = gateway.create_payment_intent(amount_cents, cards.intent_metadata(ref, member_id, purpose), ref,
                                               card.customer_id if card else "")
    except Unavailable as exc:  # an unconfirmed PaymentIntent charges nothing, whether or not it was made
        raise Unavailable(f"{exc.message}; nothing was charged") from exc

    def finish(conn: Connection) -> R | Replayed:
        again = once.stored(conn)
        if again is not None:
            return Replayed(again)
        cards.bind_intent(conn, ref, intent.id)
        result = answer(conn, pending, intent)
        once.record(conn, result)
        return result

    return db.run(finish)


def start(db: Database, gateway: StripeGateway, once: Once, member_id: int, amount_cents: int,
          principal: str) -> TopUpStarted | Replayed:
    gateway.require()
    validation.positive_id("member_id", member_id)
    stored = db.read(once.stored)
    if stored is not None:
        return Replayed(stored)
    check_amount(amount_cents, 0)  # the least it can be: no lock is taken for what is refused anyway

    def within_ceiling(conn: Connection) -> None:
        # under the member's top-up lock until the pending row is written and committed
        check_amount(amount_cents, *cards.balance_and_pending_top_ups(conn, member_id))

    return open_payment_intent(
        db, gateway, once, once.stripe_key("top-up"), member_id, cards.MANUAL_TOP_UP, amount_cents, principal,
        lambda _conn, _pending, intent: TopUpStarted(intent.id, intent.client_secret, amount_cents),
        check=within_ceiling)


def confirm_card_payment(db: Database, gateway: StripeGateway, payment_intent_id: str) -> CardPaymentState:
    """Never trusted: the PaymentIntent is fetched from Stripe and applied if it succeeded.
    Whichever of this and the webhook comes first applies; the other changes nothing."""
    gateway.require()
    if not payment_intent_id.startswith("pi_") or len(payment_intent_id) > 100:
        raise InvalidArgument.field("payment_intent_id", "must be a Stripe PaymentIntent id (pi_…)")
    known = db.read(lambda conn: cards.get(conn, payment_intent_id))
    if known is None:
        raise NotFound(f"no card payment {payment_intent_id}")
    intent = gateway.retrieve_payment_intent(payment_intent_id)

    def apply(conn: Connection) -> CardPaymentState:
        row = cards.find_for_intent(conn, intent, gateway.currency)
        if row is None:  # Stripe's PaymentIntent is not the one we asked for (logged): nothing applies
            row = cards.get(conn, payment_intent_id) or known
            balance, _ = auto_top_up.balance_and_low_limit(conn, row.member_id)
            return CardPaymentState(row.status, False, balance, row.payment_id)
        if intent.succeeded:
            applied = cards.apply_success(conn, row, intent, gateway.currency)
            return CardPaymentState(applied.card.status, applied.applied_now, applied.balance_cents,
                                    applied.card.payment_id)
        if intent.failed:
            row = cards.mark_failed(conn, row, intent.failure_reason)
        balance, _ = auto_top_up.balance_and_low_limit(conn, row.member_id)
        return CardPaymentState(row.status, False, balance, row.payment_id)

    return db.run(apply)
