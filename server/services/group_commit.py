"""Group commit: a batching layer in front of the one write path, for requests that book from a
balance (Pay, Transfer).

`book_many` is one unit of work for one or many requests: it answers repeats from their stored
results, asks each new request for its transaction, books them all through the one write path
(`ledger.post`), and lets each booked request finish (its events, its result), recording the result
under its idempotency key. A refused request (funds, an unknown payee, a busy account) writes
nothing and records nothing; the others go on.

`GroupCommit` is the batching in front of it:
requests that arrive while a group is being booked wait and go together in the next group, in one
unit of work (`book_many`): they share its round trips, its row locks and its commit.
Without load a group is one request and nobody waits. A group skips accounts that another
transaction holds (`SKIP LOCKED`): the requests that need such an account are booked again alone,
waiting for the lock up to the lock timeout, so one busy account never holds up the others.
Two requests with the same idempotency key never share a group: the second waits for the next.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import structlog
from sqlalchemy import Connection
from sqlalchemy.exc import IntegrityError

from server import deadlines
from server.deadlines import DeadlineExceeded
from server.domain.errors import DomainError
from server.ledger import idempotency, ledger
from server.ledger.db import Database
from server.ledger.ledger import AccountBusy, Booked, NewTransaction

log = structlog.get_logger("payments.server")

MAX_GROUP = 64  # requests in one unit of work
SLOW_GROUP_MS = 100.0  # a group that takes longer is logged: every request of its kind waited for it


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


def _wait_for(conn: Connection, account_id: int) -> None:
    """Wait (up to the lock timeout) until the busy account is free, holding no other row: the
    booking that follows would hold its other accounts (a member's) while it waited, and hold up
    that member's payments to every other club."""
    conn.exec_driver_sql("SELECT 1 FROM accounts WHERE id = %(id)s FOR UPDATE", {"id": account_id})


class GroupCommit:
    def __init__(self, db: Database, in_thread: Callable[[Callable[[], Any]], Awaitable[Any]], name: str,
                 max_group: int = MAX_GROUP, on_group: Callable[[int], None] | None = None):
        self.db = db
        self.in_thread = in_thread
        self.name = name
        self.max_group = max_group
        self.on_group = on_group  # told each group's size (metrics)
        self._waiting: list[tuple[BalanceRequest, asyncio.Future, float | None]] = []  # with the call's deadline
        self._busy = False

    async def submit(self, request: BalanceRequest) -> Any:
        """The request's outcome: its result, an `idempotency.Replayed`, or the DomainError refusing it."""
        answer = asyncio.get_running_loop().create_future()
        self._waiting.append((request, answer, deadlines.take()))
        if not self._busy:
            self._busy = True
            asyncio.get_running_loop().create_task(self._drain())
        outcome = await answer
        if isinstance(outcome, AccountBusy):  # booked again alone, once the busy account is free
            await self.in_thread(lambda: self.db.run(lambda conn: _wait_for(conn, outcome.account_id)))
            outcome = await self.alone(request)
        return outcome

    async def alone(self, request: BalanceRequest) -> Any:
        return (await self.in_thread(lambda: self._book([request], skip_locked=False)))[0]

    def _book(self, group: list[BalanceRequest], *, skip_locked: bool) -> list[Any]:
        try:
            return self.db.run(lambda conn: book_many(conn, group, skip_locked=skip_locked))
        except IntegrityError:
            # a request with the same key committed meanwhile elsewhere: the group rolled back
            # whole; once more, each request finds its stored result or books anew
            return self.db.run(lambda conn: book_many(conn, group, skip_locked=skip_locked))

    def _next_group(self) -> list[tuple[BalanceRequest, asyncio.Future, float | None]]:
        group, rest, keys = [], [], set()
        for item in self._waiting:
            if item[1].done():  # its caller went away: it is not booked
                continue
            if deadlines.expired(item[2]):  # its caller's deadline passed while it waited: neither
                item[1].set_exception(DeadlineExceeded(deadlines.DEADLINE_MESSAGE))
                continue
            pending = item[0].pending
            key = None if pending is None else (pending.principal, pending.key)
            if len(group) < self.max_group and (key is None or key not in keys):
                group.append(item)
                keys.add(key)
            else:
                rest.append(item)
        self._waiting = rest
        return group

    async def _drain(self) -> None:
        try:
            while self._waiting:
                group = self._next_group()
                if not group:
                    continue
                started = time.perf_counter()
                try:
                    outcomes = await self.in_thread(
                        lambda g=group: self._book([request for request, _, _ in g], skip_locked=True))
                except Exception as exc:  # noqa: BLE001 - every request of the group is told
                    for _, answer, _ in group:
                        if not answer.done():
                            answer.set_exception(exc)
                    continue
                for (_, answer, _), outcome in zip(group, outcomes, strict=True):
                    if not answer.done():  # a caller that went away is not answered (a retry asks again)
                        answer.set_result(outcome)
                if self.on_group is not None:
                    self.on_group(len(group))
                took_ms = (time.perf_counter() - started) * 1000
                if took_ms > SLOW_GROUP_MS:
                    log.warning("slow group commit", kind=self.name, size=len(group), duration_ms=round(took_ms, 1))
        finally:
            self._busy = False
