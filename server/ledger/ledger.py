"""The one write path for money: balances, postings, outbox events and idempotency records.

`post(conn, transactions)` books N >= 1 transactions in the caller's unit of work, in two statements
whatever N is:
1. lock: every account the transactions touch, in the one global lock order (`types.lock_rank`),
   with `SELECT … FOR UPDATE` (or `SKIP LOCKED` for a group, so one busy account never holds up the
   others);
2. write: the new balances, the transaction rows and every posting with its balance after, stamped
   with the database clock read after the locks.
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
from server.ledger.db import EVENTS_WRITTEN, before_commit, unit_state

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

_LOCK = ("SELECT id, balance_cents FROM accounts WHERE id = ANY(%(ids)s) "
         "ORDER BY kind, ext_id FOR UPDATE")
_LOCK_SKIPPING = _LOCK + " SKIP LOCKED"
_EXISTING = "SELECT id FROM accounts WHERE id = ANY(%(ids)s)"
_CREATE = ("INSERT INTO accounts (id, kind, ext_id, name, balance_cents, created_at) "
           "SELECT a.id, a.id %% 4, a.id / 4, '', 0, clock_timestamp() FROM unnest(%(ids)s::bigint[]) AS a(id) "
           "ORDER BY a.id %% 4, a.id / 4 ON CONFLICT (id) DO NOTHING")
_WRITE = """
WITH t AS MATERIALIZED (SELECT clock_timestamp() AS at),
balance AS (
  UPDATE accounts a SET balance_cents = v.balance_cents, last_movement_at = t.at
  FROM unnest(%(acct_id)s::bigint[], %(acct_balance)s::bigint[]) AS v(id, balance_cents), t
  WHERE a.id = v.id RETURNING a.id),
tx AS (
  INSERT INTO transactions (reference, type, description, principal, payment_id, batch_id, event_id, session_id,
                            created_at)
  SELECT u.reference, u.type, u.description, u.principal, u.payment_id, u.batch_id, u.event_id, u.session_id, t.at
  FROM unnest(%(tx_reference)s::varchar[], %(tx_type)s::varchar[], %(tx_description)s::varchar[],
              %(tx_principal)s::varchar[], %(tx_payment_id)s::varchar[], %(tx_batch_id)s::varchar[],
              %(tx_event_id)s::bigint[], %(tx_session_id)s::bigint[])
       AS u(reference, type, description, principal, payment_id, batch_id, event_id, session_id), t
  RETURNING id, reference),
posted AS (
  INSERT INTO postings (transaction_id, account_id, amount_cents, balance_after_cents, counterparty_account_id,
                        reference, type, description, payment_id, event_id, session_id, created_at)
  SELECT tx.id, p.account_id, p.amount_cents, p.balance_after_cents, p.counterparty_account_id,
         tx.reference || p.suffix, x.type, x.description, x.payment_id, x.event_id, x.session_id, t.at
  FROM unnest(%(p_tx)s::int[], %(p_account_id)s::bigint[], %(p_amount_cents)s::bigint[],
              %(p_balance_after_cents)s::bigint[], %(p_counterparty)s::bigint[], %(p_suffix)s::varchar[])
       WITH ORDINALITY AS p(tx, account_id, amount_cents, balance_after_cents, counterparty_account_id, suffix, n)
  JOIN unnest(%(tx_reference)s::varchar[], %(tx_type)s::varchar[], %(tx_description)s::varchar[],
              %(tx_payment_id)s::varchar[], %(tx_event_id)s::bigint[], %(tx_session_id)s::bigint[])
       WITH ORDINALITY AS x(reference, type, description, payment_id, event_id, session_id, tx) ON x.tx = p.tx
  JOIN tx ON tx.reference = x.reference
  CROSS JOIN t
  ORDER BY p.n
  RETURNING 1)
SELECT tx.id, tx.reference, t.at, (SELECT count(*) FROM posted), (SELECT count(*) FROM balance) FROM tx, t
"""


def post(conn: Connection, transactions: Sequence[NewTransaction], *, skip_locked: bool = False) -> list[Outcome]:
    """Book each transaction in order, in this unit of work: its `Booked`, or why it was refused."""
    for txn in transactions:
        txn.check()
    ids = sorted({leg.account_id for txn in transactions for leg in txn.legs}, key=lock_rank)
    balances = _lock(conn, ids, skip_locked)
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
        if _lock(conn, needed, skip_locked) != dict.fromkeys(needed, 0):
            # another request created one of them meanwhile and it moved, or it is busy: decide again
            # on what is there now (they exist now, so this happens once)
            return post(conn, transactions, skip_locked=skip_locked)
    if accepted:
        for n, booked in _write(conn, accepted, balances):
            outcomes[n] = booked
    return outcomes


def book(conn: Connection, txn: NewTransaction) -> Booked:
    """One transaction, waiting for its locks: its `Booked`, or the refusal raised."""
    (outcome,) = post(conn, [txn])
    if isinstance(outcome, DomainError):
        raise outcome
    return outcome


def _lock(conn: Connection, ids: list[int], skip_locked: bool) -> dict[int, int]:
    rows = conn.exec_driver_sql(_LOCK_SKIPPING if skip_locked else _LOCK, {"ids": ids}).fetchall()
    return {acct_id: balance for acct_id, balance in rows}


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


def _write(conn: Connection, accepted: list[tuple[int, NewTransaction, dict[int, int]]],
           balances: dict[int, int]) -> list[tuple[int, Booked]]:
    tx_cols: dict[str, list] = {k: [] for k in ("reference", "type", "description", "principal", "payment_id",
                                                "batch_id", "event_id", "session_id")}
    p_cols: dict[str, list] = {k: [] for k in ("tx", "account_id", "amount_cents", "balance_after_cents",
                                               "counterparty", "suffix")}
    touched: set[int] = set()
    references = []
    for tx_number, (_, txn, after) in enumerate(accepted, start=1):
        reference = txn.reference or new_reference(txn.type)
        references.append(reference)
        for name, value in (("reference", reference), ("type", txn.type.value), ("description", txn.description),
                            ("principal", txn.principal), ("payment_id", txn.payment_id),
                            ("batch_id", txn.batch_id), ("event_id", txn.event_id), ("session_id", txn.session_id)):
            tx_cols[name].append(value)
        for index, leg in sorted(enumerate(txn.legs, start=1), key=lambda il: lock_rank(il[1].account_id)):
            for name, value in (("tx", tx_number), ("account_id", leg.account_id),
                                ("amount_cents", leg.amount_cents), ("balance_after_cents", after[leg.account_id]),
                                ("counterparty", leg.counterparty_account_id), ("suffix", f"-{index}")):
                p_cols[name].append(value)
            touched.add(leg.account_id)
    params = {f"tx_{k}": v for k, v in tx_cols.items()} | {f"p_{k}": v for k, v in p_cols.items()}
    acct_ids = sorted(touched, key=lock_rank)
    params["acct_id"] = acct_ids
    params["acct_balance"] = [balances[acct_id] for acct_id in acct_ids]
    rows = conn.exec_driver_sql(_WRITE, params).fetchall()
    by_reference = {reference: (tx_id, at) for tx_id, reference, at, _, _ in rows}
    assert len(by_reference) == len(accepted), "every transaction row was written"
    assert rows[0][3] == len(p_cols["tx"]) and rows[0][4] == len(acct_ids), "every posting and balance was written"
    out = []
    for (n, _, after), reference in zip(accepted, references, strict=True):
        tx_id, at = by_reference[reference]
        out.append((n, Booked(tx_id, reference, at, dict(after))))
    return out


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
    f"SELECT {', '.join(_EVENT_FIELDS)}, clock_timestamp() FROM unnest("
    + ", ".join(f"%(ev_{name})s::{_EVENT_TYPES[name]}[]" for name in _EVENT_FIELDS)
    + f") AS e({', '.join(_EVENT_FIELDS)})"
)
_INSERT_RECORDS = (
    "INSERT INTO idempotency_keys (principal, key, method, request_hash, result, created_at) "
    "SELECT r.principal, r.key, r.method, r.request_hash, r.result::jsonb, clock_timestamp() "
    "FROM unnest(%(rec_principal)s::varchar[], %(rec_key)s::varchar[], %(rec_method)s::varchar[], "
    "%(rec_request_hash)s::varchar[], %(rec_result)s::text[]) AS r(principal, key, method, request_hash, result)"
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
    unit_state(conn).setdefault(_RECORDS, []).append((principal, key, method, request_hash, json.dumps(result)))
    before_commit(conn, "ledger-writes", _flush)


def _flush(conn: Connection) -> None:
    events = unit_state(conn).pop(_OUTBOX, None) or []
    records = unit_state(conn).pop(_RECORDS, None) or []
    statements, params = [], {}
    if events:
        statements.append(_INSERT_EVENTS)
        for name in _EVENT_FIELDS:
            params[f"ev_{name}"] = [str(getattr(ev, name)) if name == "kind" else getattr(ev, name) for ev in events]
    if records:
        statements.append(_INSERT_RECORDS)
        for n, name in enumerate(("principal", "key", "method", "request_hash", "result")):
            params[f"rec_{name}"] = [row[n] for row in records]
    if statements:
        conn.exec_driver_sql("; ".join(statements), params)
