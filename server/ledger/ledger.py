"""The one write path for money: balances, postings, outbox events and idempotency records.

`post(conn, transactions)` books N >= 1 transactions in the caller's unit of work, in two statements
whatever N is:
1. lock: every account the transactions touch, in the one global lock order (`types.lock_rank`),
   with `SELECT … FOR UPDATE` (or `SKIP LOCKED` for a group, so one busy account never holds up the
   others);
2. write: the new balances, the transaction rows and every posting with its balance after, stamped
   with the database clock read after the locks, and the organisations' totals per day and type
   (`account_day_totals`, read by GetOrganisationSummary).
Between the two, the rules decide in Python, once, in order: a leg that must not take its account
below zero is refused when it would (`InsufficientFunds`), an unregistered organisation is
`NotFound`, an account another request holds is `AccountBusy` (group only). A refused transaction
writes nothing and leaves the others as they are; each transaction gets its own outcome.

`emit(conn, events)` and `record(conn, pending, result)` buffer outbox events and idempotency
records; the unit of work writes them, in one round trip, just before it commits. No other code
writes these four tables' money rows.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime

from sqlalchemy import Connection

from server.domain.errors import DomainError, FailedPrecondition, InsufficientFunds, NotFound
from server.domain.types import AccountKind, EventKind, PostingType, lock_rank, split_account_id
from server.ledger.db import EVENTS_WRITTEN, before_commit, commit_with, unit_state

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
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def new_reference(posting_type: PostingType) -> str:
    """A unique, human-readable reference such as PAY-7KQ3-M9ZT-2WXA (60 random bits)."""
    bits = int.from_bytes(secrets.token_bytes(8), "big")
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
    reference: str = ""  # made here when empty

    def check(self) -> None:
        assert len(self.legs) >= 2, "a transaction has two or more legs"
        assert sum(leg.amount_cents for leg in self.legs) == 0, "postings of a transaction sum to zero"
        assert all(leg.amount_cents != 0 for leg in self.legs), "no empty postings"
        assert len({leg.account_id for leg in self.legs}) == len(self.legs), "one leg per account"


@dataclass
class Booked:
    transaction_id: int
    reference: str
    created_at: datetime
    balances_after: dict[int, int] = field(default_factory=dict)  # account id -> balance after


class AccountBusy(DomainError):
    """Another request holds an account this one needs (a group skips it; alone, it waits)."""

    code = "ABORTED"

    def __init__(self, account_id: int):
        super().__init__("an account this request needs is busy; retry it")
        self.account_id = account_id


Outcome = Booked | DomainError

# Locks every account, then (once all are held) reads the clock and draws the transactions' ids: a
# transaction booked after another on the same account has a later stamp and a higher id.
_LOCK = """
SELECT coalesce(array_agg(l.id), '{}'), coalesce(array_agg(l.balance_cents), '{}'), clock_timestamp(),
       ARRAY(SELECT nextval(pg_get_serial_sequence('transactions', 'id')) FROM generate_series(1, %(n)s))
FROM (SELECT id, balance_cents FROM accounts WHERE id = ANY(%(ids)s) ORDER BY kind, ext_id FOR UPDATE<skip>) l
"""
_LOCK_WAITING, _LOCK_SKIPPING = _LOCK.replace("<skip>", ""), _LOCK.replace("<skip>", " SKIP LOCKED")
_EXISTING = "SELECT id FROM accounts WHERE id = ANY(%(ids)s)"
_CREATE = ("INSERT INTO accounts (id, kind, ext_id, name, balance_cents, created_at) "
           "SELECT a.id, a.id %% 4, a.id / 4, '', 0, clock_timestamp() FROM unnest(%(ids)s::bigint[]) AS a(id) "
           "ORDER BY a.id %% 4, a.id / 4 ON CONFLICT (id) DO NOTHING")
# The values go as three JSON arrays of rows (one literal each: cheap to send and to parse, whatever N
# is); each transaction row carries the id and the stamp its lock drew, and its postings refer to it by
# that id. The statement checks what it wrote (`ledger_expect`): it may be sent with the COMMIT.
_WRITE = """
WITH tx_rows AS MATERIALIZED (
  SELECT (e.r->>0)::bigint AS id, (e.r->>1)::timestamptz AS at, e.r
  FROM jsonb_array_elements(%(transactions)s::jsonb) AS e(r)),
posting_rows AS MATERIALIZED (  -- sent and parsed once, read by the postings and by the day totals
  SELECT p.n, p.r FROM jsonb_array_elements(%(postings)s::jsonb) WITH ORDINALITY AS p(r, n)),
balance AS (
  UPDATE accounts a SET balance_cents = (v.r->>1)::bigint, last_movement_at = (v.r->>2)::timestamptz
  FROM jsonb_array_elements(%(balances)s::jsonb) AS v(r)
  WHERE a.id = (v.r->>0)::bigint RETURNING 1),
tx AS (
  INSERT INTO transactions (id, reference, type, description, principal, payment_id, batch_id, event_id, session_id,
                            created_at)
  SELECT x.id, x.r->>2, x.r->>3, x.r->>4, x.r->>5, x.r->>6, x.r->>7, (x.r->>8)::bigint, (x.r->>9)::bigint, x.at
  FROM tx_rows x RETURNING 1),
posted AS (
  INSERT INTO postings (transaction_id, account_id, amount_cents, balance_after_cents, counterparty_account_id,
                        reference, type, description, payment_id, event_id, session_id, created_at)
  SELECT x.id, (p.r->>1)::bigint, (p.r->>2)::bigint, (p.r->>3)::bigint, (p.r->>4)::bigint,
         (x.r->>2) || (p.r->>5), x.r->>3, x.r->>4, x.r->>6, (x.r->>8)::bigint, (x.r->>9)::bigint, x.at
  FROM posting_rows p
  JOIN tx_rows x ON x.id = (p.r->>0)::bigint
  ORDER BY p.n
  RETURNING 1),
day_totals AS (
  INSERT INTO account_day_totals AS d (account_id, day, type, amount_cents, count, in_cents, out_cents)
  SELECT (p.r->>1)::bigint, (x.at AT TIME ZONE 'UTC')::date, x.r->>3, sum((p.r->>2)::bigint), count(*),
         sum(greatest((p.r->>2)::bigint, 0)), sum(greatest(-(p.r->>2)::bigint, 0))
  FROM posting_rows p
  JOIN tx_rows x ON x.id = (p.r->>0)::bigint
  WHERE (p.r->>1)::bigint %% 4 = 2
  GROUP BY 1, 2, 3
  ON CONFLICT (account_id, day, type) DO UPDATE SET amount_cents = d.amount_cents + excluded.amount_cents,
    count = d.count + excluded.count, in_cents = d.in_cents + excluded.in_cents,
    out_cents = d.out_cents + excluded.out_cents
  RETURNING 1)
SELECT ledger_expect((SELECT count(*) FROM posted) = %(n_postings)s
                     AND (SELECT count(*) FROM balance) = %(n_balances)s,
                     'every posting found its transaction and every balance its account')
"""


def post(conn: Connection, transactions: Sequence[NewTransaction], *, skip_locked: bool = False,
         write_at_commit: bool = False) -> list[Outcome]:
    """Book each transaction in order, in this unit of work: its `Booked`, or why it was refused.
    `write_at_commit`: the rows are written with the unit's other buffered writes just before it
    commits (one round trip for all of them) rather than now; the unit must not read them meanwhile."""
    for txn in transactions:
        txn.check()
    ids = sorted({leg.account_id for txn in transactions for leg in txn.legs}, key=lock_rank)
    balances, at, tx_ids = _lock(conn, ids, skip_locked, len(transactions))
    unavailable, new = _absent(conn, [acct_id for acct_id in ids if acct_id not in balances])
    balances.update(dict.fromkeys(new, 0))  # an account that does not exist yet holds 0
    outcomes: list[Outcome] = []
    accepted: list[tuple[int, NewTransaction, dict[int, int]]] = []
    for n, txn in enumerate(transactions):
        decided = _decide(txn, balances, unavailable)
        outcomes.append(decided)  # a booking is replaced by its Booked below
        if not isinstance(decided, DomainError):
            balances.update(decided)
            accepted.append((n, txn, decided))
    # accounts are created on first use, for the bookings that use them (a refusal creates nothing)
    needed = [acct_id for acct_id in new if any(acct_id in after for _, _, after in accepted)]
    if needed:
        conn.exec_driver_sql(_CREATE, {"ids": needed})
        created, at, _ = _lock(conn, needed, skip_locked, 0)
        if created != dict.fromkeys(needed, 0):
            # another request created one of them meanwhile and it moved, or it is busy: decide again
            # on what is there now (they exist now, so this happens once)
            return post(conn, transactions, skip_locked=skip_locked, write_at_commit=write_at_commit)
    booked = []
    for (n, txn, after), tx_id in zip(accepted, tx_ids, strict=False):
        outcomes[n] = Booked(tx_id, txn.reference or new_reference(txn.type), at, dict(after))
        booked.append((txn, outcomes[n]))
    if booked:
        rows = unit_state(conn).setdefault(_MONEY, _MoneyRows())
        rows.add(booked)
        if write_at_commit:
            before_commit(conn, "ledger-writes", _flush)
        else:
            _flush_money(conn)
    return outcomes


def book(conn: Connection, txn: NewTransaction) -> Booked:
    """One transaction, waiting for its locks: its `Booked`, or the refusal raised."""
    (outcome,) = post(conn, [txn])
    if isinstance(outcome, DomainError):
        raise outcome
    return outcome


def _lock(conn: Connection, ids: list[int], skip_locked: bool, n_transactions: int
          ) -> tuple[dict[int, int], datetime, list[int]]:
    """Lock `ids` (those free, skipping), then read the clock and draw `n_transactions` ids."""
    locked, balances, at, tx_ids = conn.exec_driver_sql(_LOCK_SKIPPING if skip_locked else _LOCK_WAITING,
                                                        {"ids": ids, "n": n_transactions}).one()
    return dict(zip(locked, balances, strict=True)), at, tx_ids


def _absent(conn: Connection, absent: list[int]) -> tuple[dict[int, DomainError], list[int]]:
    """Accounts the lock did not return: those that exist are busy (a group skipped them);
    organisations must be registered; members and system accounts are new (made on first use)."""
    if not absent:
        return {}, []
    existing = {row[0] for row in conn.exec_driver_sql(_EXISTING, {"ids": absent})}
    unavailable: dict[int, DomainError] = {}
    new = []
    for acct_id in absent:
        kind, ext = split_account_id(acct_id)
        if acct_id in existing:
            unavailable[acct_id] = AccountBusy(acct_id)
        elif kind == AccountKind.ORGANISATION:
            unavailable[acct_id] = NotFound(f"organisation {ext} is not registered")
        else:
            new.append(acct_id)
    return unavailable, new


def _decide(txn: NewTransaction, balances: dict[int, int], unavailable: dict[int, DomainError]
            ) -> dict[int, int] | DomainError:
    """The rules of a booking, in one place: the balances after `txn`, or why it may not be booked."""
    for leg in txn.legs:  # a missing organisation says more than a busy account
        if isinstance(unavailable.get(leg.account_id), NotFound):
            return unavailable[leg.account_id]
    for leg in txn.legs:
        if leg.account_id in unavailable:
            return unavailable[leg.account_id]
    after: dict[int, int] = {}
    for leg in sorted(txn.legs, key=lambda leg: lock_rank(leg.account_id)):
        balance = balances[leg.account_id]
        new_balance = balance + leg.amount_cents
        if leg.must_stay_non_negative and leg.amount_cents < 0 and new_balance < 0:
            return InsufficientFunds(balance, -leg.amount_cents)
        if not INT64_MIN <= new_balance <= INT64_MAX:
            return FailedPrecondition("the booking would take a balance beyond what can be held")
        after[leg.account_id] = new_balance
    return after


class _MoneyRows:
    """What `post` decided to write and has not written yet, as the write statement takes it."""

    def __init__(self) -> None:
        self.transactions: list[tuple] = []
        self.postings: list[tuple] = []
        self.balances: dict[int, tuple[int, str]] = {}  # account id -> (balance after, stamp): the last wins

    def __len__(self) -> int:
        return len(self.transactions)

    def add(self, booked: list[tuple[NewTransaction, Booked]]) -> None:
        for txn, done in booked:
            at = done.created_at.isoformat()
            self.transactions.append((done.transaction_id, at, done.reference, txn.type.value, txn.description,
                                      txn.principal, txn.payment_id, txn.batch_id, txn.event_id, txn.session_id))
            for index, leg in sorted(enumerate(txn.legs, start=1), key=lambda il: lock_rank(il[1].account_id)):
                self.postings.append((done.transaction_id, leg.account_id, leg.amount_cents,
                                      done.balances_after[leg.account_id], leg.counterparty_account_id, f"-{index}"))
                self.balances[leg.account_id] = (done.balances_after[leg.account_id], at)

    def statement(self) -> tuple[str, dict]:
        acct_ids = sorted(self.balances, key=lock_rank)
        return _WRITE, {
            "transactions": json.dumps(self.transactions), "postings": json.dumps(self.postings),
            "balances": json.dumps([(acct_id, *self.balances[acct_id]) for acct_id in acct_ids]),
            "n_postings": len(self.postings), "n_balances": len(acct_ids)}


_MONEY = "money_rows"  # unit_state key: bookings decided and not yet written


def _flush_money(conn: Connection) -> None:
    rows = unit_state(conn).pop(_MONEY, None)
    if rows is not None:
        conn.exec_driver_sql(*rows.statement())


def balance_of(conn: Connection, acct_id: int) -> int | None:
    return conn.exec_driver_sql("SELECT balance_cents FROM accounts WHERE id = %(id)s", {"id": acct_id}).scalar()


def ensure_account(conn: Connection, acct_id: int, name: str = "") -> None:
    """Create an account row on first use (balance 0); the caller sets its name."""
    conn.exec_driver_sql(_CREATE, {"ids": [acct_id]})


# ---------------------------------------------------------------- outbox events
@dataclass(frozen=True)
class NewEvent:
    kind: EventKind
    member_id: int = 0
    organisation_id: int = 0
    other_member_id: int = 0
    amount_cents: int = 0
    balance_cents: int = 0
    payment_id: str = ""
    reference: str = ""
    route_code: str = ""
    route_payload: str = ""
    reason: str = ""
    event_id: int = 0
    session_id: int = 0


_EVENT_FIELDS = tuple(f.name for f in fields(NewEvent))
_EVENT_TYPES = {"kind": "varchar", "route_payload": "text"} | {
    name: ("bigint" if name in ("member_id", "organisation_id", "other_member_id", "amount_cents", "balance_cents",
                                "event_id", "session_id") else "varchar") for name in _EVENT_FIELDS if name != "kind"}
_OUTBOX = "outbox_rows"  # unit_state key: events buffered for the end of the unit of work
_RECORDS = "idempotency_rows"  # unit_state key: idempotency records buffered likewise
_INSERT_EVENTS = (
    f"INSERT INTO outbox_events ({', '.join(_EVENT_FIELDS)}, created_at) "
    "SELECT " + ", ".join(f"(e.r->>{i})::{_EVENT_TYPES[name]}" for i, name in enumerate(_EVENT_FIELDS))
    + ", clock_timestamp() FROM jsonb_array_elements(%(events)s::jsonb) WITH ORDINALITY AS e(r, n) ORDER BY e.n"
)
_INSERT_RECORDS = (
    "INSERT INTO idempotency_keys (principal, key, method, request_hash, result, created_at) "
    "SELECT r.r->>0, r.r->>1, r.r->>2, r.r->>3, r.r->4, clock_timestamp() "
    "FROM jsonb_array_elements(%(records)s::jsonb) AS r(r)"
)


def emit(conn: Connection, *events: NewEvent) -> None:
    """Write events in this unit of work (nothing is written if it rolls back); each takes the next
    number of the global sequence when it is written, just before the commit."""
    if not events:
        return
    unit_state(conn).setdefault(_OUTBOX, []).extend(events)
    conn.info[EVENTS_WRITTEN] = conn.info.get(EVENTS_WRITTEN, 0) + len(events)
    before_commit(conn, "ledger-writes", _flush)


def record(conn: Connection, principal: str, key: str, method: str, request_hash: str, result: dict) -> None:
    """Store the data of a first request's response under its idempotency key, in this unit of work."""
    unit_state(conn).setdefault(_RECORDS, []).append((principal, key, method, request_hash, result))
    before_commit(conn, "ledger-writes", _flush)


def _flush(conn: Connection) -> None:
    """Write what this unit of work buffered (bookings, events, records) in one round trip; when it
    is the unit's last write, the COMMIT goes with it (`db.commit_with`)."""
    state = unit_state(conn)
    money = state.pop(_MONEY, None)
    events = state.pop(_OUTBOX, None) or []
    records = state.pop(_RECORDS, None) or []
    statements, params = [], {}
    if money is not None:
        sql, params = money.statement()
        statements.append(sql)
    if events:
        statements.append(_INSERT_EVENTS)
        params["events"] = json.dumps([[str(ev.kind), *(getattr(ev, name) for name in _EVENT_FIELDS[1:])]
                                       for ev in events])
    if records:
        statements.append(_INSERT_RECORDS)
        params["records"] = json.dumps(records)
    if statements:
        conn.exec_driver_sql("; ".join(statements) + commit_with(conn), params)
