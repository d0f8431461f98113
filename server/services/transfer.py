"""Transfer: member → member, or organisation → member (administrators)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from sqlalchemy import Connection

from server.domain import validation
from server.domain.errors import InvalidArgument, PermissionDenied
from server.domain.money import MAX_AMOUNT_CENTS, TRANSFER_LIMIT_CENTS
from server.domain.types import EventKind, PostingType, member_account, organisation_account
from server.ledger import idempotency
from server.ledger.ledger import Booked, Leg, NewEvent, NewTransaction, emit
from server.services.group_commit import book_one
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


@dataclass(frozen=True)
class TransferRequest:
    """A Transfer as `group_commit.book_many` takes it (one of a group, or alone)."""

    cmd: TransferCommand
    pending: idempotency.Pending | None
    transfer_id: str = field(default_factory=new_payment_id)

    @property
    def from_account(self) -> int:
        if self.cmd.from_member_id is not None:
            return member_account(self.cmd.from_member_id)
        assert self.cmd.from_organisation_id is not None
        return organisation_account(self.cmd.from_organisation_id)

    def plan(self, conn: Connection) -> NewTransaction:
        cmd = self.cmd
        kind = PostingType.MEMBER_TRANSFER if cmd.from_member_id is not None else PostingType.ORG_TRANSFER
        to_acct = member_account(cmd.to_member_id)
        return NewTransaction(
            type=kind,
            description=cmd.description or kind.display_name,
            principal=cmd.principal,
            payment_id=self.transfer_id,
            legs=[
                Leg(self.from_account, -cmd.amount_cents, to_acct, must_stay_non_negative=True),
                Leg(to_acct, cmd.amount_cents, self.from_account),
            ],
        )

    def finish(self, conn: Connection, booked: Booked) -> TransferResult:
        cmd = self.cmd
        from_balance = booked.balances_after[self.from_account]
        to_balance = booked.balances_after[member_account(cmd.to_member_id)]
        assert from_balance >= 0, "a transfer never takes its payer below zero"
        events = [
            NewEvent(
                EventKind.TRANSFER_RECEIVED,
                member_id=cmd.to_member_id,
                other_member_id=cmd.from_member_id or 0,
                organisation_id=cmd.from_organisation_id or 0,
                amount_cents=cmd.amount_cents,
                balance_cents=to_balance,
                payment_id=self.transfer_id,
                reference=booked.reference,
            )
        ]
        needs_top_up = False
        if cmd.from_member_id is not None:
            needs_top_up = low_balance_check(conn, cmd.from_member_id, from_balance, events)
        emit(conn, *events)
        return TransferResult(self.transfer_id, from_balance, to_balance, booked.reference,
                              needs_auto_top_up=needs_top_up)


def transfer(conn: Connection, cmd: TransferCommand) -> TransferResult:
    """Book the transfer in this unit of work; the caller records the result (card flows)."""
    return book_one(conn, TransferRequest(cmd, None))
