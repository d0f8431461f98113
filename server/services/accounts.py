"""Members and organisations: registration, names, bank details and balances."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, bindparam, select, update
from sqlalchemy.dialects.postgresql import insert as insert_or_ignore

from server.domain import validation
from server.domain.errors import InvalidArgument, NotFound
from server.domain.money import MAX_AMOUNT_CENTS, MAX_FEE_BP, MAX_NAME_CHARS
from server.domain.types import AccountKind, AutoTopUpStatus, member_account, organisation_account, split_account_id
from server.ledger.db import as_utc, utcnow
from server.ledger.ledger import ensure_account
from server.ledger.schema import accounts, member_cards, organisations

# ASCII digits only (`\d` takes any script's), and what an ABA bank file can carry (server.domain.aba)
_BSB = re.compile(r"[0-9]{3}-?[0-9]{3}")
_ACCOUNT_NUMBER = re.compile(r"[0-9]{4,9}")


@dataclass(frozen=True)
class Organisation:
    organisation_id: int
    name: str
    bsb: str
    account_number: str
    minimum_balance_cents: int
    settlement_fee_bp: int | None
    balance_cents: int


@dataclass(frozen=True)
class Balance:
    account_id: int
    name: str
    balance_cents: int
    last_movement_at: datetime | None
    auto_top_up_status: AutoTopUpStatus
    auto_top_up_amount_cents: int


@dataclass(frozen=True)
class Member:
    member_id: int
    name: str
    balance_cents: int


def upsert_member(conn: Connection, member_id: int, name: str) -> Member:
    validation.positive_id("member_id", member_id)
    name = validation.bounded_text("name", name, MAX_NAME_CHARS)
    acct = member_account(member_id)
    ensure_account(conn, acct, name)
    balance = conn.execute(
        update(accounts).where(accounts.c.id == acct).values(name=name).returning(accounts.c.balance_cents)
    ).scalar_one()
    return Member(member_id, name, balance)


def upsert_organisation(
    conn: Connection,
    organisation_id: int,
    name: str,
    bsb: str,
    account_number: str,
    minimum_balance_cents: int,
    settlement_fee_bp: int | None,
) -> Organisation:
    validation.positive_id("organisation_id", organisation_id)
    name = validation.bounded_text("name", name, MAX_NAME_CHARS, required=True)
    bsb = bsb.strip()
    if bsb and not _BSB.fullmatch(bsb):
        raise InvalidArgument.field("bsb", "must be six digits, as 123-456")
    if bsb and "-" not in bsb:
        bsb = f"{bsb[:3]}-{bsb[3:]}"
    account_number = account_number.strip().replace(" ", "")
    if account_number and not _ACCOUNT_NUMBER.fullmatch(account_number):
        raise InvalidArgument.field("account_number", "must be 4 to 9 digits")
    if not 0 <= minimum_balance_cents <= MAX_AMOUNT_CENTS:
        raise InvalidArgument.field("minimum_balance_cents", "must be between 0 and the amount limit")
    if settlement_fee_bp is not None and not 0 <= settlement_fee_bp <= MAX_FEE_BP:
        raise InvalidArgument.field("settlement_fee_bp", f"must be between 0 and {MAX_FEE_BP}")
    now = utcnow()
    values = dict(
        name=name,
        bsb=bsb,
        account_number=account_number,
        minimum_balance_cents=minimum_balance_cents,
        settlement_fee_bp=settlement_fee_bp,
        updated_at=now,
    )
    stmt = insert_or_ignore(organisations).values(organisation_id=organisation_id, created_at=now, **values)
    conn.execute(stmt.on_conflict_do_update(index_elements=["organisation_id"], set_=values))
    acct = organisation_account(organisation_id)
    ensure_account(conn, acct, name)
    balance = conn.execute(
        update(accounts).where(accounts.c.id == acct).values(name=name).returning(accounts.c.balance_cents)
    ).scalar_one()
    return Organisation(organisation_id, name, bsb, account_number, minimum_balance_cents, settlement_fee_bp, balance)


def get_organisation(conn: Connection, organisation_id: int) -> Organisation:
    row = conn.execute(
        select(organisations, accounts.c.balance_cents)
        .join(accounts, accounts.c.id == organisation_account(organisation_id))
        .where(organisations.c.organisation_id == organisation_id)
    ).first()
    if row is None:
        raise NotFound(f"organisation {organisation_id} is not registered")
    return Organisation(row.organisation_id, row.name, row.bsb, row.account_number, row.minimum_balance_cents,
                        row.settlement_fee_bp, row.balance_cents)


def require_account(conn: Connection, acct_id: int) -> None:
    """Organisations must be registered; members exist from first use."""
    kind, ext = split_account_id(acct_id)
    if kind == AccountKind.ORGANISATION:
        exists = conn.execute(select(accounts.c.id).where(accounts.c.id == acct_id)).first()
        if exists is None:
            raise NotFound(f"organisation {ext} is not registered")


_BALANCE_WITH_CARD = (
    select(accounts.c.name, accounts.c.balance_cents, accounts.c.last_movement_at,
           member_cards.c.auto_top_up_status, member_cards.c.auto_top_up_amount_cents)
    .select_from(accounts.outerjoin(member_cards, member_cards.c.member_id == bindparam("card_member_id")))
    .where(accounts.c.id == bindparam("account_id"))
)
_CARD = select(member_cards.c.auto_top_up_status, member_cards.c.auto_top_up_amount_cents).where(
    member_cards.c.member_id == bindparam("card_member_id"))


def get_balance(conn: Connection, acct_id: int) -> Balance:
    """The account and, for a member, the auto top-up setting: one query when the account exists."""
    kind, ext = split_account_id(acct_id)
    card_member_id = ext if kind == AccountKind.MEMBER else -1  # no card row has a negative member id
    row = conn.execute(_BALANCE_WITH_CARD, {"account_id": acct_id, "card_member_id": card_member_id}).first()
    if row is None:
        if kind == AccountKind.ORGANISATION:
            raise NotFound(f"organisation {ext} is not registered")
        card = conn.execute(_CARD, {"card_member_id": card_member_id}).first()  # a member before first use
        status, auto_amount = (AutoTopUpStatus(card[0]), card[1]) if card is not None else (AutoTopUpStatus.OFF, 0)
        return Balance(acct_id, "", 0, None, status, auto_amount)
    status = AutoTopUpStatus(row.auto_top_up_status) if row.auto_top_up_status is not None else AutoTopUpStatus.OFF
    return Balance(acct_id, row.name, row.balance_cents, as_utc(row.last_movement_at), status,
                   row.auto_top_up_amount_cents or 0)
