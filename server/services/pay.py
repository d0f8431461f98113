"""Pay from balance (SPEC §4 Pay, the original payment_api)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field, replace

from sqlalchemy import Connection

from server.domain import validation
from server.domain.errors import InsufficientFunds, InvalidArgument
from server.domain.money import MAX_AMOUNT_CENTS, MAX_ROUTE_CODE_CHARS, MAX_ROUTE_PAYLOAD_CHARS, TRANSFER_LIMIT_CENTS
from server.domain.types import EventKind, PostingType, member_account, organisation_account
from server.ledger import idempotency
from server.ledger.ledger import Booked, Leg, NewEvent, NewTransaction, balance_of, emit
from server.services.accounts import require_account
from server.services.group_commit import book_one
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
        validation.caller_payment_type("payment_type", self.payment_type)
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


@dataclass(frozen=True)
class PayRequest:
    """A Pay from the balance as `group_commit.book_many` takes it (one of a group, or alone)."""

    cmd: PayCommand
    pending: idempotency.Pending | None
    payment_id: str = field(default_factory=new_payment_id)

    def plan(self, conn: Connection) -> NewTransaction | PayResult:
        cmd = self.cmd
        payment_id = self.payment_id
        member_acct = member_account(cmd.member_id)
        if cmd.ensure_funds_only:  # make sure of the funds, book nothing
            require_account(conn, cmd.payee_account)
            balance = balance_of(conn, member_acct) or 0
            if balance < cmd.amount_cents:
                raise InsufficientFunds(balance, cmd.amount_cents)
            return PayResult(payment_id, balance)
        return NewTransaction(
            type=cmd.payment_type,
            description=cmd.description,
            principal=cmd.principal,
            payment_id=payment_id,
            event_id=cmd.event_id,
            session_id=cmd.session_id,
            legs=[
                Leg(member_acct, -cmd.amount_cents, cmd.payee_account, must_stay_non_negative=True),
                Leg(cmd.payee_account, cmd.amount_cents, member_acct),
            ],
        )

    def finish(self, conn: Connection, booked: Booked) -> PayResult:
        cmd = self.cmd
        payment_id = self.payment_id
        balance = booked.balances_after[member_account(cmd.member_id)]
        assert balance >= 0, "a member balance is never negative after a Pay"
        events = [cmd.success_event(payment_id, booked.reference, balance)]
        if cmd.other_member_id is not None:
            events.append(NewEvent(
                EventKind.TRANSFER_RECEIVED,
                member_id=cmd.other_member_id,
                other_member_id=cmd.member_id,
                amount_cents=cmd.amount_cents,
                balance_cents=booked.balances_after[cmd.payee_account],
                payment_id=payment_id,
                reference=booked.reference,
                route_code=cmd.route_code,
                route_payload=cmd.route_payload,
            ))
        needs_top_up = low_balance_check(conn, cmd.member_id, balance, events)
        emit(conn, *events)
        return PayResult(payment_id, balance, booked.reference, needs_auto_top_up=needs_top_up)


def pay_from_balance(conn: Connection, cmd: PayCommand, payment_id: str | None = None) -> PayResult:
    """Book member → payee in this unit of work when the balance covers it; raise InsufficientFunds
    otherwise. The caller records the result (card flows)."""
    return book_one(conn, PayRequest(cmd, None, payment_id or new_payment_id()))
