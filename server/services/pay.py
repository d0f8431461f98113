"""Pay from balance (SPEC §4 Pay, the original payment_api)."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, replace

from google.protobuf.message import Message
from sqlalchemy import Connection

from server.domain import validation
from server.domain.errors import InsufficientFunds, InvalidArgument
from server.domain.money import MAX_AMOUNT_CENTS, MAX_ROUTE_CODE_CHARS, MAX_ROUTE_PAYLOAD_CHARS, TRANSFER_LIMIT_CENTS
from server.domain.types import EventKind, PostingType, member_account, organisation_account
from server.events.outbox import NewEvent, emit
from server.ledger import idempotency, one_statement
from server.ledger.db import Database
from server.ledger.ledger import Leg, NewTransaction, balance_of, book, new_reference
from server.services.accounts import require_account
from server.services.fees import DEFAULTS as DEFAULT_FEE_SETTINGS
from server.services.low_balance import low_balance_check


@dataclass(frozen=True)
class PayCommand:
    principal: str
    member_id: int
    amount_cents: int
    organisation_id: int | None
    other_member_id: int | None
    description: str
    payment_type: PostingType
    route_code: str = ""
    route_payload: str = ""
    event_id: int | None = None
    session_id: int | None = None
    ensure_funds_only: bool = False

    def validated(self) -> PayCommand:
        validation.positive_id("member_id", self.member_id)
        if self.organisation_id is None and self.other_member_id is None:
            raise InvalidArgument.field("payee", "set organisation_id or other_member_id")
        if self.organisation_id is not None:
            validation.positive_id("organisation_id", self.organisation_id)
        if self.other_member_id is not None:
            validation.positive_id("other_member_id", self.other_member_id)
            if self.other_member_id == self.member_id:
                raise InvalidArgument.field("other_member_id", "a member cannot pay themselves")
        # money from one member to another is a transfer, whichever RPC carries it: the same limit
        limit_cents = TRANSFER_LIMIT_CENTS if self.other_member_id is not None else MAX_AMOUNT_CENTS
        validation.positive_amount("amount_cents", self.amount_cents, limit_cents)
        description = validation.description(self.description)
        route_code = validation.bounded_text("route_code", self.route_code, MAX_ROUTE_CODE_CHARS)
        if len(self.route_payload) > MAX_ROUTE_PAYLOAD_CHARS:
            raise InvalidArgument.field("route_payload", f"is longer than {MAX_ROUTE_PAYLOAD_CHARS} characters")
        if description != self.description or route_code != self.route_code:  # keep what was checked
            return replace(self, description=description, route_code=route_code)
        return self

    @property
    def payee_account(self) -> int:
        if self.organisation_id is not None:
            return organisation_account(self.organisation_id)
        assert self.other_member_id is not None
        return member_account(self.other_member_id)

    def success_event(self, payment_id: str, reference: str, balance_cents: int) -> NewEvent:
        return NewEvent(
            EventKind.PAYMENT_SUCCEEDED,
            member_id=self.member_id,
            organisation_id=self.organisation_id or 0,
            other_member_id=self.other_member_id or 0,
            amount_cents=self.amount_cents,
            balance_cents=balance_cents,
            payment_id=payment_id,
            reference=reference,
            route_code=self.route_code,
            route_payload=self.route_payload,
            event_id=self.event_id or 0,
            session_id=self.session_id or 0,
        )


@dataclass
class PayResult:
    payment_id: str
    balance_cents: int
    reference: str = ""
    topped_up_cents: int = 0
    needs_auto_top_up: bool = False  # balance left below the low limit with auto top-up ON


def new_payment_id() -> str:
    return "pay_" + secrets.token_hex(10)


def pay_from_balance(conn: Connection, cmd: PayCommand, payment_id: str | None = None) -> PayResult:
    """Book member → payee when the balance covers it; raise InsufficientFunds otherwise."""
    payment_id = payment_id or new_payment_id()
    member_acct = member_account(cmd.member_id)
    payee_acct = cmd.payee_account
    if cmd.ensure_funds_only:
        require_account(conn, payee_acct)
        balance = balance_of(conn, member_acct) or 0
        if balance < cmd.amount_cents:
            raise InsufficientFunds(balance, cmd.amount_cents)
        return PayResult(payment_id, balance)
    try:
        booked = book(
            conn,
            NewTransaction(
                type=cmd.payment_type,
                description=cmd.description,
                principal=cmd.principal,
                payment_id=payment_id,
                event_id=cmd.event_id,
                session_id=cmd.session_id,
                legs=[
                    Leg(member_acct, -cmd.amount_cents, payee_acct, must_stay_non_negative=True),
                    Leg(payee_acct, cmd.amount_cents, member_acct),
                ],
                # an organisation's balance is not needed here: credit it at the commit, so a
                # congress taking entries does not serialise every payment on its row lock
                late_credits=cmd.organisation_id is not None,
                rows_at_commit=True,  # a payment needs no transaction id
            ),
        )
    except InsufficientFunds:
        # the member's leg is applied first: an unknown payee must still be NOT_FOUND, never a
        # shortfall that a card path would try to cover
        require_account(conn, payee_acct)
        raise
    balance = booked.balances_after[member_acct]
    assert balance >= 0, "a member balance is never negative after a Pay"
    events = [cmd.success_event(payment_id, booked.reference, balance)]
    if cmd.other_member_id is not None:
        events.append(
            NewEvent(
                EventKind.TRANSFER_RECEIVED,
                member_id=cmd.other_member_id,
                other_member_id=cmd.member_id,
                amount_cents=cmd.amount_cents,
                balance_cents=booked.balances_after[payee_acct],
                payment_id=payment_id,
                reference=booked.reference,
                route_code=cmd.route_code,
                route_payload=cmd.route_payload,
            )
        )
    needs_top_up = low_balance_check(conn, cmd.member_id, balance, events)
    emit(conn, *events)
    return PayResult(payment_id, balance, booked.reference, needs_auto_top_up=needs_top_up)


def in_one_statement(cmd: PayCommand) -> bool:
    """Whether a Pay may first be tried in one statement (PostgreSQL): a booking to an organisation."""
    return cmd.organisation_id is not None and not cmd.ensure_funds_only


def new_batcher(db: Database) -> one_statement.PaymentBatcher:
    """One per process: Pays that arrive while a statement is in flight share the next one."""
    return one_statement.PaymentBatcher(db, DEFAULT_FEE_SETTINGS.low_balance_limit_cents)


def member_payment(cmd: PayCommand, record: idempotency.Pending,
                   respond: Callable[[PayResult], Message]) -> one_statement.MemberPayment:
    """The Pay as the one statement takes it, with a new payment id and reference; its stored
    response is `respond`'s, with the balance after the statement fills in."""
    assert in_one_statement(cmd) and cmd.organisation_id is not None
    payment_id = new_payment_id()
    reference = new_reference(cmd.payment_type)
    head, tail = idempotency.response_around(respond(PayResult(payment_id, 1, reference)), "balance_cents")
    return one_statement.MemberPayment(
        organisation_account_id=cmd.payee_account,
        organisation_id=cmd.organisation_id,
        member_account_id=member_account(cmd.member_id),
        member_id=cmd.member_id,
        amount_cents=cmd.amount_cents,
        type=cmd.payment_type.value,
        description=cmd.description,
        principal=cmd.principal,
        payment_id=payment_id,
        reference=reference,
        event_id=cmd.event_id,
        session_id=cmd.session_id,
        event_kind=EventKind.PAYMENT_SUCCEEDED.value,
        route_code=cmd.route_code,
        route_payload=cmd.route_payload,
        record_principal=record.principal,
        record_key=record.key,
        record_method=record.method,
        record_request_hash=record.request_hash,
        response_head=head,
        response_tail=tail,
    )


def paid_in_one_statement(payment: one_statement.MemberPayment, balance_cents: int | None) -> PayResult | None:
    """The result of a Pay the one statement booked (`balance_cents` is the member's balance
    after), or None when it was left out and `pay_from_balance` must run in a unit of work."""
    if balance_cents is None:
        return None
    assert balance_cents >= 0, "a member balance is never negative after a Pay"
    return PayResult(payment.payment_id, balance_cents, payment.reference)
