"""Transfer: member → member, or organisation → member (administrators)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from google.protobuf.message import Message
from sqlalchemy import Connection

from server.domain import validation
from server.domain.errors import InvalidArgument, PermissionDenied
from server.domain.money import MAX_AMOUNT_CENTS, TRANSFER_LIMIT_CENTS
from server.domain.types import EventKind, PostingType, member_account, organisation_account
from server.events.outbox import NewEvent, emit
from server.ledger import idempotency, transfer_statement
from server.ledger.db import Database
from server.ledger.ledger import Leg, NewTransaction, book, new_reference
from server.services.fees import DEFAULTS as DEFAULT_FEE_SETTINGS
from server.services.low_balance import low_balance_check
from server.services.pay import new_payment_id


@dataclass(frozen=True)
class TransferCommand:
    principal: str
    is_admin: bool
    to_member_id: int
    amount_cents: int
    description: str
    from_member_id: int | None = None
    from_organisation_id: int | None = None

    def validated(self) -> TransferCommand:
        if self.from_member_id is None and self.from_organisation_id is None:
            raise InvalidArgument.field("from", "set member_id or organisation_id")
        validation.positive_id("to_member_id", self.to_member_id)
        if self.from_member_id is not None:
            validation.positive_id("from.member_id", self.from_member_id)
            if self.from_member_id == self.to_member_id:
                raise InvalidArgument.field("to_member_id", "a member cannot transfer to themselves")
            validation.positive_amount("amount_cents", self.amount_cents, TRANSFER_LIMIT_CENTS)
        else:
            assert self.from_organisation_id is not None
            validation.positive_id("from.organisation_id", self.from_organisation_id)
            if not self.is_admin:
                raise PermissionDenied("only administrators transfer from an organisation")
            validation.positive_amount("amount_cents", self.amount_cents, MAX_AMOUNT_CENTS)
        description = validation.description(self.description)
        return self if description == self.description else replace(self, description=description)


@dataclass
class TransferResult:
    transfer_id: str
    from_balance_cents: int
    to_balance_cents: int
    reference: str
    topped_up_cents: int = 0
    needs_auto_top_up: bool = False


def transfer(conn: Connection, cmd: TransferCommand, transfer_id: str | None = None) -> TransferResult:
    transfer_id = transfer_id or new_payment_id()
    to_acct = member_account(cmd.to_member_id)
    if cmd.from_member_id is not None:
        from_acct = member_account(cmd.from_member_id)
        kind = PostingType.MEMBER_TRANSFER
    else:
        assert cmd.from_organisation_id is not None
        from_acct = organisation_account(cmd.from_organisation_id)
        kind = PostingType.ORG_TRANSFER
    booked = book(
        conn,
        NewTransaction(
            type=kind,
            description=cmd.description or kind.display_name,
            principal=cmd.principal,
            payment_id=transfer_id,
            legs=[
                Leg(from_acct, -cmd.amount_cents, to_acct, must_stay_non_negative=True),
                Leg(to_acct, cmd.amount_cents, from_acct),
            ],
            rows_at_commit=True,  # a transfer needs no transaction id
        ),
    )
    from_balance = booked.balances_after[from_acct]
    to_balance = booked.balances_after[to_acct]
    events = [
        NewEvent(
            EventKind.TRANSFER_RECEIVED,
            member_id=cmd.to_member_id,
            other_member_id=cmd.from_member_id or 0,
            organisation_id=cmd.from_organisation_id or 0,
            amount_cents=cmd.amount_cents,
            balance_cents=to_balance,
            payment_id=transfer_id,
            reference=booked.reference,
        )
    ]
    needs_top_up = False
    if cmd.from_member_id is not None:
        needs_top_up = low_balance_check(conn, cmd.from_member_id, from_balance, events)
    emit(conn, *events)
    return TransferResult(transfer_id, from_balance, to_balance, booked.reference, needs_auto_top_up=needs_top_up)


def in_one_statement(cmd: TransferCommand) -> bool:
    """Whether a Transfer may first be tried in one statement (PostgreSQL): member → member."""
    return cmd.from_member_id is not None


def new_batcher(db: Database) -> transfer_statement.TransferBatcher:
    """One per process: Transfers that arrive while a statement is in flight share the next one."""
    return transfer_statement.TransferBatcher(db, DEFAULT_FEE_SETTINGS.low_balance_limit_cents)


def member_transfer(cmd: TransferCommand, record: idempotency.Pending,
                    respond: Callable[[TransferResult], Message]) -> transfer_statement.MemberTransfer:
    """The Transfer as the one statement takes it, with a new transfer id and reference; its stored
    response is `respond`'s, with both balances after filled in by the statement."""
    assert in_one_statement(cmd) and cmd.from_member_id is not None
    transfer_id = new_payment_id()
    kind = PostingType.MEMBER_TRANSFER
    reference = new_reference(kind)
    head, mid, tail = idempotency.response_around(respond(TransferResult(transfer_id, 1, 1, reference)),
                                                  "from_balance_cents", "to_balance_cents")
    return transfer_statement.MemberTransfer(
        from_account_id=member_account(cmd.from_member_id),
        from_member_id=cmd.from_member_id,
        to_account_id=member_account(cmd.to_member_id),
        to_member_id=cmd.to_member_id,
        amount_cents=cmd.amount_cents,
        type=kind.value,
        description=cmd.description or kind.display_name,
        principal=cmd.principal,
        payment_id=transfer_id,
        reference=reference,
        event_kind=EventKind.TRANSFER_RECEIVED.value,
        record_principal=record.principal,
        record_key=record.key,
        record_method=record.method,
        record_request_hash=record.request_hash,
        response_head=head,
        response_mid=mid,
        response_tail=tail,
    )


def transferred_in_one_statement(t: transfer_statement.MemberTransfer,
                                 balances: tuple[int, int] | None) -> TransferResult | None:
    """The result of a Transfer the one statement booked, or None when it was left out and
    `transfer` must run in a unit of work."""
    if balances is None:
        return None
    from_balance, to_balance = balances
    assert from_balance >= 0, "a member balance is never negative after a Transfer"
    return TransferResult(t.payment_id, from_balance, to_balance, t.reference)
