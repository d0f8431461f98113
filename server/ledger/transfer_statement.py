"""The common Transfer, member → member, as ONE statement on PostgreSQL, as `one_statement` does the
common Pay: one round trip, and a transaction that is that statement alone.

The statement takes one or more transfers. It locks every member account involved, in id order
(the one lock order), then for each transfer debits the payer under the funds check and credits the
payee. It writes the transaction row, both postings with their balance after, the outbox event
(TRANSFER_RECEIVED, to the payee) and the idempotency record, with the response built in SQL, then
commits. No account appears in two transfers of one statement (`TransferBatcher` sees to that), so
each balance moves once and its balance after is the one its row returns.

A transfer is booked here only when no decision is needed on the way: the payer is left at or above
the current low-balance limit, and the payee's account exists. Any other transfer is left out, with
nothing written, and takes the careful path (`book()` in a unit of work), which finds out what is
wrong and answers for it (short funds, a low balance and its event, a payee's first account). A
repeated idempotency key fails the statement whole, and every transfer in it takes the careful path.
"""

from __future__ import annotations

from typing import NamedTuple

import psycopg2

from server.ledger.db import Database, PreparedSql, utcnow
from server.ledger.loop_connection import LoopConnection, StatementBatcher
from server.ledger.one_statement import LOW_LIMIT_SQL, recordset_sql, rows_json, varint_sql

MAX_BATCH = 64  # transfers in one statement
_MISSING_MARK = "one-statement-transfer-incomplete"


class MemberTransfer(NamedTuple):
    """One transfer of the statement. The stored response is `response_head` + varint(payer's balance
    after) + `response_mid` + varint(payee's balance after) + `response_tail`."""

    from_account_id: int
    from_member_id: int
    to_account_id: int
    to_member_id: int
    amount_cents: int
    type: str
    description: str
    principal: str
    payment_id: str
    reference: str
    event_kind: str
    record_principal: str
    record_key: str
    record_method: str
    record_request_hash: str
    response_head: bytes
    response_mid: bytes
    response_tail: bytes


_INPUT = {
    "n": "int", "from_account_id": "bigint", "from_member_id": "bigint", "to_account_id": "bigint",
    "to_member_id": "bigint", "amount_cents": "bigint", "type": "varchar", "description": "varchar",
    "principal": "varchar", "payment_id": "varchar", "reference": "varchar", "event_kind": "varchar",
    "record_principal": "varchar", "record_key": "varchar", "record_method": "varchar",
    "record_request_hash": "varchar", "response_head": "bytea", "response_mid": "bytea", "response_tail": "bytea",
}

_SQL = PreparedSql(
    f"WITH r AS MATERIALIZED (SELECT * FROM {recordset_sql('transfers', _INPUT)}), "
    f"{LOW_LIMIT_SQL}, "
    # every account of the statement, payers and payees, in id order (the one lock order)
    "lk AS MATERIALIZED (SELECT id FROM accounts WHERE id = ANY(CAST(%(from_account_id)s AS bigint[]) "
    "|| CAST(%(to_account_id)s AS bigint[])) ORDER BY id FOR UPDATE), "
    # each debit under the funds check, when the payee's account exists
    "d AS (UPDATE accounts AS a SET balance_cents = a.balance_cents - r.amount_cents, last_movement_at = %(at)s "
    "FROM r, lim WHERE a.id = ANY(CAST(%(from_account_id)s AS bigint[])) AND a.id = r.from_account_id "
    "AND a.id IN (SELECT id FROM lk) AND r.to_account_id IN (SELECT id FROM lk) "
    "AND a.balance_cents >= r.amount_cents + lim.cents RETURNING r.n, a.balance_cents), "
    "c AS (UPDATE accounts AS a SET balance_cents = a.balance_cents + r.amount_cents, last_movement_at = %(at)s "
    "FROM d JOIN r USING (n) WHERE a.id = ANY(CAST(%(to_account_id)s AS bigint[])) AND a.id = r.to_account_id "
    "RETURNING r.n, a.balance_cents), "
    "t AS MATERIALIZED (SELECT clock_timestamp() AS at FROM (SELECT count(*) FROM c) AS after_every_lock), "
    "ok AS MATERIALIZED (SELECT r.*, d.balance_cents AS from_after_cents, c.balance_cents AS to_after_cents, t.at "
    "FROM d JOIN r USING (n) JOIN c USING (n) CROSS JOIN t), "
    "tx AS (INSERT INTO transactions (reference, type, description, principal, payment_id, batch_id, event_id, "
    "session_id, created_at) SELECT reference, type, description, principal, payment_id, NULL, NULL, NULL, at "
    "FROM ok ORDER BY n RETURNING id, reference), "
    "ins AS (INSERT INTO postings (transaction_id, account_id, amount_cents, balance_after_cents, "
    "counterparty_account_id, reference, type, description, payment_id, event_id, session_id, created_at) "
    "SELECT tx.id, leg.account_id, leg.amount_cents, leg.balance_after_cents, leg.counterparty_account_id, "
    "ok.reference || leg.suffix, ok.type, ok.description, ok.payment_id, NULL, NULL, ok.at "
    "FROM ok JOIN tx USING (reference) CROSS JOIN LATERAL (VALUES "
    "(ok.from_account_id, -ok.amount_cents, ok.from_after_cents, ok.to_account_id, '-1'), "
    "(ok.to_account_id, ok.amount_cents, ok.to_after_cents, ok.from_account_id, '-2')"
    ") AS leg(account_id, amount_cents, balance_after_cents, counterparty_account_id, suffix) "
    "ORDER BY ok.n, leg.suffix RETURNING 1), "
    "ev AS (INSERT INTO outbox_events (kind, member_id, organisation_id, other_member_id, amount_cents, balance_cents, "
    "payment_id, reference, route_code, route_payload, reason, event_id, session_id, created_at) "
    "SELECT ok.event_kind, ok.to_member_id, 0, ok.from_member_id, ok.amount_cents, ok.to_after_cents, ok.payment_id, "
    "ok.reference, '', '', '', 0, 0, %(at)s FROM ok ORDER BY ok.n RETURNING 1), "
    "rec AS (INSERT INTO idempotency_keys (principal, key, method, request_hash, response, created_at) "
    "SELECT ok.record_principal, ok.record_key, ok.record_method, ok.record_request_hash, "
    f"decode(ok.response_head, 'hex') || {varint_sql('ok.from_after_cents')} || decode(ok.response_mid, 'hex') || "
    f"{varint_sql('ok.to_after_cents')} || decode(ok.response_tail, 'hex'), %(at)s FROM ok RETURNING 1), "
    "k AS (SELECT count(*) AS booked FROM d) "
    # every row written, or the statement fails whole (the cast fails only when rows are missing)
    "SELECT ok.n, ok.from_after_cents, ok.to_after_cents, CASE WHEN (SELECT count(*) FROM ok) = k.booked "
    "AND (SELECT count(*) FROM ev) = k.booked AND (SELECT count(*) FROM rec) = k.booked "
    "AND (SELECT count(*) FROM ins) = 2 * k.booked THEN 0 "
    f"ELSE CAST((SELECT count(*) FROM ins)::text || ':{_MISSING_MARK}' AS integer) END FROM ok, k"
)


async def book_member_transfers(connection: LoopConnection, transfers: list[MemberTransfer],
                                default_low_limit_cents: int) -> list[tuple[int, int] | None]:
    """Book `transfers` (no account in two of them) and commit them in one statement: for each, the
    payer's and the payee's balances after, or None when it was left out (the careful path must run
    for it). PostgreSQL only."""
    assert transfers and len(transfers) <= MAX_BATCH
    accounts = [a for t in transfers for a in (t.from_account_id, t.to_account_id)]
    assert len(set(accounts)) == len(accounts), "no account in two transfers of one statement"
    params: dict = {"at": utcnow(), "default_low_limit_cents": default_low_limit_cents,
                    "transfers": rows_json(transfers, ("response_head", "response_mid", "response_tail")),
                    # (and the accounts as arrays, for `= ANY`: an index scan, whatever the size of the batch)
                    "from_account_id": [t.from_account_id for t in transfers],
                    "to_account_id": [t.to_account_id for t in transfers]}
    try:
        rows = await connection.fetch(_SQL, params)
    except psycopg2.Error:
        return [None] * len(transfers)  # nothing was committed: the careful path finds out why
    answers: list[tuple[int, int] | None] = [None] * len(transfers)
    for n, from_after, to_after, _ in rows:
        answers[n] = (from_after, to_after)
    if rows:
        connection.db.events_committed()
    return answers


class TransferBatcher(StatementBatcher[MemberTransfer, "tuple[int, int] | None"]):
    """Group commit of the one-statement Transfer. Of the transfers waiting, those that share an
    account with one taken before them are left out of the statement (and take the careful path):
    each account moves once per statement."""

    def __init__(self, db: Database, default_low_limit_cents: int):
        super().__init__(db, MAX_BATCH)
        self.default_low_limit_cents = default_low_limit_cents

    async def _run(self, connection: LoopConnection, items: list[MemberTransfer]) -> list[tuple[int, int] | None]:
        taken: list[int] = []
        seen: set[int] = set()
        for i, t in enumerate(items):
            if t.from_account_id not in seen and t.to_account_id not in seen:
                seen.update((t.from_account_id, t.to_account_id))
                taken.append(i)
        answers: list[tuple[int, int] | None] = [None] * len(items)
        booked = await book_member_transfers(connection, [items[i] for i in taken], self.default_low_limit_cents)
        for i, answer in zip(taken, booked, strict=True):
            answers[i] = answer
        return answers

    async def book(self, transfer: MemberTransfer) -> tuple[int, int] | None:
        """(payer's, payee's) balance after, or None: left out, and nothing of it written."""
        return await self.submit(transfer)
