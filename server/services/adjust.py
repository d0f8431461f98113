"""Manual adjustments by administrators, against the `adjustments` system account."""

from __future__ import annotations

from dataclasses import dataclass, replace

from sqlalchemy import Connection

from server.domain import validation
from server.domain.errors import InvalidArgument
from server.domain.money import MAX_AMOUNT_CENTS
from server.domain.types import AccountKind, EventKind, PostingType, SystemAccount, split_account_id, system_account
from server.events.outbox import NewEvent, emit
from server.ledger.ledger import Leg, NewTransaction, book
from server.services.pay import new_payment_id


@dataclass(frozen=True)
class AdjustCommand:
    principal: str
    account_id: int  # a member or organisation account
    amount_cents: int
    description: str

    def validated(self) -> AdjustCommand:
        if self.amount_cents == 0:
            raise InvalidArgument.field("amount_cents", "must not be zero")
        if abs(self.amount_cents) > MAX_AMOUNT_CENTS:
            raise InvalidArgument.field("amount_cents", f"must be at most {MAX_AMOUNT_CENTS} cents either way")
        description = validation.description(self.description, required=True)
        return self if description == self.description else replace(self, description=description)


@dataclass
class AdjustResult:
    adjustment_id: str
    balance_cents: int
    reference: str

    @property
    def balance_negative(self) -> bool:
        return self.balance_cents < 0


def adjust(conn: Connection, cmd: AdjustCommand) -> AdjustResult:
    adjustment_id = new_payment_id()
    counter = system_account(SystemAccount.ADJUSTMENTS)
    booked = book(
        conn,
        NewTransaction(
            type=PostingType.MANUAL_ADJUSTMENT,
            description=cmd.description,
            principal=cmd.principal,
            payment_id=adjustment_id,
            legs=[Leg(cmd.account_id, cmd.amount_cents, counter), Leg(counter, -cmd.amount_cents, cmd.account_id)],
        ),
    )
    balance = booked.balances_after[cmd.account_id]
    kind, ext = split_account_id(cmd.account_id)
    emit(
        conn,
        NewEvent(
            EventKind.ADJUSTED,
            member_id=ext if kind == AccountKind.MEMBER else 0,
            organisation_id=ext if kind == AccountKind.ORGANISATION else 0,
            amount_cents=cmd.amount_cents,
            balance_cents=balance,
            payment_id=adjustment_id,
            reference=booked.reference,
            reason=cmd.description,
        ),
    )
    return AdjustResult(adjustment_id, balance, booked.reference)
