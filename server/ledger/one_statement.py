"""The common Pay, member → organisation, as ONE statement on PostgreSQL: one round trip, and a
transaction that is that statement alone (the engine runs in autocommit).

The statement debits the member under the funds check, credits the organisation, writes the
transaction row, both postings with their balance after, the outbox event and the idempotency
record, and commits. The member's row is locked first and the organisation's second, as `book()`
locks them (types.lock_rank), and the postings are stamped with the database clock read after
both locks, so a statement's order stays the lock order.

It covers only the case that needs no decision on the way: the member is left at or above the
current low-balance limit (so the low-balance rule has nothing to say), and the organisation
exists. Otherwise it changes nothing — a short balance matches no row, an unknown organisation
fails the statement whole — and the caller takes the careful path (`book()` in a unit of work),
which finds out what is wrong and answers for it. A repeated idempotency key fails the statement on
the record's unique key in the same way, and the careful path finds the stored response.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg2

from server.ledger.db import Database, PreparedSql, utcnow
from server.ledger.ledger import POSTING_CASTS, POSTING_COLUMNS, TRANSACTION_CASTS, TRANSACTION_COLUMNS

# The outbox event's columns: each a value of the request, except the balance (the member's after).
EVENT_COLUMNS = ("kind", "member_id", "organisation_id", "other_member_id", "amount_cents", "balance_cents",
                 "payment_id", "reference", "route_code", "route_payload", "reason", "event_id", "session_id",
                 "created_at")
_EVENT_CASTS = ("varchar", "bigint", "bigint", "bigint", "bigint", "bigint", "varchar", "varchar", "varchar", "text",
                "varchar", "bigint", "bigint", "timestamptz")
_RECORD_COLUMNS = ("principal", "key", "method", "request_hash")
_MISSING_MARK = "one-statement-payment-incomplete"

# Protocol Buffers varint of a balance (0 <= b < 2**63: nine groups of 7 bits), low group first,
# with the continuation bit on every byte but the last.
_VARINT_OF_BALANCE = (
    r"(SELECT string_agg(set_byte('\x00'::bytea, 0, "
    "(((d.balance_cents >> (7 * i)) & 127) | (CASE WHEN (d.balance_cents >> (7 * i + 7)) > 0 THEN 128 ELSE 0 END))::int"
    "), ''::bytea ORDER BY i) FROM generate_series(0, 8) AS i WHERE i = 0 OR (d.balance_cents >> (7 * i)) > 0)"
)


@dataclass(frozen=True)
class MemberPayment:
    """What the statement books and writes. `event` holds the outbox row's values but the balance;
    the stored response is `response_head` + varint(the member's balance after) + `response_tail`."""

    member_account_id: int
    organisation_account_id: int
    amount_cents: int
    default_low_limit_cents: int  # the low-balance limit while no fee settings were ever saved
    transaction: dict  # TRANSACTION_COLUMNS -> value
    postings: tuple[dict, dict]  # the member's and the organisation's: POSTING_COLUMNS but the booked ones
    event: dict  # EVENT_COLUMNS but balance_cents and created_at
    record: dict  # _RECORD_COLUMNS -> value
    response_head: bytes
    response_tail: bytes


def _sql() -> PreparedSql:
    def values(prefix: str, columns: tuple[str, ...], casts: tuple[str, ...], computed: dict[str, str]) -> str:
        return ", ".join(computed.get(col) or f"CAST(%({prefix}{col})s AS {cast})"
                         for col, cast in zip(columns, casts, strict=True))

    posting_computed = {"transaction_id": "tx.id", "created_at": "t.at"}
    member_posting = values("m_", POSTING_COLUMNS, POSTING_CASTS,
                            {**posting_computed, "balance_after_cents": "d.balance_cents"})
    org_posting = values("o_", POSTING_COLUMNS, POSTING_CASTS,
                         {**posting_computed, "balance_after_cents": "c.balance_cents"})
    event = values("ev_", EVENT_COLUMNS, _EVENT_CASTS, {"balance_cents": "d.balance_cents", "created_at": "%(at)s"})
    record = values("r_", _RECORD_COLUMNS, ("varchar",) * len(_RECORD_COLUMNS), {})
    return PreparedSql(
        # the member first (lock order), under the funds check
        "WITH d AS (UPDATE accounts SET balance_cents = balance_cents - %(amount_cents)s, last_movement_at = %(at)s "
        "WHERE id = %(member_account_id)s AND balance_cents >= %(amount_cents)s + COALESCE("
        "(SELECT low_balance_limit_cents FROM fee_settings ORDER BY version DESC LIMIT 1), %(default_low_limit_cents)s) "
        "RETURNING balance_cents), "
        # the organisation second: its row is locked only once the member's is
        "c AS (UPDATE accounts SET balance_cents = balance_cents + %(amount_cents)s, last_movement_at = %(at)s "
        "WHERE id = %(organisation_account_id)s AND EXISTS (SELECT 1 FROM d) RETURNING balance_cents), "
        "t AS MATERIALIZED (SELECT clock_timestamp() AS at FROM c), "
        f"tx AS (INSERT INTO transactions ({', '.join(TRANSACTION_COLUMNS)}, created_at) "
        f"SELECT {values('tx_', TRANSACTION_COLUMNS, TRANSACTION_CASTS, {})}, t.at FROM t RETURNING id), "
        f"ins AS (INSERT INTO postings ({', '.join(POSTING_COLUMNS)}) "
        f"SELECT {member_posting} FROM d, t, tx UNION ALL SELECT {org_posting} FROM c, t, tx RETURNING 1), "
        f"ev AS (INSERT INTO outbox_events ({', '.join(EVENT_COLUMNS)}) SELECT {event} FROM d RETURNING 1), "
        f"rec AS (INSERT INTO idempotency_keys ({', '.join(_RECORD_COLUMNS)}, response, created_at) "
        f"SELECT {record}, CAST(%(response_head)s AS bytea) || {_VARINT_OF_BALANCE} || CAST(%(response_tail)s AS bytea), "
        "%(at)s FROM d RETURNING 1) "
        # Every row written, or the statement fails whole (the cast fails only when rows are missing).
        # The event and the record are written first, the postings (after the organisation's lock)
        # last: the organisation's row stays locked for the postings and the commit alone.
        "SELECT d.balance_cents, CASE WHEN (SELECT count(*) FROM ev) = 1 AND (SELECT count(*) FROM rec) = 1 "
        "AND (SELECT count(*) FROM ins) = 2 THEN 0 "
        f"ELSE CAST((SELECT count(*) FROM ins)::text || ':{_MISSING_MARK}' AS integer) END FROM d"
    )


_PAY_SQL = _sql()


def book_member_payment(db: Database, payment: MemberPayment) -> int | None:
    """Book `payment` and commit it in one statement: the member's balance after, or None when
    nothing was changed (the careful path must run). PostgreSQL only."""
    at = utcnow()
    params: dict = {
        "amount_cents": payment.amount_cents, "default_low_limit_cents": payment.default_low_limit_cents, "at": at,
        "member_account_id": payment.member_account_id, "organisation_account_id": payment.organisation_account_id,
        "response_head": psycopg2.Binary(payment.response_head), "response_tail": psycopg2.Binary(payment.response_tail),
    }
    for prefix, row in (("tx_", payment.transaction), ("m_", payment.postings[0]), ("o_", payment.postings[1]),
                        ("ev_", payment.event), ("r_", payment.record)):
        for col, value in row.items():
            params[prefix + col] = value
    fairy = db.engine.raw_connection()
    try:
        try:
            with fairy.cursor() as cur:
                _PAY_SQL.ensure_on(fairy)
                cur.execute(_PAY_SQL.execute_sql, _PAY_SQL.values(params))
                row = cur.fetchone()
        except psycopg2.Error:
            if fairy.dbapi_connection is None or fairy.dbapi_connection.closed:
                fairy.invalidate()  # the connection broke: the pool must not hand it out again
            return None  # nothing was committed: the careful path finds out why, and says so
    finally:
        fairy.close()
    if row is None:
        return None  # the balance does not cover it above the low limit (or no such member)
    db.events_committed()
    return row[0]
