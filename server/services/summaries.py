"""What administrators and auditors look at: the admin summary, who holds what (ListBalances),
the organisations, and an organisation's totals by type over a range."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta

from sqlalchemy import Connection, case, func, literal, select, tuple_

from server.domain.errors import InvalidArgument
from server.domain.types import (
    AccountKind,
    AutoTopUpStatus,
    PostingType,
    SystemAccount,
    organisation_account,
    system_account,
)
from server.ledger.db import utcnow
from server.ledger.schema import account_day_totals, accounts, balance_totals, member_cards, organisations, postings
from server.services.accounts import Organisation, get_organisation
from server.services.statements import balance_at

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
MAX_IDS_PER_REQUEST = 1000
CARD_MONEY_WINDOW = timedelta(days=30)
CARD_MONEY_IN_TYPES = (PostingType.MANUAL_TOP_UP, PostingType.AUTO_TOP_UP, PostingType.CC_PAYMENT)
CARD_REFUND_TYPES = (PostingType.REFUND, PostingType.CARD_REFUND)


def _page_size(page_size: int) -> int:
    if page_size < 0 or page_size > MAX_PAGE_SIZE:
        raise InvalidArgument.field("page_size", f"must be between 1 and {MAX_PAGE_SIZE}")
    return page_size or DEFAULT_PAGE_SIZE


def _id_token(token: str) -> int | None:
    """Page tokens here are the last id of the previous page, as decimal text."""
    if not token:
        return None
    if not token.isdigit() or len(token) > 19:
        raise InvalidArgument.field("page_token", "is not a token this service gave out")
    return int(token)


# ---------------------------------------------------------------- admin summary

@dataclass(frozen=True)
class AdminSummary:
    members_with_balance: int
    member_balances_cents: int
    organisations_with_balance: int
    organisation_balances_cents: int
    members_with_auto_top_up: int
    card_money_in_30d_cents: int
    card_refunds_30d_cents: int
    system_balances: list[tuple[str, int]]
    ledger_sum_cents: int

    @property
    def net_liability_cents(self) -> int:
        """What the federation owes members and organisations together."""
        return self.member_balances_cents + self.organisation_balances_cents


def admin_summary(conn: Connection, now: datetime | None = None) -> AdminSummary:
    now = now or utcnow()
    by_kind = {
        row.kind: row
        for row in conn.execute(
            select(
                accounts.c.kind,
                func.count().filter(accounts.c.balance_cents != 0).label("non_zero"),
                func.coalesce(func.sum(accounts.c.balance_cents), 0).label("total_cents"),
            ).group_by(accounts.c.kind)
        )
    }
    system = dict(
        conn.execute(
            select(accounts.c.ext_id, accounts.c.balance_cents).where(accounts.c.kind == int(AccountKind.SYSTEM))
        ).all()
    )
    auto_on = conn.execute(
        select(func.count()).select_from(member_cards).where(
            member_cards.c.auto_top_up_status == int(AutoTopUpStatus.ON)
        )
    ).scalar_one()
    # Card money moves through the `stripe` account only: top-ups and card payments take it out of
    # `stripe` into members; refunds put it back (a reversed refund takes it out again, netted here).
    stripe = system_account(SystemAccount.STRIPE)
    card_in_types = [t.value for t in CARD_MONEY_IN_TYPES]
    refund_types = [t.value for t in CARD_REFUND_TYPES]
    card = conn.execute(
        select(
            func.coalesce(func.sum(case((postings.c.type.in_(card_in_types), -postings.c.amount_cents), else_=0)), 0),
            func.coalesce(func.sum(case((postings.c.type.in_(refund_types), postings.c.amount_cents), else_=0)), 0),
        ).where(postings.c.account_id == stripe, postings.c.created_at >= now - CARD_MONEY_WINDOW)
    ).one()

    def kind_figures(kind: AccountKind) -> tuple[int, int]:
        row = by_kind.get(int(kind))
        return (0, 0) if row is None else (int(row.non_zero), int(row.total_cents))

    members, member_cents = kind_figures(AccountKind.MEMBER)
    orgs, org_cents = kind_figures(AccountKind.ORGANISATION)
    _, system_cents = kind_figures(AccountKind.SYSTEM)
    return AdminSummary(
        members_with_balance=members,
        member_balances_cents=member_cents,
        organisations_with_balance=orgs,
        organisation_balances_cents=org_cents,
        members_with_auto_top_up=int(auto_on),
        card_money_in_30d_cents=int(card[0]),
        card_refunds_30d_cents=int(card[1]),
        system_balances=[(acct.code, int(system.get(int(acct), 0))) for acct in SystemAccount],
        ledger_sum_cents=member_cents + org_cents + system_cents,
    )


# ---------------------------------------------------------------- who holds what

@dataclass(frozen=True)
class BalanceRow:
    kind: AccountKind
    ext_id: int
    name: str
    balance_cents: int

    @property
    def system_account(self) -> str:
        return SystemAccount(self.ext_id).code if self.kind == AccountKind.SYSTEM else ""


@dataclass(frozen=True)
class BalancePage:
    rows: list[BalanceRow]
    next_page_token: str
    total_cents: int
    count: int


_TOKEN_NUMBER = re.compile(r"-?[0-9]{1,19}")


def _balances_token(token: str) -> tuple[int, tuple[int, int] | None]:
    """A ListBalances page token: the last account id of the previous page, then the count and
    total the first page gave (`id.count.total`), so later pages need not add up every account
    again; a bare id (older tokens) has them added up afresh."""
    if not token:
        return 0, None
    parts = token.split(".")
    if len(parts) not in (1, 3) or not all(_TOKEN_NUMBER.fullmatch(p) for p in parts):
        raise InvalidArgument.field("page_token", "is not a token this service gave out")
    after = _id_token(parts[0])
    assert after is not None
    return after, ((int(parts[1]), int(parts[2])) if len(parts) == 3 else None)


def list_balances(conn: Connection, kind: AccountKind | None, page_size: int, page_token: str,
                  include_zero: bool) -> BalancePage:
    """Accounts of one kind (None: members and organisations), members first, each by id;
    keyset pagination on (kind, id), which the index ix_accounts_kind_id serves at any depth;
    count and total over every page, as the first page found them."""
    limit = _page_size(page_size)
    after, totals = _balances_token(page_token)
    kinds = [int(kind)] if kind is not None else [int(AccountKind.MEMBER), int(AccountKind.ORGANISATION)]
    where = [accounts.c.kind.in_(kinds)]
    if not include_zero and kind != AccountKind.SYSTEM:
        where.append(accounts.c.balance_cents != 0)
    if totals is None:  # kept as the balances move (migration 0010): a few rows, not every account
        listed_all = include_zero or kind == AccountKind.SYSTEM
        every, nonzero, total_cents = conn.execute(
            select(func.coalesce(func.sum(balance_totals.c.accounts), 0),
                   func.coalesce(func.sum(balance_totals.c.nonzero), 0),
                   func.coalesce(func.sum(balance_totals.c.total_cents), 0)).where(balance_totals.c.kind.in_(kinds))
        ).one()
        totals = (int(every if listed_all else nonzero), int(total_cents))
    query = select(accounts.c.id, accounts.c.kind, accounts.c.ext_id, accounts.c.name, accounts.c.balance_cents).where(
        *where
    )
    if page_token:
        # a row comparison: the index seeks straight to the page however deep it is
        query = query.where(tuple_(accounts.c.kind, accounts.c.id) > tuple_(literal(after % 4), literal(after)))
    rows = list(conn.execute(query.order_by(accounts.c.kind, accounts.c.id).limit(limit + 1)))
    next_token = ""
    if len(rows) > limit:
        rows = rows[:limit]
        next_token = f"{rows[-1].id}.{totals[0]}.{totals[1]}"
    return BalancePage(
        rows=[BalanceRow(AccountKind(r.kind), r.ext_id, r.name, r.balance_cents) for r in rows],
        next_page_token=next_token,
        total_cents=totals[1],
        count=totals[0],
    )


def fold_balance_totals(conn: Connection) -> int:
    """Replace the rows the writers added to `balance_totals` by their sums per kind (in one
    statement: concurrent writers and folds are safe); how many rows were folded."""
    return int(conn.exec_driver_sql("SELECT balance_totals_fold()").scalar_one())


# ---------------------------------------------------------------- organisations

@dataclass(frozen=True)
class OrganisationPage:
    organisations: list[Organisation]
    next_page_token: str


def list_organisations(conn: Connection, page_size: int, page_token: str,
                       organisation_ids: Sequence[int] = ()) -> OrganisationPage:
    limit = _page_size(page_size)
    after = _id_token(page_token)
    if len(organisation_ids) > MAX_IDS_PER_REQUEST:
        raise InvalidArgument.field("organisation_ids", f"at most {MAX_IDS_PER_REQUEST} per request")
    query = select(organisations, accounts.c.balance_cents).outerjoin(
        accounts, accounts.c.id == organisations.c.organisation_id * 4 + int(AccountKind.ORGANISATION)
    )
    if organisation_ids:
        query = query.where(organisations.c.organisation_id.in_(list(organisation_ids)))
    if after is not None:
        query = query.where(organisations.c.organisation_id > after)
    rows = list(conn.execute(query.order_by(organisations.c.organisation_id).limit(limit + 1)))
    next_token = ""
    if len(rows) > limit:
        rows = rows[:limit]
        next_token = str(rows[-1].organisation_id)
    return OrganisationPage(
        [
            Organisation(r.organisation_id, r.name, r.bsb, r.account_number, r.minimum_balance_cents,
                         r.settlement_fee_bp, r.balance_cents or 0)
            for r in rows
        ],
        next_token,
    )


# ---------------------------------------------------------------- an organisation over a range

@dataclass(frozen=True)
class TypeTotal:
    type: PostingType
    amount_cents: int
    count: int
    in_cents: int
    out_cents: int  # a positive number: money that left


@dataclass(frozen=True)
class OrganisationSummary:
    organisation_id: int
    name: str
    totals: list[TypeTotal]
    opening_balance_cents: int
    closing_balance_cents: int


def organisation_summary(conn: Connection, organisation_id: int, start: datetime | None,
                         end: datetime | None) -> OrganisationSummary:
    """Totals by type over [start, end) with the opening and closing balance (opening + totals =
    closing when nothing is booked while it reads)."""
    if organisation_id <= 0:
        raise InvalidArgument.field("organisation_id", "must be a positive id")
    if start is not None and end is not None and end <= start:
        raise InvalidArgument.field("to", "must be after from")
    org = get_organisation(conn, organisation_id)
    acct = organisation_account(organisation_id)
    rows = _totals_by_type(conn, acct, start, end)
    totals = sorted(
        (TypeTotal(PostingType(t), int(amount), int(n), int(money_in), int(money_out))
         for t, amount, n, money_in, money_out in rows),
        key=lambda total: list(PostingType).index(total.type),
    )
    opening = balance_at(conn, acct, start) if start is not None else 0
    closing = balance_at(conn, acct, end)
    return OrganisationSummary(org.organisation_id, org.name, totals, opening, closing)


def _whole_days(start: datetime | None, end: datetime | None) -> tuple[date | None, date | None]:
    """The UTC days wholly inside [start, end): from the first midnight at or after `start` to the
    last midnight at or before `end` (None: unbounded on that side)."""
    first = None
    if start is not None:
        utc = start.astimezone(UTC)
        first = utc.date() if utc.time() == time(0) else utc.date() + timedelta(days=1)
    last = None if end is None else end.astimezone(UTC).date()
    return first, last


def _midnight(day: date) -> datetime:
    return datetime.combine(day, time(0), tzinfo=UTC)


def _totals_by_type(conn: Connection, acct: int, start: datetime | None, end: datetime | None) -> list[tuple]:
    """(type, amount, count, in, out) over [start, end): whole UTC days from the day totals the write
    path keeps, the part-days at either end from the postings themselves."""
    first, last = _whole_days(start, end)
    if first is not None and last is not None and first >= last:
        return _posting_totals(conn, acct, start, end)  # no whole day inside: the postings alone
    parts = [_day_totals(conn, acct, first, last)]
    if first is not None and start is not None and _midnight(first) > start:
        parts.append(_posting_totals(conn, acct, start, _midnight(first)))
    if last is not None and end is not None and end > _midnight(last):
        parts.append(_posting_totals(conn, acct, _midnight(last), end))
    merged: dict[str, list[int]] = {}
    for part in parts:
        for t, amount, n, money_in, money_out in part:
            total = merged.setdefault(t, [0, 0, 0, 0])
            for i, value in enumerate((amount, n, money_in, money_out)):
                total[i] += int(value)
    return [(t, *values) for t, values in merged.items()]


def _day_totals(conn: Connection, acct: int, first: date | None, last: date | None) -> list[tuple]:
    where = [account_day_totals.c.account_id == acct]
    if first is not None:
        where.append(account_day_totals.c.day >= first)
    if last is not None:
        where.append(account_day_totals.c.day < last)
    return conn.execute(
        select(account_day_totals.c.type, func.sum(account_day_totals.c.amount_cents),
               func.sum(account_day_totals.c.count), func.sum(account_day_totals.c.in_cents),
               func.sum(account_day_totals.c.out_cents))
        .where(*where).group_by(account_day_totals.c.type)
    ).all()


def _posting_totals(conn: Connection, acct: int, start: datetime | None, end: datetime | None) -> list[tuple]:
    where = [postings.c.account_id == acct]
    if start is not None:
        where.append(postings.c.created_at >= start)
    if end is not None:
        where.append(postings.c.created_at < end)
    return conn.execute(
        select(
            postings.c.type,
            func.sum(postings.c.amount_cents),
            func.count(),
            func.coalesce(func.sum(case((postings.c.amount_cents > 0, postings.c.amount_cents), else_=0)), 0),
            func.coalesce(func.sum(case((postings.c.amount_cents < 0, -postings.c.amount_cents), else_=0)), 0),
        )
        .where(*where)
        .group_by(postings.c.type)
    ).all()
