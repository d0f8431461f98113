"""Refund of card money back to the card (SPEC §4 Refund).

A member refunds an own card payment within 12 weeks, up to what is left of it and of the balance;
the card gets the amount less the refund fee, which goes to `federation`. Administrators refund any
card payment up to what is left, without fee, never one they made themselves.

The money is held first: taken from the balance in one transaction that re-checks everything, with
the refund recorded as pending. Then Stripe is asked to refund the card (its key in the refund's
metadata), then the refund is marked done and REFUNDED is emitted (`complete`). If Stripe refuses,
the hold is given back by a new transaction (`release`). If Stripe cannot be reached the outcome is
unknown: the refund stays pending with its money held, the caller hears exactly that (UNAVAILABLE),
and the reconciler (services.reconcile) asks Stripe, as soon as it answers, whether the refund was
made: it completes it, makes it, or releases the hold, with no retry by the caller needed. A retry
with the same idempotency key meanwhile finds the same hold. So money never goes to a card without
leaving the balance, nor leaves it twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Connection, func, insert, select, update

from server.domain import validation
from server.domain.errors import (
    AlreadyExists,
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
    format_cents,
)
from server.domain.money import MAX_AMOUNT_CENTS, REFUND_WINDOW_DAYS, fee_half_up
from server.domain.types import EventKind, PostingType, SystemAccount, member_account, system_account
from server.events.outbox import NewEvent, emit
from server.ledger.db import Database, utcnow
from server.ledger.ledger import Leg, NewTransaction, balance_of, book
from server.ledger.schema import card_payments, refunds
from server.services import cards
from server.services.cards import Once, Replayed
from server.services.fees import current_fee_settings
from server.stripe_gateway import StripeGateway

HELD, SUCCEEDED, REVERSED = "pending", "succeeded", "reversed"


@dataclass(frozen=True)
class RefundCommand:
    principal: str
    is_admin: bool
    payment_intent_id: str
    amount_cents: int
    member_id: int

    def validated(self) -> RefundCommand:
        if not self.payment_intent_id.startswith("pi_") or len(self.payment_intent_id) > 100:
            raise InvalidArgument.field("payment_intent_id", "must be a Stripe PaymentIntent id (pi_…)")
        validation.positive_amount("amount_cents", self.amount_cents, MAX_AMOUNT_CENTS)
        if not self.is_admin:
            validation.positive_id("member_id", self.member_id)
        return self


@dataclass(frozen=True)
class RefundResult:
    refund_id: str
    amount_cents: int
    fee_cents: int
    card_amount_cents: int
    balance_cents: int
    remaining_refundable_cents: int


@dataclass(frozen=True)
class Hold:
    """A refund's money taken from the balance (`refunds` row), pending until Stripe's outcome is known."""

    row_id: int
    member_id: int
    amount_cents: int
    fee_cents: int
    card_amount_cents: int
    status: str
    stripe_refund_id: str
    payment_intent_id: str = ""
    principal: str = ""

    stripe_key: str = ""  # the refund is made at Stripe with this idempotency key


OUTCOME_UNKNOWN = "outcome unknown, held pending reconciliation"


def _check(conn: Connection, cmd: RefundCommand) -> tuple[cards.CardPayment, int]:
    """The card payment, and the fee, after every rule of SPEC §4 (re-run inside the hold)."""
    card = cards.get(conn, cmd.payment_intent_id)
    if card is None:
        raise NotFound(f"no card payment {cmd.payment_intent_id}")
    if card.status != cards.SUCCEEDED:
        raise FailedPrecondition(f"card payment {cmd.payment_intent_id} has not succeeded ({card.status})")
    remaining = card.amount_cents - card.refunded_cents
    if cmd.is_admin:
        if card.principal == cmd.principal:
            raise PermissionDenied("administrators may not refund a card payment they made themselves")
        fee_cents = 0
    else:
        if cmd.member_id != card.member_id:
            raise PermissionDenied(f"card payment {cmd.payment_intent_id} is not member {cmd.member_id}'s")
        applied_at = card.applied_at or card.created_at
        assert applied_at is not None
        if utcnow() - applied_at > timedelta(days=REFUND_WINDOW_DAYS):
            raise FailedPrecondition(f"card payments can be refunded within {REFUND_WINDOW_DAYS // 7} weeks; "
                                     f"this one is older")
        fee_cents = fee_half_up(cmd.amount_cents, current_fee_settings(conn).refund_fee_bp)
    if cmd.amount_cents > remaining:
        raise FailedPrecondition(f"only {format_cents(remaining)} of this card payment is left to refund")
    balance = balance_of(conn, member_account(card.member_id)) or 0
    if cmd.amount_cents > balance:
        raise FailedPrecondition(f"insufficient funds: the balance is {format_cents(balance)}, "
                                 f"the refund {format_cents(cmd.amount_cents)}")
    return card, fee_cents


def _legs(member_acct: int, amount_cents: int, fee_cents: int, sign: int) -> list[Leg]:
    stripe_acct, federation = system_account(SystemAccount.STRIPE), system_account(SystemAccount.FEDERATION)
    legs = [Leg(member_acct, -sign * amount_cents, stripe_acct, must_stay_non_negative=sign > 0)]
    if amount_cents - fee_cents:
        legs.append(Leg(stripe_acct, sign * (amount_cents - fee_cents), member_acct))
    if fee_cents:
        legs.append(Leg(federation, sign * fee_cents, member_acct))
    return legs


_HOLD_COLUMNS = select(refunds, card_payments.c.member_id).join(
    card_payments, card_payments.c.payment_intent_id == refunds.c.payment_intent_id)


def _hold_of(row) -> Hold:  # noqa: ANN001
    return Hold(row.id, row.member_id, row.amount_cents, row.fee_cents, row.card_amount_cents, row.status,
                row.stripe_refund_id or "", row.payment_intent_id, row.principal, row.stripe_key or "")


def _find_hold(conn: Connection, ref: str) -> Hold | None:
    """The refund made with Stripe key `ref`, pending or not."""
    row = conn.execute(_HOLD_COLUMNS.where(refunds.c.stripe_key == ref)).first()
    return None if row is None else _hold_of(row)


def _hold_by_id(conn: Connection, row_id: int) -> Hold:
    return _hold_of(conn.execute(_HOLD_COLUMNS.where(refunds.c.id == row_id)).one())


def pending_holds(conn: Connection, created_before: datetime, limit: int) -> list[Hold]:
    """Refunds still pending that were held before `created_before`, oldest first (the reconciler's).
    The common case finds none, in a statement that reads `refunds` alone: a background poll holds
    no lock on two tables at once."""
    ids = conn.execute(select(refunds.c.id).where(refunds.c.status == HELD, refunds.c.created_at < created_before)
                       .order_by(refunds.c.created_at).limit(limit)).scalars().all()
    return [_hold_by_id(conn, row_id) for row_id in ids]


def _lock_payment(conn: Connection, payment_intent_id: str) -> None:
    conn.execute(select(card_payments.c.payment_intent_id)
                 .where(card_payments.c.payment_intent_id == payment_intent_id).with_for_update())


def _hold(conn: Connection, cmd: RefundCommand, ref: str, once: Once) -> Hold | Replayed:
    # Refunds of one card payment take turns (a row lock on the card payment), so a
    # concurrent retry with the same key finds the first one's hold instead of taking the money again.
    _lock_payment(conn, cmd.payment_intent_id)
    stored = once.stored(conn)  # a first attempt finished meanwhile (its hold is no longer pending)
    if stored is not None:
        return Replayed(stored)
    existing = _find_hold(conn, ref)
    if existing is not None:
        if existing.payment_intent_id != cmd.payment_intent_id or existing.amount_cents != cmd.amount_cents:
            raise AlreadyExists("this idempotency key was already used for another refund; use a new key")
        if existing.status == REVERSED:
            raise FailedPrecondition("this refund was not made (Stripe refused it, or it never reached Stripe): "
                                     "its money was returned to the balance")
        return existing
    card, fee_cents = _check(conn, cmd)
    taken = conn.execute(
        update(card_payments)
        .where(card_payments.c.payment_intent_id == card.payment_intent_id,
               card_payments.c.refunded_cents + cmd.amount_cents <= card_payments.c.amount_cents)
        .values(refunded_cents=card_payments.c.refunded_cents + cmd.amount_cents)
    ).rowcount
    if taken != 1:
        raise FailedPrecondition("this card payment was refunded meanwhile; nothing is left to refund")
    booked = book(conn, NewTransaction(
        type=PostingType.CARD_REFUND, description="Card refund" + (f" (fee {format_cents(fee_cents)})" if fee_cents else ""),
        principal=cmd.principal, payment_id=card.payment_id,
        legs=_legs(member_account(card.member_id), cmd.amount_cents, fee_cents, +1)))
    row_id = conn.execute(insert(refunds).values(
        payment_intent_id=card.payment_intent_id, stripe_refund_id=cards.placeholder_id(ref), stripe_key=ref,
        amount_cents=cmd.amount_cents, fee_cents=fee_cents, card_amount_cents=cmd.amount_cents - fee_cents,
        status=HELD, transaction_id=booked.transaction_id, principal=cmd.principal, created_at=utcnow(),
    ).returning(refunds.c.id)).scalar_one()
    return Hold(row_id, card.member_id, cmd.amount_cents, fee_cents, cmd.amount_cents - fee_cents, HELD,
                cards.placeholder_id(ref), card.payment_intent_id, cmd.principal, ref)


def _remaining(conn: Connection, payment_intent_id: str) -> int:
    return conn.execute(select(card_payments.c.amount_cents - card_payments.c.refunded_cents)
                        .where(card_payments.c.payment_intent_id == payment_intent_id)).scalar_one()


def refund(db: Database, gateway: StripeGateway, once: Once, cmd: RefundCommand) -> RefundResult | Replayed:
    gateway.require()
    stored = db.read(once.stored)
    if stored is not None:
        return Replayed(stored)
    ref = once.stripe_key("refund")
    hold = db.run(lambda conn: _hold(conn, cmd, ref, once))
    if isinstance(hold, Replayed):
        return hold
    stripe_refund_id = hold.stripe_refund_id  # a hold the reconciler completed meanwhile keeps Stripe's id
    if hold.status == HELD:
        try:
            stripe_refund_id = make_at_stripe(gateway, hold)
        except Unavailable as exc:
            # the request may have reached Stripe: the hold stays and the reconciler settles it
            raise Unavailable(f"the refund of {format_cents(hold.card_amount_cents)} to the card: "
                              f"{OUTCOME_UNKNOWN} ({format_cents(hold.amount_cents)} held from the balance; "
                              f"{exc.message})") from exc
        except DomainError:
            db.run(lambda conn: release(conn, hold, cmd.principal, "Card refund refused by Stripe: returned"))
            raise

    def finish(conn: Connection) -> RefundResult | Replayed:
        _lock_payment(conn, cmd.payment_intent_id)  # in turn with holds: a hold sees this finished or not at all
        again = once.stored(conn)
        if again is not None:
            return Replayed(again)
        complete(conn, hold, stripe_refund_id)  # nothing to do when the reconciler completed it
        done = _hold_by_id(conn, hold.row_id)
        balance = balance_of(conn, member_account(hold.member_id)) or 0
        result = RefundResult(done.stripe_refund_id, hold.amount_cents, hold.fee_cents, hold.card_amount_cents,
                              balance, _remaining(conn, cmd.payment_intent_id))
        once.record(conn, result)
        return result

    return db.run(finish)


def make_at_stripe(gateway: StripeGateway, hold: Hold) -> str:
    """Ask Stripe to refund the card part of a hold (with the hold's Stripe key): Stripe's refund id,
    or the fee-only id when the card gets nothing. Raises Unavailable or Stripe's refusal."""
    if hold.card_amount_cents <= 0:
        return f"fee_only_{hold.row_id}"
    return gateway.refund(hold.payment_intent_id, hold.card_amount_cents, hold.stripe_key)


def complete(conn: Connection, hold: Hold, stripe_refund_id: str) -> bool:
    """The refund was made: mark it done with Stripe's id and emit REFUNDED, once (False when it
    was completed or released already)."""
    _lock_payment(conn, hold.payment_intent_id)
    done = conn.execute(update(refunds).where(refunds.c.id == hold.row_id, refunds.c.status == HELD)
                        .values(status=SUCCEEDED, stripe_refund_id=stripe_refund_id)).rowcount
    if done != 1:
        return False
    balance = balance_of(conn, member_account(hold.member_id)) or 0
    card = cards.get(conn, hold.payment_intent_id)
    assert card is not None
    emit(conn, NewEvent(EventKind.REFUNDED, member_id=hold.member_id, amount_cents=hold.amount_cents,
                        balance_cents=balance, payment_id=card.payment_id,
                        reason=f"card {format_cents(hold.card_amount_cents)}, fee {format_cents(hold.fee_cents)}"))
    return True


def release(conn: Connection, hold: Hold, principal: str, description: str) -> bool:
    """The refund was not made: give the held money back (a new transaction; postings are never
    undone), once (False when it was completed or released already)."""
    _lock_payment(conn, hold.payment_intent_id)
    done = conn.execute(update(refunds).where(refunds.c.id == hold.row_id, refunds.c.status == HELD)
                        .values(status=REVERSED)).rowcount
    if done != 1:
        return False
    conn.execute(update(card_payments).where(card_payments.c.payment_intent_id == hold.payment_intent_id)
                 .values(refunded_cents=card_payments.c.refunded_cents - hold.amount_cents))
    book(conn, NewTransaction(
        type=PostingType.CARD_REFUND, description=description, principal=principal,
        legs=_legs(member_account(hold.member_id), hold.amount_cents, hold.fee_cents, -1)))
    return True


def refunded_total(conn: Connection, payment_intent_id: str) -> int:
    return conn.execute(select(func.coalesce(func.sum(refunds.c.amount_cents), 0))
                        .where(refunds.c.payment_intent_id == payment_intent_id,
                               refunds.c.status.in_((HELD, SUCCEEDED)))).scalar_one()
