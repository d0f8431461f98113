"""Pay and Transfer when the balance is short (SPEC §4 Pay, §5).

Auto top-up ON: charge the saved card for the §5 amount, credit it and book the payment in one
transaction. Otherwise (Pay only): a PaymentIntent for the shortfall, and a pending card payment that
books the Pay when Stripe confirms it (cards.apply_success).
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Connection

from server.domain.errors import InsufficientFunds, format_cents
from server.domain.money import MAX_TOP_UP_CENTS, shortfall, top_up_to_cover
from server.domain.types import AutoTopUpStatus
from server.ledger.db import Database
from server.services import auto_top_up, cards
from server.services.accounts import require_account
from server.services.cards import Once, Replayed
from server.services.pay import PayCommand, pay_from_balance
from server.services.top_up import open_payment_intent
from server.services.transfer import TransferCommand, TransferResult, transfer
from server.stripe_gateway import CardFailed, Intent, StripeGateway

STRIPE_MIN_CHARGE_CENTS = 50  # Stripe's smallest card charge in AUD


@dataclass
class PayOutcome:
    status: str  # SUCCEEDED | REQUIRES_CARD_PAYMENT | FAILED
    payment_id: str = ""
    balance_cents: int = 0
    topped_up_cents: int = 0
    payment_intent_id: str = ""
    client_secret: str = ""
    card_amount_cents: int = 0
    failure_reason: str = ""
    reference: str = ""
    needs_auto_top_up: bool = False


@dataclass(frozen=True)
class _Plan:
    status: AutoTopUpStatus
    top_up_cents: int
    balance_cents: int


def _plan(conn: Connection, member_id: int, amount_cents: int) -> _Plan:
    card = auto_top_up.card_of(conn, member_id)
    balance, low_limit = auto_top_up.balance_and_low_limit(conn, member_id)
    if card is None or card.status != AutoTopUpStatus.ON:
        return _Plan(AutoTopUpStatus.OFF if card is None else card.status, 0, balance)
    return _Plan(card.status, top_up_to_cover(balance, amount_cents, card.amount_cents, low_limit), balance)


def _too_large(top_up_cents: int) -> str:
    return (f"the auto top-up needed ({format_cents(top_up_cents)}) is more than one card charge may be "
            f"({format_cents(MAX_TOP_UP_CENTS)})")


def _record_failure(db: Database, once: Once, outcome: PayOutcome) -> PayOutcome | Replayed:
    def finish(conn: Connection) -> PayOutcome | Replayed:
        again = once.stored(conn)
        if again is not None:
            return Replayed(again)
        once.record(conn, outcome)
        return outcome

    return db.run(finish)


def pay_when_short(db: Database, gateway: StripeGateway, once: Once, cmd: PayCommand,
                   short: InsufficientFunds) -> PayOutcome | Replayed:
    gateway.require()
    stored = db.read(once.stored)
    if stored is not None:
        return Replayed(stored)

    def plan_it(conn: Connection) -> _Plan:
        require_account(conn, cmd.payee_account)  # an unknown payee fails now, not after the card is charged
        return _plan(conn, cmd.member_id, cmd.amount_cents)

    plan = db.read(plan_it)
    if plan.status == AutoTopUpStatus.ON:
        if plan.top_up_cents == 0:  # the balance changed meanwhile and now covers it
            raise short
        if plan.top_up_cents > MAX_TOP_UP_CENTS:
            return _record_failure(db, once, PayOutcome("FAILED", balance_cents=plan.balance_cents,
                                                        failure_reason=_too_large(plan.top_up_cents)))
        return _pay_after_auto_top_up(db, gateway, once, cmd, plan.top_up_cents)
    return _start_card_payment(db, gateway, once, cmd, plan.balance_cents)


def _pay_after_auto_top_up(db: Database, gateway: StripeGateway, once: Once, cmd: PayCommand,
                           top_up_cents: int) -> PayOutcome | Replayed:
    def then(conn: Connection, applied: cards.Applied) -> PayOutcome | Replayed:
        again = once.stored(conn)
        if again is not None:
            return Replayed(again)
        try:
            with conn.begin_nested():
                result = pay_from_balance(conn, cmd, applied.card.payment_id)
            outcome = PayOutcome("SUCCEEDED", result.payment_id, result.balance_cents, top_up_cents,
                                 reference=result.reference, needs_auto_top_up=result.needs_auto_top_up)
        except InsufficientFunds as still_short:
            outcome = PayOutcome("FAILED", applied.card.payment_id, applied.balance_cents, top_up_cents,
                                 failure_reason=f"the top-up was credited but the balance changed meanwhile "
                                                f"and does not cover the payment ({still_short})")
        once.record(conn, outcome)
        return outcome

    def failed(conn: Connection, row: cards.CardPayment, failure: CardFailed) -> PayOutcome | Replayed:
        again = once.stored(conn)
        if again is not None:
            return Replayed(again)
        balance, _ = auto_top_up.balance_and_low_limit(conn, cmd.member_id)
        outcome = PayOutcome("FAILED", row.payment_id, balance,
                             failure_reason=f"auto top-up failed: {failure.reason}; auto top-up is now FAILED")
        once.record(conn, outcome)
        return outcome

    return auto_top_up.charge(db, gateway, cmd.member_id, top_up_cents, once.stripe_key("auto-top-up"),
                              cmd.principal, then, failed, cmd.route_code, cmd.route_payload, once=once)


def _start_card_payment(db: Database, gateway: StripeGateway, once: Once, cmd: PayCommand,
                        balance_cents: int) -> PayOutcome | Replayed:
    card_amount_cents = max(shortfall(balance_cents, cmd.amount_cents), STRIPE_MIN_CHARGE_CENTS)
    if card_amount_cents > MAX_TOP_UP_CENTS:
        return _record_failure(db, once, PayOutcome(
            "FAILED", balance_cents=balance_cents,
            failure_reason=f"the card part ({format_cents(card_amount_cents)}) is more than one card charge may be "
                           f"({format_cents(MAX_TOP_UP_CENTS)})"))
    def answer(conn: Connection, pending: cards.CardPayment, intent: Intent) -> PayOutcome:
        balance, _ = auto_top_up.balance_and_low_limit(conn, cmd.member_id)
        return PayOutcome("REQUIRES_CARD_PAYMENT", pending.payment_id, balance, payment_intent_id=intent.id,
                          client_secret=intent.client_secret, card_amount_cents=card_amount_cents)

    return open_payment_intent(db, gateway, once, once.stripe_key("card-payment"), cmd.member_id, cards.PAY,
                               card_amount_cents, cmd.principal, answer, cards.pay_command_to_json(cmd))


def transfer_when_short(db: Database, gateway: StripeGateway, once: Once, cmd: TransferCommand,
                        short: InsufficientFunds) -> TransferResult | Replayed:
    """Transfer with a short balance: auto top-up as in Pay, else insufficient funds (SPEC §4)."""
    if not gateway.configured or cmd.from_member_id is None:
        raise short
    member_id = cmd.from_member_id
    stored = db.read(once.stored)
    if stored is not None:
        return Replayed(stored)
    plan = db.read(lambda conn: _plan(conn, member_id, cmd.amount_cents))
    if plan.status != AutoTopUpStatus.ON or plan.top_up_cents == 0:
        raise short
    if plan.top_up_cents > MAX_TOP_UP_CENTS:
        raise InsufficientFunds(plan.balance_cents, cmd.amount_cents)

    def then(conn: Connection, applied: cards.Applied) -> TransferResult | Replayed | Exception:
        again = once.stored(conn)
        if again is not None:
            return Replayed(again)
        try:
            with conn.begin_nested():
                result = transfer(conn, cmd)
        except InsufficientFunds as still_short:  # the credit stays; the caller hears why
            return still_short
        result.topped_up_cents = plan.top_up_cents
        once.record(conn, result)
        return result

    def failed(conn: Connection, row: cards.CardPayment, failure: CardFailed) -> Exception:
        # returned, not raised: the FAILED status and its event must commit
        return CardFailed(f"auto top-up failed: {failure.reason}; auto top-up is now FAILED")

    outcome = auto_top_up.charge(db, gateway, member_id, plan.top_up_cents, once.stripe_key("auto-top-up"),
                                 cmd.principal, then, failed, once=once)
    if isinstance(outcome, Exception):
        raise outcome
    return outcome
