"""Card payments in the ledger: the `card_payments` rows we keep for every Stripe PaymentIntent, and
what a PaymentIntent's success or failure books.

A row is written as `pending` BEFORE Stripe is called, under a placeholder id derived from the Stripe
idempotency key (`pending_<key>`); the PaymentIntent's id replaces it once Stripe answers. The
PaymentIntent carries the key in its metadata (`cobalt_ref`), so a webhook finds the row even when
the process crashed between Stripe's answer and our write. Every function here runs inside the
caller's transaction; none calls Stripe.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, delete, func, select, update
from sqlalchemy.dialects.postgresql import insert as insert_or_ignore

from server.domain.errors import InsufficientFunds, NotFound
from server.domain.types import (
    AutoTopUpStatus,
    EventKind,
    PostingType,
    SystemAccount,
    member_account,
    system_account,
)
from server.events.outbox import NewEvent, emit
from server.ledger import idempotency
from server.ledger.db import as_utc, utcnow
from server.ledger.ledger import Leg, NewTransaction, balance_of, book
from server.ledger.schema import accounts, card_payments, member_cards
from server.services.pay import PayCommand, new_payment_id, pay_from_balance
from server.stripe_gateway import Intent, stripe_key

log = logging.getLogger("payments.cards")

MANUAL_TOP_UP, AUTO_TOP_UP, PAY = "manual_top_up", "auto_top_up", "pay"
PENDING, SUCCEEDED, FAILED = "pending", "succeeded", "failed"
CREDIT_TYPE = {MANUAL_TOP_UP: PostingType.MANUAL_TOP_UP, AUTO_TOP_UP: PostingType.AUTO_TOP_UP,
               PAY: PostingType.CC_PAYMENT}
MAX_REASON_CHARS = 200


def placeholder_id(ref: str) -> str:
    return f"pending_{ref}"


def ref_payment_id(ref: str) -> str:
    """The payment id of the card payment made under Stripe key `ref`: derived from it, so it is the
    same for every retry, and it stays findable after the row takes its PaymentIntent's id."""
    return "pay_" + hashlib.sha256(ref.encode()).hexdigest()[:20]


@dataclass(frozen=True)
class CardPayment:
    payment_intent_id: str
    member_id: int
    purpose: str
    amount_cents: int
    status: str
    payment_id: str
    pending_request: str | None
    principal: str
    refunded_cents: int
    failure_reason: str
    created_at: datetime | None
    applied_at: datetime | None

    @property
    def is_placeholder(self) -> bool:
        return self.payment_intent_id.startswith("pending_")

    def pay_command(self) -> PayCommand | None:
        if not self.pending_request:
            return None
        return pay_command_from_json(self.pending_request)


def _row(row) -> CardPayment:  # noqa: ANN001
    return CardPayment(row.payment_intent_id, row.member_id, row.purpose, row.amount_cents, row.status,
                       row.payment_id or "", row.pending_request, row.principal, row.refunded_cents,
                       row.failure_reason or "", as_utc(row.created_at), as_utc(row.applied_at))


def pay_command_to_json(cmd: PayCommand) -> str:
    data = asdict(cmd)
    data["payment_type"] = cmd.payment_type.value
    return json.dumps(data, sort_keys=True)


def pay_command_from_json(text: str) -> PayCommand:
    data = json.loads(text)
    data["payment_type"] = PostingType(data["payment_type"])
    return PayCommand(**data)


def get(conn: Connection, payment_intent_id: str) -> CardPayment | None:
    row = conn.execute(select(card_payments).where(card_payments.c.payment_intent_id == payment_intent_id)).first()
    return None if row is None else _row(row)


def start_pending(conn: Connection, ref: str, member_id: int, purpose: str, amount_cents: int, principal: str,
                  pending_request: str | None = None, payment_id: str | None = None,
                  once: Once | None = None,
                  check: Callable[[Connection], None] | None = None) -> CardPayment | Replayed:
    """The pending row for a PaymentIntent about to be created with Stripe idempotency key `ref`.
    A retry with the same key finds the row written by the first attempt, or (`once`) the stored
    response of a first attempt that has finished meanwhile. `check` runs before a row is written
    (not for a retry that finds it), in this transaction, and may refuse it."""
    if once is not None:
        stored = once.stored(conn)
        if stored is not None:
            return Replayed(stored)
    existing = get(conn, placeholder_id(ref))
    if existing is not None:
        if existing.status != FAILED:
            return existing
        # voided by the reconciler (the first attempt never reached Stripe): this retry is the
        # request again, checked again
        if check is not None:
            check(conn)
        return _claim(conn, existing, PENDING, (FAILED,)) or existing
    if check is not None:
        check(conn)
    # insert-or-nothing: a concurrent retry with the same key may have written it first
    conn.execute(insert_or_ignore(card_payments).on_conflict_do_nothing(index_elements=["payment_intent_id"]).values(
        payment_intent_id=placeholder_id(ref), member_id=member_id, purpose=purpose, amount_cents=amount_cents,
        status=PENDING, payment_id=payment_id or ref_payment_id(ref), pending_request=pending_request,
        principal=principal, created_at=utcnow()))
    found = get(conn, placeholder_id(ref))
    assert found is not None
    return found


def bind_intent(conn: Connection, ref: str, payment_intent_id: str) -> CardPayment | None:
    """Give the pending row its PaymentIntent id (idempotent; a webhook may have done it)."""
    bound = get(conn, payment_intent_id)
    placeholder = get(conn, placeholder_id(ref)) if ref else None
    if bound is not None:
        if placeholder is not None:
            conn.execute(delete(card_payments).where(card_payments.c.payment_intent_id == placeholder_id(ref)))
        return bound
    if placeholder is None:
        return None
    conn.execute(update(card_payments).where(card_payments.c.payment_intent_id == placeholder_id(ref))
                 .values(payment_intent_id=payment_intent_id))
    return get(conn, payment_intent_id)


def mismatch(card: CardPayment, intent: Intent, currency: str) -> str | None:
    """What differs between a PaymentIntent and the card payment we made it for (None: nothing).
    Money is credited only for what we asked for: this member, this purpose, this amount, our currency."""
    if intent.metadata.get("member_id") != str(card.member_id):
        return f"member {intent.metadata.get('member_id', '')!r}, ours {card.member_id}"
    if intent.metadata.get("purpose") != card.purpose:
        return f"purpose {intent.metadata.get('purpose', '')!r}, ours {card.purpose!r}"
    if intent.amount_cents != card.amount_cents:
        return f"amount {intent.amount_cents}, ours {card.amount_cents}"
    if intent.currency != currency.lower():
        return f"currency {intent.currency!r}, ours {currency.lower()!r}"
    return None


def adopt(conn: Connection, intent: Intent, currency: str) -> CardPayment | None:
    """A top-up PaymentIntent of ours (its metadata says so) that has no row: a second one made for
    one key by a Stripe that ignored the idempotency key (Stripe itself returns the first). Its money
    is real, so it gets a row and is credited like any top-up: card money is never lost. `intent` is
    Stripe's own (retrieved or answered by Stripe), never an event's word alone."""
    metadata = intent.metadata
    ref, purpose, member = metadata.get("cobalt_ref", ""), metadata.get("purpose", ""), metadata.get("member_id", "")
    if not ref or purpose not in (MANUAL_TOP_UP, AUTO_TOP_UP) or not member.isdigit():
        return None
    # only a key this database issued for this member: another deployment sharing the Stripe
    # account sends us its events too, and they are not ours to credit
    issued_row = conn.execute(select(card_payments).where(
        card_payments.c.member_id == int(member), card_payments.c.payment_id == ref_payment_id(ref),
        card_payments.c.purpose == purpose)).first()
    if issued_row is None:
        return None
    issued = _row(issued_row)
    problem = mismatch(issued, intent, currency)
    if problem is not None:  # a twin is the same request again: anything else is not ours to credit
        log.error("card payment %s: not adopted, it differs from card payment %s made with its key: %s",
                  intent.id, issued.payment_intent_id, problem)
        return None
    log.warning("card payment %s: adopting a PaymentIntent made twice for one key", intent.id)
    conn.execute(insert_or_ignore(card_payments).on_conflict_do_nothing(index_elements=["payment_intent_id"]).values(
        payment_intent_id=intent.id, member_id=int(member), purpose=purpose, amount_cents=intent.amount_cents,
        status=PENDING, payment_id=new_payment_id(), principal="stripe", created_at=utcnow()))
    return get(conn, intent.id)


def find_for_intent(conn: Connection, intent: Intent, currency: str, *, adopt_twin: bool = True) -> CardPayment | None:
    """Our row for a PaymentIntent that matches it (`mismatch`): by its id, else by the key it carries
    in its metadata (the pending row of a create whose answer never came), else adopted (`adopt_twin`).
    A row that differs is logged at error level and None is answered: nothing is credited for it."""
    row = get(conn, intent.id)
    if row is None:
        ref = intent.metadata.get("cobalt_ref", "")
        placeholder = get(conn, placeholder_id(ref)) if ref else None
        if placeholder is None:
            return adopt(conn, intent, currency) if adopt_twin else None
        row = placeholder
    problem = mismatch(row, intent, currency)
    if problem is not None:
        log.error("card payment %s: the PaymentIntent %s differs from ours: %s; nothing applied",
                  row.payment_intent_id, intent.id, problem)
        return None
    return bind_intent(conn, intent.metadata.get("cobalt_ref", ""), intent.id) if row.is_placeholder else row


def intent_metadata(ref: str, member_id: int, purpose: str) -> dict[str, str]:
    return {"cobalt_ref": ref, "member_id": str(member_id), "purpose": purpose}


@dataclass
class Applied:
    card: CardPayment
    applied_now: bool
    balance_cents: int
    reference: str = ""
    payment_reference: str = ""


def _claim(conn: Connection, card: CardPayment, status: str, from_statuses: tuple[str, ...],
           reason: str = "") -> CardPayment | None:
    """Move the row to `status` if it is still in one of `from_statuses`, else None. One statement:
    of two racing transactions (a webhook and ConfirmCardPayment) the second waits for the first's
    row lock, then finds the status changed and claims nothing, so money is booked once."""
    values: dict = {"status": status}
    if status == SUCCEEDED:
        values["applied_at"] = utcnow()
    if reason:
        values["failure_reason"] = reason[:MAX_REASON_CHARS]
    claimed = conn.execute(update(card_payments)
                           .where(card_payments.c.payment_intent_id == card.payment_intent_id,
                                  card_payments.c.status.in_(from_statuses))
                           .values(**values)).rowcount
    if claimed != 1:
        return None
    found = get(conn, card.payment_intent_id)
    assert found is not None
    return found


def apply_success(conn: Connection, card: CardPayment, intent: Intent, currency: str) -> Applied:
    """Stripe says the PaymentIntent succeeded: credit the card money (once) and, for a card payment
    of a Pay, book the Pay with its PAYMENT_SUCCEEDED event, all in this transaction."""
    member_acct = member_account(card.member_id)
    problem = mismatch(card, intent, currency)
    if problem is not None:
        # never credit what we did not ask for; an auditor will want to see this
        log.error("card payment %s: %s; not applied", card.payment_intent_id, problem)
        return Applied(card, False, balance_of(conn, member_acct) or 0)
    claimed = _claim(conn, card, SUCCEEDED, (PENDING, FAILED))
    if claimed is None:  # applied already (or concurrently, by the other path)
        current = get(conn, card.payment_intent_id)
        return Applied(current or card, False, balance_of(conn, member_acct) or 0)
    card = claimed
    credit_type = CREDIT_TYPE[card.purpose]
    stripe_acct = system_account(SystemAccount.STRIPE)
    booked = book(conn, NewTransaction(
        type=credit_type, description=f"{credit_type.display_name} by card", principal=card.principal,
        payment_id=card.payment_id,
        legs=[Leg(stripe_acct, -card.amount_cents, member_acct), Leg(member_acct, card.amount_cents, stripe_acct)],
    ))
    balance = booked.balances_after[member_acct]
    applied = Applied(card, True, balance, booked.reference)
    if card.purpose != PAY:
        emit(conn, NewEvent(EventKind.TOP_UP_SUCCEEDED, member_id=card.member_id, amount_cents=card.amount_cents,
                            balance_cents=balance, payment_id=card.payment_id, reference=booked.reference))
        return applied
    cmd = card.pay_command()
    assert cmd is not None, "a card payment of a Pay keeps the Pay to book"
    if cmd.ensure_funds_only:
        emit(conn, cmd.success_event(card.payment_id, booked.reference, balance))
        return applied
    try:
        with conn.begin_nested():
            result = pay_from_balance(conn, cmd, card.payment_id)
    except (InsufficientFunds, NotFound) as refused:
        # the balance changed since the card payment was asked for (or the payee went away):
        # the card money stays on the balance, and the caller hears that the Pay failed
        emit(conn, NewEvent(EventKind.PAYMENT_FAILED, member_id=cmd.member_id, organisation_id=cmd.organisation_id or 0,
                            other_member_id=cmd.other_member_id or 0, amount_cents=cmd.amount_cents,
                            balance_cents=balance, payment_id=card.payment_id, route_code=cmd.route_code,
                            route_payload=cmd.route_payload, event_id=cmd.event_id or 0,
                            session_id=cmd.session_id or 0,
                            reason=f"the card payment was credited to the balance but the Pay was not booked: "
                                   f"{refused.message}"[:MAX_REASON_CHARS]))
        return applied
    applied.balance_cents = result.balance_cents
    applied.payment_reference = result.reference
    return applied


def pending_before(conn: Connection, created_before: datetime, limit: int) -> list[CardPayment]:
    """Card payments still pending that were started before `created_before`, oldest first."""
    rows = conn.execute(select(card_payments).where(card_payments.c.status == PENDING,
                                                    card_payments.c.created_at < created_before)
                        .order_by(card_payments.c.created_at).limit(limit)).all()
    return [_row(row) for row in rows]


def void(conn: Connection, card: CardPayment, reason: str) -> CardPayment | None:
    """A pending card payment that never became a PaymentIntent at Stripe (the create's answer never
    came, and Stripe has none with its key): closed as failed with no event and no change to auto
    top-up, since nothing was tried at Stripe. The row stays, so a PaymentIntent that still turns up
    with its key is found (`find_for_intent`) and, if it succeeded, credited."""
    return _claim(conn, card, FAILED, (PENDING,), reason)


# Namespace of the transaction-level advisory locks that make a member's top-up checks take turns
# (the two-key form: it cannot meet the one-key locks of migrations and the outbox).
_TOP_UP_LOCKS = 0x746F7075  # "topu"


def balance_and_pending_top_ups(conn: Connection, member_id: int) -> tuple[int, int]:
    """The member's balance and card top-ups still pending (money that may yet lift the balance),
    read after taking the member's top-up lock, held to the end of this transaction: two top-ups
    started together are checked one after the other, each seeing the other's pending row. One
    statement, so the two figures are one snapshot (a top-up credited meanwhile is counted once)."""
    conn.execute(select(func.pg_advisory_xact_lock(_TOP_UP_LOCKS, member_id % 2**31)))
    pending = (select(func.coalesce(func.sum(card_payments.c.amount_cents), 0))
               .where(card_payments.c.member_id == member_id, card_payments.c.status == PENDING,
                      card_payments.c.purpose.in_((MANUAL_TOP_UP, AUTO_TOP_UP))).scalar_subquery())
    balance = select(accounts.c.balance_cents).where(accounts.c.id == member_account(member_id)).scalar_subquery()
    row = conn.execute(select(func.coalesce(balance, 0), pending)).one()
    return int(row[0]), int(row[1])


def mark_failed(conn: Connection, card: CardPayment, reason: str, route_code: str = "",
                route_payload: str = "") -> CardPayment:
    """Stripe says the PaymentIntent failed: record it once and tell subscribers (an auto top-up
    failure carries the route of the Pay that needed it)."""
    reason = (reason or "the card payment failed")[:MAX_REASON_CHARS]
    claimed = _claim(conn, card, FAILED, (PENDING,), reason)
    if claimed is None:  # already failed, or succeeded: a late failure changes nothing
        return get(conn, card.payment_intent_id) or card
    card = claimed
    balance = balance_of(conn, member_account(card.member_id)) or 0
    if card.purpose == PAY:
        cmd = card.pay_command()
        assert cmd is not None
        emit(conn, NewEvent(EventKind.PAYMENT_FAILED, member_id=cmd.member_id, organisation_id=cmd.organisation_id or 0,
                            other_member_id=cmd.other_member_id or 0, amount_cents=cmd.amount_cents,
                            balance_cents=balance, payment_id=card.payment_id, route_code=cmd.route_code,
                            route_payload=cmd.route_payload, event_id=cmd.event_id or 0,
                            session_id=cmd.session_id or 0, reason=reason))
    elif card.purpose == AUTO_TOP_UP:
        conn.execute(update(member_cards).where(member_cards.c.member_id == card.member_id)
                     .values(auto_top_up_status=int(AutoTopUpStatus.FAILED), updated_at=utcnow()))
        emit(conn, NewEvent(EventKind.AUTO_TOP_UP_FAILED, member_id=card.member_id, amount_cents=card.amount_cents,
                            balance_cents=balance, payment_id=card.payment_id, reason=reason, route_code=route_code,
                            route_payload=route_payload))
    return card


# ---------------------------------------------------------------- idempotent requests that call Stripe
@dataclass(frozen=True)
class Once:
    """One idempotent request (SPEC §3) whose flow calls Stripe: `mutate` cannot hold a transaction
    across Stripe, so the flow checks for a stored result first, calls Stripe outside any
    transaction, and records its result in the final transaction that books."""

    principal: str
    key: str
    method: str
    request_hash: str

    @property
    def pending(self) -> idempotency.Pending:
        return idempotency.Pending(self.principal, self.key, self.method, self.request_hash)

    def stored(self, conn: Connection) -> Any | None:
        """The stored result of an earlier identical request, or None."""
        found = idempotency.lookup(conn, self.pending)
        return None if found is None else found.result

    def record(self, conn: Connection, result: Any) -> None:
        self.pending.record(conn, result)

    def stripe_key(self, purpose: str) -> str:
        return stripe_key(self.principal, self.key, purpose)


Replayed = idempotency.Replayed  # the stored result of an earlier identical request
