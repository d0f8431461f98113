"""Auto top-up (SPEC §4 SetupAutoTopUp and friends, §5): the member's Stripe customer and saved card,
the setting's status, and charging the saved card off-session.

Flows read, call Stripe outside any transaction, then write in a new transaction that re-checks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from sqlalchemy import Connection, insert, select, update

from server.domain import validation
from server.domain.errors import FailedPrecondition, InvalidArgument, Unavailable
from server.domain.money import (
    AUTO_TOP_UP_DEFAULT_CENTS,
    AUTO_TOP_UP_MAX_CENTS,
    AUTO_TOP_UP_MIN_CENTS,
    top_up_after_payment,
)
from server.domain.types import AutoTopUpStatus, member_account
from server.ledger.db import Database, utcnow
from server.ledger.ledger import balance_of
from server.ledger.schema import member_cards
from server.services import cards
from server.services.cards import Once, Replayed
from server.services.fees import current_fee_settings
from server.stripe_gateway import CardFailed, StripeGateway, stripe_key

R = TypeVar("R")


@dataclass(frozen=True)
class MemberCard:
    member_id: int
    customer_id: str
    payment_method_id: str
    setup_intent_id: str
    status: AutoTopUpStatus
    amount_cents: int


@dataclass(frozen=True)
class AutoTopUpState:
    member_id: int
    status: AutoTopUpStatus
    amount_cents: int
    balance_cents: int
    topped_up_cents: int = 0


@dataclass(frozen=True)
class SetupStarted:
    setup_intent_id: str
    client_secret: str
    customer_id: str
    status: AutoTopUpStatus


def validated_amount(amount_cents: int, *, zero_means_default: bool = True) -> int:
    if amount_cents == 0 and zero_means_default:
        return AUTO_TOP_UP_DEFAULT_CENTS
    if not AUTO_TOP_UP_MIN_CENTS <= amount_cents <= AUTO_TOP_UP_MAX_CENTS:
        raise InvalidArgument.field("amount_cents", f"the auto top-up amount must be between {AUTO_TOP_UP_MIN_CENTS} "
                                                    f"and {AUTO_TOP_UP_MAX_CENTS} cents")
    return amount_cents


def card_of(conn: Connection, member_id: int) -> MemberCard | None:
    row = conn.execute(select(member_cards).where(member_cards.c.member_id == member_id)).first()
    if row is None:
        return None
    return MemberCard(row.member_id, row.stripe_customer_id or "", row.payment_method_id or "",
                      row.setup_intent_id or "", AutoTopUpStatus(row.auto_top_up_status), row.auto_top_up_amount_cents)


def _ensure_row(conn: Connection, member_id: int) -> None:
    if card_of(conn, member_id) is None:
        conn.execute(insert(member_cards).values(member_id=member_id, auto_top_up_status=int(AutoTopUpStatus.OFF),
                                                 auto_top_up_amount_cents=AUTO_TOP_UP_DEFAULT_CENTS,
                                                 updated_at=utcnow()))


def _set(conn: Connection, member_id: int, **values) -> MemberCard:  # noqa: ANN003
    _ensure_row(conn, member_id)
    conn.execute(update(member_cards).where(member_cards.c.member_id == member_id)
                 .values(updated_at=utcnow(), **values))
    found = card_of(conn, member_id)
    assert found is not None
    return found


def balance_and_low_limit(conn: Connection, member_id: int) -> tuple[int, int]:
    return balance_of(conn, member_account(member_id)) or 0, current_fee_settings(conn).low_balance_limit_cents


def state(conn: Connection, member_id: int, topped_up_cents: int = 0) -> AutoTopUpState:
    card = card_of(conn, member_id)
    balance, _ = balance_and_low_limit(conn, member_id)
    if card is None:
        return AutoTopUpState(member_id, AutoTopUpStatus.OFF, AUTO_TOP_UP_DEFAULT_CENTS, balance, topped_up_cents)
    return AutoTopUpState(member_id, card.status, card.amount_cents, balance, topped_up_cents)


# ---------------------------------------------------------------- customer
def ensure_customer(db: Database, gateway: StripeGateway, member_id: int) -> str:
    """The member's one Stripe customer, created on first need (the Stripe key is per member, so
    two racing requests get the same customer at Stripe; the first one stored wins here)."""
    card = db.read(lambda conn: card_of(conn, member_id))
    if card is not None and card.customer_id:
        return card.customer_id
    customer_id = gateway.create_customer(member_id, stripe_key("customer", member_id))

    def save(conn: Connection) -> str:
        current = card_of(conn, member_id)
        if current is not None and current.customer_id:
            return current.customer_id
        _set(conn, member_id, stripe_customer_id=customer_id)
        return customer_id

    return db.run(save)


# ---------------------------------------------------------------- setup, confirm, update, cancel
def setup(db: Database, gateway: StripeGateway, once: Once, member_id: int, amount_cents: int) -> SetupStarted | Replayed:
    validation.positive_id("member_id", member_id)
    amount_cents = validated_amount(amount_cents)
    stored = db.read(once.stored)
    if stored is not None:
        return Replayed(stored)
    customer_id = ensure_customer(db, gateway, member_id)
    intent = gateway.create_setup_intent(customer_id, member_id, once.stripe_key("setup"))

    def finish(conn: Connection) -> SetupStarted | Replayed:
        again = once.stored(conn)
        if again is not None:
            return Replayed(again)
        _set(conn, member_id, setup_intent_id=intent.id, auto_top_up_status=int(AutoTopUpStatus.PENDING),
             auto_top_up_amount_cents=amount_cents)
        result = SetupStarted(intent.id, intent.client_secret, customer_id, AutoTopUpStatus.PENDING)
        once.record(conn, result)
        return result

    return db.run(finish)


def activate(conn: Connection, member_id: int, setup_intent_id: str, payment_method_id: str) -> bool:
    """The SetupIntent succeeded: auto top-up ON with its card. Only a PENDING setup turns ON: False
    when already on, cancelled, failed since (the member sets up again), or another setup started."""
    turned_on = conn.execute(
        update(member_cards)
        .where(member_cards.c.member_id == member_id, member_cards.c.setup_intent_id == setup_intent_id,
               member_cards.c.auto_top_up_status == int(AutoTopUpStatus.PENDING))
        .values(payment_method_id=payment_method_id, auto_top_up_status=int(AutoTopUpStatus.ON), updated_at=utcnow())
    ).rowcount
    return turned_on == 1  # one statement: of ConfirmAutoTopUp and the webhook racing, one turns it on


def activation_ref(setup_intent_id: str) -> str:
    """The Stripe key of the top-up made when a setup turns ON (the same from both paths)."""
    return stripe_key("activation", setup_intent_id)


def member_for_setup_intent(conn: Connection, setup_intent_id: str) -> int | None:
    return conn.execute(select(member_cards.c.member_id).where(member_cards.c.setup_intent_id == setup_intent_id)
                        ).scalar()


def confirm(db: Database, gateway: StripeGateway, member_id: int, principal: str) -> AutoTopUpState:
    """The client says the card step is done: check the SetupIntent with Stripe, turn ON, and top
    up at once when the balance is below the low limit."""
    validation.positive_id("member_id", member_id)
    card = db.read(lambda conn: card_of(conn, member_id))
    if card is None or not card.setup_intent_id:
        raise FailedPrecondition(f"member {member_id} has not set up auto top-up (call SetupAutoTopUp first)")
    if card.status in (AutoTopUpStatus.OFF, AutoTopUpStatus.FAILED):
        raise FailedPrecondition(f"auto top-up of member {member_id} is {card.status.name}; set it up again")
    if card.status == AutoTopUpStatus.ON:
        return db.read(lambda conn: state(conn, member_id))
    setup_intent = gateway.retrieve_setup_intent(card.setup_intent_id)
    if setup_intent.status != "succeeded" or not setup_intent.payment_method:
        return db.read(lambda conn: state(conn, member_id))
    gateway.attach_card(setup_intent.payment_method, card.customer_id)
    turned_on = db.run(lambda conn: activate(conn, member_id, setup_intent.id, setup_intent.payment_method))
    topped_up = 0
    if turned_on:  # else the webhook turned it on, and topped up
        topped_up = top_up_if_low(db, gateway, member_id, principal, activation_ref(setup_intent.id))
    return db.read(lambda conn: state(conn, member_id, topped_up))


def update_amount(conn: Connection, member_id: int, amount_cents: int) -> AutoTopUpState:
    validation.positive_id("member_id", member_id)
    amount_cents = validated_amount(amount_cents, zero_means_default=False)
    _set(conn, member_id, auto_top_up_amount_cents=amount_cents)
    return state(conn, member_id)


def cancel(db: Database, gateway: StripeGateway, once: Once, member_id: int) -> AutoTopUpState | Replayed:
    """OFF, and the saved card detached at Stripe (detached first: a card we forget is never left
    attached and chargeable)."""
    validation.positive_id("member_id", member_id)
    stored = db.read(once.stored)
    if stored is not None:
        return Replayed(stored)
    card = db.read(lambda conn: card_of(conn, member_id))
    if card is not None and card.payment_method_id:
        gateway.detach_card(card.payment_method_id)

    def finish(conn: Connection) -> AutoTopUpState | Replayed:
        again = once.stored(conn)
        if again is not None:
            return Replayed(again)
        _set(conn, member_id, auto_top_up_status=int(AutoTopUpStatus.OFF), payment_method_id=None,
             setup_intent_id=None)
        result = state(conn, member_id)
        once.record(conn, result)
        return result

    return db.run(finish)


# ---------------------------------------------------------------- charging the saved card
def charge(db: Database, gateway: StripeGateway, member_id: int, amount_cents: int, ref: str, principal: str,
           then: Callable[[Connection, cards.Applied], R],
           on_fail: Callable[[Connection, cards.CardPayment, CardFailed], R], route_code: str = "",
           route_payload: str = "", once: Once | None = None) -> R | Replayed:
    """Charge the saved card off-session for amount_cents, credit it as Auto Top Up, and run
    `then` in the same transaction. A declined card (or one that needs authentication) books
    nothing, sets auto top-up FAILED, emits AUTO_TOP_UP_FAILED and runs `on_fail` in that transaction.
    Stripe unreachable: Unavailable, nothing booked; the pending row lets the webhook, the reconciler or
    a retry finish it."""
    card = db.read(lambda conn: card_of(conn, member_id))
    if card is None or card.status != AutoTopUpStatus.ON or not card.payment_method_id:
        raise FailedPrecondition(f"auto top-up is not on for member {member_id}")
    pending = db.run(lambda conn: cards.start_pending(conn, ref, member_id, cards.AUTO_TOP_UP, amount_cents,
                                                     principal, once=once))
    if isinstance(pending, Replayed):  # the first attempt of this request finished meanwhile
        return pending
    failure: CardFailed | None = None
    try:
        intent = gateway.charge_saved_card(card.customer_id, card.payment_method_id, amount_cents,
                                           cards.intent_metadata(ref, member_id, cards.AUTO_TOP_UP), ref)
    except CardFailed as declined:
        failure = declined
    except Unavailable as exc:
        # the charge may have reached Stripe: its pending row stays, and the reconciler settles it
        raise Unavailable(f"{exc.message}: whether the card was charged is unknown; the top-up stays pending and "
                          f"is settled with Stripe without a retry (credited if the card was charged)") from exc
    if failure is not None:
        card_failure = failure

        def failed(conn: Connection) -> R:
            row = None
            if card_failure.payment_intent_id:
                row = cards.bind_intent(conn, ref, card_failure.payment_intent_id)
            row = row or cards.get(conn, cards.placeholder_id(ref))
            if row is None:  # the failure webhook got here first and recorded it
                raise card_failure
            row = cards.mark_failed(conn, row, card_failure.reason, route_code, route_payload)
            return on_fail(conn, row, card_failure)

        return db.run(failed)

    def succeeded(conn: Connection) -> R:
        row = cards.bind_intent(conn, ref, intent.id) or cards.adopt(conn, intent, gateway.currency)
        assert row is not None, "the pending row was written before Stripe was called"
        return then(conn, cards.apply_success(conn, row, intent, gateway.currency))

    return db.run(succeeded)


def top_up_if_low(db: Database, gateway: StripeGateway, member_id: int, principal: str, ref: str) -> int:
    """After a payment or on activation: below the low limit with auto top-up ON, top up by the
    smallest multiple of the auto amount that lifts the balance to the limit (SPEC §5). Returns
    the amount credited (0: none needed, or the card failed)."""

    def plan(conn: Connection) -> int:
        card = card_of(conn, member_id)
        if card is None or card.status != AutoTopUpStatus.ON:
            return 0
        balance, low_limit = balance_and_low_limit(conn, member_id)
        return top_up_after_payment(balance, card.amount_cents, low_limit)

    amount_cents = db.read(plan)
    if amount_cents <= 0:
        return 0
    return charge(db, gateway, member_id, amount_cents, ref, principal,
                  then=lambda conn, applied: applied.card.amount_cents if applied.applied_now else 0,
                  on_fail=lambda conn, row, failure: 0)
