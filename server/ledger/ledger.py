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

from sqlalchemy import Connection, bindparam, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError

from server.domain.errors import InsufficientFunds, NotFound
from server.domain.types import AccountKind, PostingType, lock_rank, split_account_id
from server.ledger.db import (
    PreparedSql,
    defer_sql_text,
    defer_until_commit,
    defers_sql,
    execute_prepared,
    run_deferred,
    utcnow,
)
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
    bits = int.from_bytes(secrets.token_bytes(8), "big")  # 64 random bits, 60 used: 12 digits of 5 bits
    body = "".join(_REF_ALPHABET[(bits >> shift) & 31] for shift in range(0, 60, 5))
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
    # Credits to organisations that come last in the lock order are applied right before COMMIT,
    # together with the postings, so a hot organisation's row lock is held only through the
    # commit (a congress taking entries). Their balance-after is then not in Booked.balances_after.
    late_credits: bool = False
    # The caller needs no transaction id (Booked.transaction_id is then 0): on PostgreSQL the
    # transaction row and its postings go with the COMMIT, in the round trip that carries it.
    rows_at_commit: bool = False


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


# Built once: the hot path binds values into these instead of building a statement per call.
# On PostgreSQL the UPDATE also returns the database clock read after the row lock was taken:
# postings are stamped with it, so a statement's order is the lock order on one clock, whichever
# server process booked them.
def _apply_statements(timed: bool):  # noqa: ANN202
    returning = [accounts.c.balance_cents] + ([func.clock_timestamp()] if timed else [])
    plain = (
        update(accounts)
        .where(accounts.c.id == bindparam("leg_account_id"))
        .values(balance_cents=accounts.c.balance_cents + bindparam("leg_amount_cents"),
                last_movement_at=bindparam("leg_at"))
        .returning(*returning)
    )
    return plain, plain.where(accounts.c.balance_cents >= bindparam("leg_needed_cents"))


_APPLY, _APPLY_CHECKED = _apply_statements(timed=False)
_APPLY_PG, _APPLY_CHECKED_PG = _apply_statements(timed=True)
_BALANCE_OF = select(accounts.c.balance_cents).where(accounts.c.id == bindparam("leg_account_id"))


def _apply_leg(conn: Connection, leg: Leg) -> tuple[int, datetime | None]:
    """Apply one leg under its row lock: (balance after, database time after the lock or None)."""
    params = {"leg_account_id": leg.account_id, "leg_amount_cents": leg.amount_cents, "leg_at": utcnow()}
    pg = conn.dialect.name == "postgresql"
    stmt = _APPLY_PG if pg else _APPLY
    if leg.must_stay_non_negative and leg.amount_cents < 0:
        stmt = _APPLY_CHECKED_PG if pg else _APPLY_CHECKED
        params["leg_needed_cents"] = -leg.amount_cents
    row = execute_prepared(conn, stmt, params).first()
    if row is not None:
        return row[0], (row[1] if pg else None)
    balance = conn.execute(_BALANCE_OF, {"leg_account_id": leg.account_id}).scalar()
    if balance is not None:  # the row exists: the funds check refused it
        raise InsufficientFunds(balance, -leg.amount_cents)
    kind, ext = split_account_id(leg.account_id)
    if kind == AccountKind.ORGANISATION:
        raise NotFound(f"organisation {ext} is not registered")
    if leg.must_stay_non_negative and leg.amount_cents < 0:
        raise InsufficientFunds(0, -leg.amount_cents)
    ensure_account(conn, leg.account_id)
    row = execute_prepared(conn, stmt, params).one()
    return row[0], (row[1] if pg else None)


def _can_be_late(leg: Leg) -> bool:
    return (leg.amount_cents > 0 and not leg.must_stay_non_negative
            and split_account_id(leg.account_id)[0] == AccountKind.ORGANISATION)


def book(conn: Connection, txn: NewTransaction) -> Booked:
    legs = txn.legs
    assert len(legs) >= 2, "a transaction has two or more legs"
    assert sum(leg.amount_cents for leg in legs) == 0, "postings of a transaction sum to zero"
    assert all(leg.amount_cents != 0 for leg in legs), "no empty postings"
    assert len({leg.account_id for leg in legs}) == len(legs), "one leg per account"
    run_deferred(conn)  # late credits of an earlier booking in this transaction land first
    # Lock and apply first, then take the time: per account, posting ids and times follow the
    # order in which the row lock was held, so balance-after always reads right on a statement.
    ordered = sorted(enumerate(legs, start=1), key=lambda il: lock_rank(il[1].account_id))
    n_early = len(ordered)
    if txn.late_credits:  # only a tail of the lock order may wait: the order stays the one order
        while n_early > 1 and _can_be_late(ordered[n_early - 1][1]):
            n_early -= 1
    early, late = ordered[:n_early], ordered[n_early:]
    balances: dict[int, int] = {}
    locked_at: datetime | None = None
    for _, leg in early:
        balances[leg.account_id], locked_at = _apply_leg(conn, leg)
    now = locked_at or utcnow()  # after the last lock: the database's clock, or ours on SQLite
    reference = new_reference(txn.type)
    if (late or txn.rows_at_commit) and defers_sql(conn):
        # the transaction row, the late credits and every posting go with the COMMIT, in one round
        # trip: a hot organisation's row lock is held for that statement and the commit alone
        _defer_late_pg(conn, txn, reference, early, late, balances, now)
        return Booked(0, reference, now, balances)  # the transaction id is known at commit only
    txn_id = conn.execute(
        _INSERT_TRANSACTION,
        {
            "reference": reference,
            "type": txn.type.value,
            "description": txn.description,
            "principal": txn.principal,
            "payment_id": txn.payment_id,
            "batch_id": txn.batch_id,
            "event_id": txn.event_id,
            "session_id": txn.session_id,
            "created_at": now,
        },
    ).scalar_one()
    booked = Booked(txn_id, reference, now, balances)
    if not late:
        _insert_postings(conn, txn, txn_id, reference, ordered, balances, now)
        return booked

    def apply_late(c: Connection) -> None:
        # lock, then take the time, exactly as above: a statement's order stays the lock order
        late_balances = dict(balances)
        for _, leg in late:
            late_balances[leg.account_id], _ = _apply_leg(c, leg)
        _insert_postings(c, txn, txn_id, reference, ordered, late_balances, utcnow())

    if not defer_until_commit(conn, apply_late):
        apply_late(conn)
    return booked


_INSERT_TRANSACTION = insert(transactions).returning(transactions.c.id)


def _posting_row(txn: NewTransaction, txn_id: int, reference: str, index: int, leg: Leg, balance_after: int,
                 at: datetime) -> dict:
    return {
        "transaction_id": txn_id,
        "account_id": leg.account_id,
        "amount_cents": leg.amount_cents,
        "balance_after_cents": balance_after,
        "counterparty_account_id": leg.counterparty_account_id,
        "reference": f"{reference}-{index}",
        "type": txn.type.value,
        "description": txn.description,
        "payment_id": txn.payment_id,
        "event_id": txn.event_id,
        "session_id": txn.session_id,
        "created_at": at,
    }


def _insert_postings(conn: Connection, txn: NewTransaction, txn_id: int, reference: str,
                     ordered: list[tuple[int, Leg]], balances: dict[int, int], at: datetime) -> None:
    rows = [_posting_row(txn, txn_id, reference, index, leg, balances[leg.account_id], at) for index, leg in ordered]
    conn.execute(insert(postings), rows)


_POSTING_COLUMNS = ("transaction_id", "account_id", "amount_cents", "balance_after_cents", "counterparty_account_id",
                    "reference", "type", "description", "payment_id", "event_id", "session_id", "created_at")
_POSTING_CASTS = ("bigint", "bigint", "bigint", "bigint", "bigint", "varchar", "varchar", "varchar", "varchar",
                  "bigint", "bigint", "timestamptz")
_LATE_SQL_CACHE: dict[tuple[int, int], PreparedSql] = {}
_MISSING_MARK = "late-credit-account-missing"
_TRANSACTION_COLUMNS = ("reference", "type", "description", "principal", "payment_id", "batch_id", "event_id",
                        "session_id")
_TRANSACTION_CASTS = ("varchar", "varchar", "varchar", "varchar", "varchar", "varchar", "bigint", "bigint")


def _late_sql(n_early: int, n_late: int) -> PreparedSql:
    """One statement: credit each late account (row lock), read the database clock after the
    locks, insert the transaction row and every posting stamped with that time, and fail unless
    every posting was written (an unknown organisation credits nothing)."""
    key = (n_early, n_late)
    sql = _LATE_SQL_CACHE.get(key)
    if sql is not None:
        return sql
    ctes = [
        f"c{n} AS (UPDATE accounts SET balance_cents = balance_cents + %(c{n}_amount_cents)s, "
        f"last_movement_at = %(at)s WHERE id = %(c{n}_account_id)s RETURNING balance_cents)"
        for n in range(n_late)
    ]
    if n_late:  # materialised after every late UPDATE (it reads their rows), so after every lock
        ctes.append(f"t AS MATERIALIZED (SELECT clock_timestamp() AS at FROM {', '.join(f'c{n}' for n in range(n_late))})")
    else:  # every lock was taken before: the time read after the last one
        ctes.append("t AS (SELECT CAST(%(locked_at)s AS timestamptz) AS at)")
    tx_values = ", ".join(f"CAST(%(tx_{col})s AS {cast})" for col, cast in zip(_TRANSACTION_COLUMNS, _TRANSACTION_CASTS,
                                                                                strict=True))
    ctes.append(f"tx AS (INSERT INTO transactions ({', '.join(_TRANSACTION_COLUMNS)}, created_at) "
                f"SELECT {tx_values}, t.at FROM t RETURNING id)")
    selects = []
    for prefix, count in (("c", n_late), ("e", n_early)):
        for n in range(count):
            cols = []
            for col, cast in zip(_POSTING_COLUMNS, _POSTING_CASTS, strict=True):
                if col == "created_at":
                    cols.append("t.at")
                elif col == "transaction_id":
                    cols.append("tx.id")
                elif col == "balance_after_cents" and prefix == "c":
                    cols.append(f"c{n}.balance_cents")
                else:
                    cols.append(f"CAST(%({prefix}{n}_{col})s AS {cast})")
            source = f"c{n}, t, tx" if prefix == "c" else "t, tx"  # nothing at all without every late credit
            selects.append(f"SELECT {', '.join(cols)} FROM {source}")
    ctes.append(f"ins AS (INSERT INTO postings ({', '.join(_POSTING_COLUMNS)}) {' UNION ALL '.join(selects)} "
                "RETURNING account_id)")
    # the failing cast depends on the row count, so it is evaluated only when rows are missing
    sql = PreparedSql(f"WITH {', '.join(ctes)} SELECT CASE WHEN (SELECT count(*) FROM ins) = {n_early + n_late} "
                      f"THEN 0 ELSE CAST((SELECT count(*) FROM ins)::text || ':{_MISSING_MARK}' AS integer) END")
    _LATE_SQL_CACHE[key] = sql
    return sql


def _defer_late_pg(conn: Connection, txn: NewTransaction, reference: str, early: list[tuple[int, Leg]],
                   late: list[tuple[int, Leg]], balances: dict[int, int], locked_at: datetime) -> None:
    at = utcnow()
    params: dict = {"at": at} if late else {"locked_at": locked_at}
    for col in _TRANSACTION_COLUMNS:
        params[f"tx_{col}"] = txn.type.value if col == "type" else (
            reference if col == "reference" else getattr(txn, col))
    for prefix, legs in (("c", late), ("e", early)):
        for n, (index, leg) in enumerate(legs):
            row = _posting_row(txn, 0, reference, index, leg, balances.get(leg.account_id, 0), at)
            for col in _POSTING_COLUMNS:
                params[f"{prefix}{n}_{col}"] = row[col]
    orgs = ", ".join(str(split_account_id(leg.account_id)[1]) for _, leg in late)

    def missing(exc: DBAPIError) -> Exception | None:
        if getattr(exc.orig, "pgcode", None) == "22P02" and _MISSING_MARK in str(exc.orig):
            return NotFound(f"organisation {orgs} is not registered")
        return None

    defer_sql_text(conn, _late_sql(len(early), len(late)).mogrify(conn, params), missing, locks_shared_row=bool(late))


def balance_of(conn: Connection, acct_id: int) -> int | None:
    return conn.execute(select(accounts.c.balance_cents).where(accounts.c.id == acct_id)).scalar()
