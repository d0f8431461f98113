"""Requests that book from a balance (Pay, Transfer), one or many in one unit of work.

`book_many` is the use case's side of group commit: it answers repeats from their stored results,
asks each new request for its transaction, books them all through the one write path
(`ledger.post`), and lets each booked request finish (its events, its result), recording the result
under its idempotency key. A refused request (funds, an unknown payee, a busy account) writes
nothing and records nothing; the others go on."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from sqlalchemy import Connection

from server.domain.errors import DomainError
from server.ledger import idempotency, ledger
from server.ledger.ledger import Booked, NewTransaction


class BalanceRequest(Protocol):
    pending: idempotency.Pending | None  # None: the caller records the result itself (card flows)

    def plan(self, conn: Connection) -> NewTransaction | Any:
        """The transaction to book, or the result at once (nothing to book), or a DomainError."""

    def finish(self, conn: Connection, booked: Booked) -> Any:
        """Events and the result of the booked transaction."""


Outcome = Any  # a result, an idempotency.Replayed, or a DomainError


def book_many(conn: Connection, requests: Sequence[BalanceRequest], *, skip_locked: bool = False) -> list[Outcome]:
    keyed = [(n, r.pending) for n, r in enumerate(requests) if r.pending is not None]
    outcomes: list[Outcome] = [None] * len(requests)
    for (n, _), found in zip(keyed, idempotency.lookup_many(conn, [p for _, p in keyed]), strict=True):
        outcomes[n] = found
    fresh = [(n, r) for n, (r, found) in enumerate(zip(requests, outcomes, strict=True)) if found is None]
    planned = [_plan(conn, r) for _, r in fresh]
    transactions = [p for p in planned if isinstance(p, NewTransaction)]
    posted = iter(ledger.post(conn, transactions, skip_locked=skip_locked) if transactions else ())
    for (n, request), plan in zip(fresh, planned, strict=True):
        result = plan
        if isinstance(plan, NewTransaction):
            booked = next(posted)
            result = booked if isinstance(booked, DomainError) else request.finish(conn, booked)
        if request.pending is not None and not isinstance(result, DomainError):
            request.pending.record(conn, result)
        outcomes[n] = result
    return outcomes


def _plan(conn: Connection, request: BalanceRequest) -> Any:
    try:
        return request.plan(conn)
    except DomainError as refused:
        return refused


def book_one(conn: Connection, request: BalanceRequest) -> Any:
    """One request, waiting for its locks: its result or replay; a refusal is raised."""
    (outcome,) = book_many(conn, [request])
    if isinstance(outcome, DomainError):
        raise outcome
    return outcome
