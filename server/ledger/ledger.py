"""The one place that writes postings and balances.

`book()` takes a transaction of two or more legs that sum to zero, locks the accounts in the one
global order (types.lock_rank), applies each leg with a single statement that also checks funds
where the leg must not take the balance below zero, and appends the postings with the balance
after each. Everything runs inside the caller's database transaction.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import Connection, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite

from server.domain.errors import InsufficientFunds, NotFound
from server.domain.types import AccountKind, PostingType, lock_rank, split_account_id
from server.ledger.db import utcnow
from server.ledger.schema import accounts, postings, transactions

_REF_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # Crockford base32: no I, L, O, U
_REF_PREFIX = {
    PostingType.MEMBER_TRANSFER: "TRF",
    PostingType.ORG_TRANSFER: "OTR",
    PostingType.MANUAL_TOP_UP: "TOP",
    PostingType.AUTO_TOP_UP: "ATU",
    PostingType.CC_PAYMENT: "CCP",
    PostingType.SETTLEMENT: "SET",
    PostingType.MANUAL_ADJUSTMENT: "ADJ",
    PostingType.REFUND: "REF",
    PostingType.CARD_REFUND: "CRF",
}


def new_reference(posting_type: PostingType) -> str:
    """A unique, human-readable reference such as PAY-7KQ3-M9ZT-2WXA (60 random bits)."""
    body = "".join(secrets.choice(_REF_ALPHABET) for _ in range(12))
    return f"{_REF_PREFIX.get(posting_type, 'PAY')}-{body[:4]}-{body[4:8]}-{body[8:]}"


@dataclass(frozen=True)
class Leg:
    account_id: int
    amount_cents: int
    counterparty_account_id: int | None = None
    # the leg may not take the account below zero (members paying, organisations transferring)
    must_stay_non_negative: bool = False


@dataclass(frozen=True)
class NewTransaction:
    type: PostingType
    description: str
    principal: str
    legs: list[Leg]
    payment_id: str | None = None
    batch_id: str | None = None
    event_id: int | None = None
    session_id: int | None = None


@dataclass
class Booked:
    transaction_id: int
    reference: str
    created_at: datetime
    balances_after: dict[int, int] = field(default_factory=dict)  # account id -> balance after


def _insert_ignore(conn: Connection):
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    return dialect.insert


def ensure_account(conn: Connection, acct_id: int, name: str = "") -> None:
    """Create a member or system account row on first use (balance 0)."""
    kind, ext = split_account_id(acct_id)
    stmt = (
        _insert_ignore(conn)(accounts)
        .values(id=acct_id, kind=int(kind), ext_id=ext, name=name, balance_cents=0, created_at=utcnow())
        .on_conflict_do_nothing(index_elements=["id"])
    )
    conn.execute(stmt)


def _apply_leg(conn: Connection, leg: Leg) -> int:
    new_balance = accounts.c.balance_cents + leg.amount_cents
    stmt = (
        update(accounts)
        .where(accounts.c.id == leg.account_id)
        .values(balance_cents=new_balance, last_movement_at=utcnow())
        .returning(accounts.c.balance_cents)
    )
    if leg.must_stay_non_negative and leg.amount_cents < 0:
        stmt = stmt.where(accounts.c.balance_cents >= -leg.amount_cents)
    row = conn.execute(stmt).first()
    if row is not None:
        return row[0]
    balance = conn.execute(select(accounts.c.balance_cents).where(accounts.c.id == leg.account_id)).scalar()
    if balance is not None:  # the row exists: the funds check refused it
        raise InsufficientFunds(balance, -leg.amount_cents)
    kind, ext = split_account_id(leg.account_id)
    if kind == AccountKind.ORGANISATION:
        raise NotFound(f"organisation {ext} is not registered")
    if leg.must_stay_non_negative and leg.amount_cents < 0:
        raise InsufficientFunds(0, -leg.amount_cents)
    ensure_account(conn, leg.account_id)
    return conn.execute(stmt).scalar_one()


def book(conn: Connection, txn: NewTransaction) -> Booked:
    legs = txn.legs
    assert len(legs) >= 2, "a transaction has two or more legs"
    assert sum(leg.amount_cents for leg in legs) == 0, "postings of a transaction sum to zero"
    assert all(leg.amount_cents != 0 for leg in legs), "no empty postings"
    assert len({leg.account_id for leg in legs}) == len(legs), "one leg per account"
    # Lock and apply first, then take the time: per account, posting ids and times follow the
    # order in which the row lock was held, so balance-after always reads right on a statement.
    ordered = sorted(enumerate(legs, start=1), key=lambda il: lock_rank(il[1].account_id))
    balances = {leg.account_id: _apply_leg(conn, leg) for _, leg in ordered}
    now = utcnow()
    reference = new_reference(txn.type)
    txn_id = conn.execute(
        insert(transactions)
        .values(
            reference=reference,
            type=txn.type.value,
            description=txn.description,
            principal=txn.principal,
            payment_id=txn.payment_id,
            batch_id=txn.batch_id,
            event_id=txn.event_id,
            session_id=txn.session_id,
            created_at=now,
        )
        .returning(transactions.c.id)
    ).scalar_one()
    booked = Booked(txn_id, reference, now, balances)
    rows = [
        {
            "transaction_id": txn_id,
            "account_id": leg.account_id,
            "amount_cents": leg.amount_cents,
            "balance_after_cents": balances[leg.account_id],
            "counterparty_account_id": leg.counterparty_account_id,
            "reference": f"{reference}-{index}",
            "type": txn.type.value,
            "description": txn.description,
            "payment_id": txn.payment_id,
            "event_id": txn.event_id,
            "session_id": txn.session_id,
            "created_at": now,
        }
        for index, leg in ordered
    ]
    conn.execute(insert(postings), rows)
    return booked


def balance_of(conn: Connection, acct_id: int) -> int | None:
    return conn.execute(select(accounts.c.balance_cents).where(accounts.c.id == acct_id)).scalar()
