"""Ledger checks shared by the tests: a snapshot of every balance and the invariants of SPEC §2,
read straight from the database behind a running server."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from sqlalchemy import func, select

from server.domain.types import AccountKind
from server.ledger.db import Database
from server.ledger.schema import accounts, idempotency_keys, outbox_events, postings, transactions


@dataclass(frozen=True)
class Snapshot:
    balances: dict[int, int]
    transactions: int
    postings: int
    events: int
    idempotency_records: int


def snapshot(db: Database) -> Snapshot:
    with db.engine.connect() as conn:
        balances = {row.id: row.balance_cents for row in conn.execute(select(accounts.c.id, accounts.c.balance_cents))}
        counts = [conn.execute(select(func.count()).select_from(t)).scalar_one()
                  for t in (transactions, postings, outbox_events, idempotency_keys)]
    return Snapshot(balances, *counts)


def check_invariants(db: Database, *, negative_allowed: set[int] = frozenset()) -> None:  # type: ignore[assignment]
    """Money is conserved; each transaction's postings sum to zero; every balance equals the sum of
    its postings; balance-after chains add up per account; no member below zero unless allowed;
    the organisations' day totals are exactly their postings'; the balance totals per kind are the
    accounts' own."""
    with db.engine.connect() as conn:
        kept = sorted(tuple(r) for r in conn.exec_driver_sql(
            "SELECT account_id, day, type, amount_cents, count, in_cents, out_cents FROM account_day_totals"))
        recomputed = sorted(tuple(r) for r in conn.exec_driver_sql(
            "SELECT account_id, (created_at AT TIME ZONE 'UTC')::date, type, sum(amount_cents), count(*), "
            "sum(greatest(amount_cents, 0)), sum(greatest(-amount_cents, 0)) FROM postings "
            "WHERE account_id %% 4 = 2 GROUP BY 1, 2, 3"))
        totals_kept = sorted(tuple(r) for r in conn.exec_driver_sql(
            "SELECT kind, sum(accounts), sum(nonzero), sum(total_cents) FROM balance_totals GROUP BY kind "
            "HAVING sum(accounts) <> 0"))
        totals_counted = sorted(tuple(r) for r in conn.exec_driver_sql(
            "SELECT kind, count(*), count(*) FILTER (WHERE balance_cents <> 0), sum(balance_cents) FROM accounts "
            "GROUP BY kind"))
        rows = conn.execute(select(accounts.c.id, accounts.c.kind, accounts.c.balance_cents)).all()
        posting_rows = conn.execute(
            select(postings.c.transaction_id, postings.c.account_id, postings.c.amount_cents,
                   postings.c.balance_after_cents).order_by(postings.c.created_at, postings.c.id)  # statement order
        ).all()
    assert kept == recomputed, "the day totals the write path keeps are the postings' own"
    assert totals_kept == totals_counted, "the balance totals kept per kind are the accounts' own"
    assert sum(r.balance_cents for r in rows) == 0, "the sum of all balances is zero"
    by_txn: dict[int, int] = defaultdict(int)
    legs: dict[int, int] = defaultdict(int)
    chain: dict[int, int] = defaultdict(int)
    for p in posting_rows:
        by_txn[p.transaction_id] += p.amount_cents
        legs[p.transaction_id] += 1
        chain[p.account_id] += p.amount_cents
        assert p.balance_after_cents == chain[p.account_id], (
            f"account {p.account_id}: balance after {p.balance_after_cents} != running sum {chain[p.account_id]}")
    assert all(total == 0 for total in by_txn.values()), "postings of each transaction sum to zero"
    assert all(n >= 2 for n in legs.values()), "every transaction has two or more postings"
    for r in rows:
        assert r.balance_cents == chain.get(r.id, 0), f"account {r.id}: balance {r.balance_cents} != postings sum"
        if r.kind == AccountKind.MEMBER and r.id not in negative_allowed:
            assert r.balance_cents >= 0, f"member account {r.id} is below zero: {r.balance_cents}"


def bad_fields(err: grpc.RpcError) -> dict[str, str]:
    """google.rpc.BadRequest field violations carried by an error: {field: description}."""
    status = rpc_status.from_call(err)
    found: dict[str, str] = {}
    if status is None:
        return found
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            found.update({v.field: v.description for v in bad.field_violations})
    return found
