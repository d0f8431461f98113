"""The common Pay, member → organisation, as ONE statement on PostgreSQL: one round trip, and a
transaction that is that statement alone (the connection runs in autocommit).

The statement takes one or more payments, to any organisations. For each it debits the member
under the funds check, and writes its transaction row, both postings with their balance after, the
outbox event and the idempotency record; it credits each organisation once with the sum of its
payments, and commits. Members are locked first and organisations last, each in id order, as
`book()` locks accounts (types.lock_rank); postings are stamped with the database clock read after
every lock, and an organisation's postings take ids in the order of their balances after, so a
statement's order (time, id) stays the order in which each balance moved.

Several payments in one statement is group commit: the payments that arrive while a statement is
in flight go together in the next (`PaymentBatcher`), so a congress taking entries takes its row
lock, and waits for a commit, once for all of them instead of once each.

A payment is booked here only when no decision is needed on the way: the member is left at or
above the current low-balance limit (the low-balance rule has nothing to say), and it is the
member's first payment in the statement. Any other payment is left out, and the caller takes the
careful path for it (`book()` in a unit of work), which finds out what is wrong and answers for it.
An unknown organisation, or a repeated idempotency key, fails the statement whole: nothing is
committed and every payment in it takes the careful path.
"""

from __future__ import annotations

import json
from typing import NamedTuple

import psycopg2

from server.ledger.db import Database, PreparedSql, utcnow
from server.ledger.loop_connection import LoopConnection, StatementBatcher

# payments in one statement: with calls accepted ahead, a third of statements filled 32 (64 measured 2 to 10 % faster)
MAX_BATCH = 64
_MISSING_MARK = "one-statement-payment-incomplete"


def varint_sql(value: str) -> str:
    """SQL for the Protocol Buffers varint of `value`, a balance (0 <= b < 2**63: nine groups of 7
    bits), low group first, with the continuation bit on every byte but the last."""
    return (
        r"(SELECT string_agg(set_byte('\x00'::bytea, 0, "
        f"((({value} >> (7 * i)) & 127) | (CASE WHEN ({value} >> (7 * i + 7)) > 0 THEN 128 ELSE 0 END))::int"
        f"), ''::bytea ORDER BY i) FROM generate_series(0, 8) AS i WHERE i = 0 OR ({value} >> (7 * i)) > 0)"
    )


_VARINT_OF_BALANCE = varint_sql("d.balance_cents")
# the low-balance limit now: the newest fee settings', or the default when none were ever saved
LOW_LIMIT_SQL = ("lim AS (SELECT COALESCE((SELECT low_balance_limit_cents FROM fee_settings ORDER BY version DESC "
                 "LIMIT 1), %(default_low_limit_cents)s) AS cents)")


class MemberPayment(NamedTuple):
    """One payment of the statement: the transaction's and the event's values, and the record's.
    The stored response is `response_head` + varint(the member's balance after) + `response_tail`.
    (A named tuple: immutable as a frozen dataclass is, and made in half the time: one per Pay.)"""

    organisation_account_id: int
    organisation_id: int
    member_account_id: int
    member_id: int
    amount_cents: int
    type: str
    description: str
    principal: str
    payment_id: str
    reference: str
    event_id: int | None
    session_id: int | None
    event_kind: str
    route_code: str
    route_payload: str
    record_principal: str
    record_key: str
    record_method: str
    record_request_hash: str
    response_head: bytes
    response_tail: bytes


# column of the input -> its SQL type
_INPUT = {
    "n": "int", "organisation_account_id": "bigint", "organisation_id": "bigint", "member_account_id": "bigint",
    "member_id": "bigint", "amount_cents": "bigint", "type": "varchar",
    "description": "varchar", "principal": "varchar", "payment_id": "varchar", "reference": "varchar",
    "event_id": "bigint", "session_id": "bigint", "event_kind": "varchar", "route_code": "varchar",
    "route_payload": "text", "record_principal": "varchar", "record_key": "varchar", "record_method": "varchar",
    "record_request_hash": "varchar", "response_head": "bytea", "response_tail": "bytea",
}


def recordset_sql(param: str, columns: dict[str, str]) -> str:
    """SQL for the rows of a statement, sent as one JSON document (`rows_json`): one value for
    psycopg2 to adapt instead of an array per column. With 40 payments the arrays took 25 µs a payment
    of the event loop's time to adapt, and PostgreSQL four times as long to read as this (bytea
    columns travel as hex text, decoded where they are used)."""
    typed = ", ".join(f"{col} {'text' if sql_type == 'bytea' else sql_type}" for col, sql_type in columns.items())
    return f"json_to_recordset(CAST(%({param})s AS json)) AS r({typed})"


def rows_json(items: list, bytea_columns: tuple[str, ...]) -> str:
    """The rows of `items` (named tuples) for `recordset_sql`, each with its place `n`."""
    rows = []
    for n, item in enumerate(items):
        row = item._asdict()
        row["n"] = n
        for col in bytea_columns:
            row[col] = row[col].hex()
        rows.append(row)
    return json.dumps(rows)


def _sql() -> PreparedSql:
    return PreparedSql(
        f"WITH r AS MATERIALIZED (SELECT * FROM {recordset_sql('payments', _INPUT)}), "
        f"{LOW_LIMIT_SQL}, "
        # the members first, in id order (the one lock order)
        # (`= ANY` of the input array: an index scan, whatever the size of the batch)
        "lk AS MATERIALIZED (SELECT id FROM accounts WHERE id = ANY(CAST(%(member_account_id)s AS bigint[])) "
        "ORDER BY id FOR UPDATE), "
        # each debit under the funds check; of a member's payments only the first is taken (the
        # others are left out: an UPDATE changes a row once)
        "r1 AS (SELECT DISTINCT ON (member_account_id) n, member_account_id, amount_cents FROM r "
        "ORDER BY member_account_id, n), "
        "d AS (UPDATE accounts AS a SET balance_cents = a.balance_cents - r1.amount_cents, last_movement_at = %(at)s "
        "FROM r1, lim WHERE a.id = ANY(CAST(%(member_account_id)s AS bigint[])) AND a.id = r1.member_account_id "
        "AND a.id IN (SELECT id FROM lk) AND a.balance_cents >= r1.amount_cents + lim.cents "
        "RETURNING r1.n, a.balance_cents), "
        # then the organisations, in id order, each credited once with the sum of what was debited
        "s AS MATERIALIZED (SELECT r.organisation_account_id AS id, sum(r.amount_cents) AS amount_cents "
        "FROM d JOIN r USING (n) GROUP BY 1), "
        "lko AS MATERIALIZED (SELECT id FROM accounts WHERE id = ANY(CAST(%(organisation_account_id)s AS bigint[])) "
        "AND id IN (SELECT id FROM s) ORDER BY id FOR UPDATE), "
        "c AS (UPDATE accounts AS a SET balance_cents = a.balance_cents + s.amount_cents, last_movement_at = %(at)s "
        "FROM s WHERE a.id = ANY(CAST(%(organisation_account_id)s AS bigint[])) AND a.id = s.id "
        "AND a.id IN (SELECT id FROM lko) RETURNING a.id, a.balance_cents), "
        "t AS MATERIALIZED (SELECT clock_timestamp() AS at FROM (SELECT count(*) FROM c) AS after_every_lock), "
        # each organisation's balance after each of its payments, in input order
        "ok AS MATERIALIZED (SELECT r.*, d.balance_cents AS member_after_cents, c.balance_cents - COALESCE(sum(r.amount_cents) "
        "OVER (PARTITION BY r.organisation_account_id ORDER BY r.n DESC ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), "
        "0) AS organisation_after_cents, t.at "
        "FROM d JOIN r USING (n) JOIN c ON c.id = r.organisation_account_id CROSS JOIN t), "
        "tx AS (INSERT INTO transactions (reference, type, description, principal, payment_id, batch_id, event_id, "
        "session_id, created_at) SELECT reference, type, description, principal, payment_id, NULL, event_id, session_id, "
        "at FROM ok ORDER BY n RETURNING id, reference), "
        "ins AS (INSERT INTO postings (transaction_id, account_id, amount_cents, balance_after_cents, "
        "counterparty_account_id, reference, type, description, payment_id, event_id, session_id, created_at) "
        "SELECT tx.id, leg.account_id, leg.amount_cents, leg.balance_after_cents, leg.counterparty_account_id, "
        "ok.reference || leg.suffix, ok.type, ok.description, ok.payment_id, ok.event_id, ok.session_id, ok.at "
        "FROM ok JOIN tx USING (reference) CROSS JOIN LATERAL (VALUES "
        "(ok.member_account_id, -ok.amount_cents, ok.member_after_cents, ok.organisation_account_id, '-1'), "
        "(ok.organisation_account_id, ok.amount_cents, ok.organisation_after_cents, ok.member_account_id, '-2')"
        ") AS leg(account_id, amount_cents, balance_after_cents, counterparty_account_id, suffix) "
        "ORDER BY ok.n, leg.suffix RETURNING 1), "  # ids in the order of the balances after
        "ev AS (INSERT INTO outbox_events (kind, member_id, organisation_id, other_member_id, amount_cents, balance_cents, "
        "payment_id, reference, route_code, route_payload, reason, event_id, session_id, created_at) "
        "SELECT r.event_kind, r.member_id, r.organisation_id, 0, r.amount_cents, d.balance_cents, r.payment_id, "
        "r.reference, r.route_code, r.route_payload, '', COALESCE(r.event_id, 0), COALESCE(r.session_id, 0), %(at)s "
        "FROM d JOIN r USING (n) ORDER BY r.n RETURNING 1), "
        "rec AS (INSERT INTO idempotency_keys (principal, key, method, request_hash, response, created_at) "
        "SELECT r.record_principal, r.record_key, r.record_method, r.record_request_hash, "
        f"decode(r.response_head, 'hex') || {_VARINT_OF_BALANCE} || decode(r.response_tail, 'hex'), %(at)s "
        "FROM d JOIN r USING (n) RETURNING 1), "
        "k AS (SELECT count(*) AS booked FROM d) "
        # Every row written, or the statement fails whole (the cast fails only when rows are missing).
        # The events and the records are written first, the postings (after the organisation's lock)
        # last: the organisation's row stays locked for the postings and the commit alone.
        "SELECT d.n, d.balance_cents, CASE WHEN (SELECT count(*) FROM ev) = k.booked "
        "AND (SELECT count(*) FROM rec) = k.booked AND (SELECT count(*) FROM ins) = 2 * k.booked THEN 0 "
        f"ELSE CAST((SELECT count(*) FROM ins)::text || ':{_MISSING_MARK}' AS integer) END FROM d, k"
    )


def _single_sql() -> PreparedSql:
    """The same for one payment, with plain values: no arrays to unnest, join, sort and number,
    which cost PostgreSQL a third more CPU per payment than the statement's own writes."""
    def value(col: str) -> str:
        return f"CAST(%({col})s AS {_INPUT[col]})"

    return PreparedSql(
        f"WITH {LOW_LIMIT_SQL}, "
        "d AS (UPDATE accounts SET balance_cents = balance_cents - %(amount_cents)s, last_movement_at = %(at)s "
        "WHERE id = %(member_account_id)s AND balance_cents >= %(amount_cents)s + (SELECT cents FROM lim) "
        "RETURNING balance_cents), "
        "c AS (UPDATE accounts SET balance_cents = balance_cents + %(amount_cents)s, last_movement_at = %(at)s "
        "WHERE id = %(organisation_account_id)s AND EXISTS (SELECT 1 FROM d) RETURNING balance_cents), "
        "t AS MATERIALIZED (SELECT clock_timestamp() AS at FROM c), "
        "tx AS (INSERT INTO transactions (reference, type, description, principal, payment_id, batch_id, event_id, "
        f"session_id, created_at) SELECT {value('reference')}, {value('type')}, {value('description')}, "
        f"{value('principal')}, {value('payment_id')}, NULL, {value('event_id')}, {value('session_id')}, t.at "
        "FROM t RETURNING id), "
        "ins AS (INSERT INTO postings (transaction_id, account_id, amount_cents, balance_after_cents, "
        "counterparty_account_id, reference, type, description, payment_id, event_id, session_id, created_at) "
        "SELECT tx.id, leg.account_id, leg.amount_cents, leg.balance_after_cents, leg.counterparty_account_id, "
        f"{value('reference')} || leg.suffix, {value('type')}, {value('description')}, {value('payment_id')}, "
        f"{value('event_id')}, {value('session_id')}, t.at FROM d, c, t, tx CROSS JOIN LATERAL (VALUES "
        f"({value('member_account_id')}, -{value('amount_cents')}, d.balance_cents, "
        "CAST(%(organisation_account_id)s AS bigint), '-1'), "
        f"(CAST(%(organisation_account_id)s AS bigint), {value('amount_cents')}, c.balance_cents, "
        f"{value('member_account_id')}, '-2')"
        ") AS leg(account_id, amount_cents, balance_after_cents, counterparty_account_id, suffix) RETURNING 1), "
        "ev AS (INSERT INTO outbox_events (kind, member_id, organisation_id, other_member_id, amount_cents, balance_cents, "
        "payment_id, reference, route_code, route_payload, reason, event_id, session_id, created_at) "
        f"SELECT {value('event_kind')}, {value('member_id')}, %(organisation_id)s, 0, {value('amount_cents')}, "
        f"d.balance_cents, {value('payment_id')}, {value('reference')}, {value('route_code')}, {value('route_payload')}, "
        f"'', COALESCE({value('event_id')}, 0), COALESCE({value('session_id')}, 0), %(at)s FROM d RETURNING 1), "
        "rec AS (INSERT INTO idempotency_keys (principal, key, method, request_hash, response, created_at) "
        f"SELECT {value('record_principal')}, {value('record_key')}, {value('record_method')}, "
        f"{value('record_request_hash')}, {value('response_head')} || {_VARINT_OF_BALANCE} || {value('response_tail')}, "
        "%(at)s FROM d RETURNING 1) "
        "SELECT 0, d.balance_cents, CASE WHEN (SELECT count(*) FROM ev) = 1 AND (SELECT count(*) FROM rec) = 1 "
        "AND (SELECT count(*) FROM ins) = 2 THEN 0 "
        f"ELSE CAST((SELECT count(*) FROM ins)::text || ':{_MISSING_MARK}' AS integer) END FROM d"
    )


_PAY_SQL = _sql()
_PAY_ONE_SQL = _single_sql()


async def book_member_payments(connection: LoopConnection, payments: list[MemberPayment],
                               default_low_limit_cents: int) -> list[int | None]:
    """Book `payments` and commit them in one statement: for each, the member's balance after, or
    None when it was left out (the careful path must run for it). `default_low_limit_cents` is the
    low-balance limit while no fee settings were ever saved. PostgreSQL only."""
    assert payments and len(payments) <= MAX_BATCH
    one = len(payments) == 1
    sql = _PAY_ONE_SQL if one else _PAY_SQL
    params: dict = {"at": utcnow(), "default_low_limit_cents": default_low_limit_cents}
    if one:
        params.update({col: getattr(payments[0], col) for col in _INPUT if col != "n"})
        params["response_head"] = psycopg2.Binary(payments[0].response_head)
        params["response_tail"] = psycopg2.Binary(payments[0].response_tail)
    else:
        params["payments"] = rows_json(payments, ("response_head", "response_tail"))
        # (and the accounts as arrays, for `= ANY`: an index scan, whatever the size of the batch)
        params["member_account_id"] = [p.member_account_id for p in payments]
        params["organisation_account_id"] = [p.organisation_account_id for p in payments]
    try:
        rows = await connection.fetch(sql, params)
    except psycopg2.Error:
        return [None] * len(payments)  # nothing was committed: the careful path finds out why
    balances: list[int | None] = [None] * len(payments)
    for n, balance, _ in rows:
        balances[n] = balance
    if rows:
        connection.db.events_committed()
    return balances


class PaymentBatcher(StatementBatcher[MemberPayment, "int | None"]):
    """The group commit of the one-statement Pay (`StatementBatcher`): a congress taking entries
    takes its row lock, and waits for a commit, once per statement instead of once per Pay. One
    statement in flight per process measured best (README, Performance)."""

    def __init__(self, db: Database, default_low_limit_cents: int, max_in_flight: int = 1):
        super().__init__(db, MAX_BATCH, max_in_flight)
        self.default_low_limit_cents = default_low_limit_cents

    async def _run(self, connection: LoopConnection, items: list[MemberPayment]) -> list[int | None]:
        return await book_member_payments(connection, items, self.default_low_limit_cents)

    async def book(self, payment: MemberPayment) -> int | None:
        """The member's balance after, or None: the payment was left out, and nothing of it written."""
        return await self.submit(payment)
