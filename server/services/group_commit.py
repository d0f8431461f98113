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
Without load a group is one request and nobody waits. A group waits up to GROUP_LOCK_WAIT_MS for
a row another transaction holds (another group's, another process's: held for a commit); when one
stays held longer, the group is booked again skipping busy accounts (`SKIP LOCKED`), and so are the
groups of the next SKIP_FOR_S. The requests that need a busy account wait for it alone (holding no
other row) and are booked alone, up to the lock timeout, so one busy account never holds up the others.
Two requests with the same idempotency key never share a group: the second waits for the next.

A group's unit of work runs on the event loop (`server.ledger.green`: the same blocking code, waiting
for the database on the loop), in three round trips: BEGIN with the idempotency lookup, the locks,
then the bookings, events and records written with the COMMIT (`Database.run(fold=True)`,
`ledger.post(write_at_commit=True)`).
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
from server.domain.errors import Aborted, DomainError
from server.ledger import db_errors, idempotency, ledger
from server.ledger.db import Database
from server.ledger.ledger import AccountBusy, Booked, NewTransaction

log = structlog.get_logger("payments.server")

MAX_GROUP = 64  # requests in one unit of work
SLOW_GROUP_MS = 100.0  # a group that takes longer is logged: every request of its kind waited for it
# A group waits this long for a row another transaction holds (another group, another process: their
# commits take milliseconds); past it, the group is booked again skipping the busy accounts, and the
# groups of the next SKIP_FOR_S do that at once.
GROUP_LOCK_WAIT_MS = 200
# Groups booked at once (measured: two at once made smaller groups and cost more per Pay than they gained).
GROUPS_IN_FLIGHT = 1
SKIP_FOR_S = 1.0


class BalanceRequest(Protocol):
    pending: idempotency.Pending | None  # None: the caller records the result itself (card flows)

    def plan(self, conn: Connection) -> NewTransaction | Any:
        """The transaction to book, or the result at once (nothing to book), or a DomainError."""

    def finish(self, conn: Connection, booked: Booked) -> Any:
        """Events and the result of the booked transaction."""


Outcome = Any  # a result, an idempotency.Replayed, or a DomainError


def book_many(conn: Connection, requests: Sequence[BalanceRequest], *, skip_locked: bool = False,
              lock_wait_ms: int | None = None, write_at_commit: bool = False) -> list[Outcome]:
    keyed = [(n, r.pending) for n, r in enumerate(requests) if r.pending is not None]
    outcomes: list[Outcome] = [None] * len(requests)
    # this unit of work waits at most lock_wait_ms for a row lock (said with the lookup: no round trip of its own)
    lookup = idempotency.lookup_many(conn, [p for _, p in keyed],
                                     before=None if lock_wait_ms is None else f"SET LOCAL lock_timeout = {int(lock_wait_ms)}")
    for (n, _), found in zip(keyed, lookup, strict=True):
        outcomes[n] = found
    fresh = [(n, r) for n, (r, found) in enumerate(zip(requests, outcomes, strict=True)) if found is None]
    planned = [_plan(conn, r) for _, r in fresh]
    transactions = [p for p in planned if isinstance(p, NewTransaction)]
    posted = iter(ledger.post(conn, transactions, skip_locked=skip_locked, write_at_commit=write_at_commit)
                  if transactions else ())
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
    def __init__(self, db: Database, run: Callable[[Callable[[], Any]], Awaitable[Any]], name: str,
                 max_group: int = MAX_GROUP, on_group: Callable[[int], None] | None = None,
                 max_in_flight: int = GROUPS_IN_FLIGHT):
        self.db = db
        self.run = run  # how blocking database work is run (server.ledger.green.on_loop: on the event loop)
        self.name = name
        self.max_group = max_group
        self.on_group = on_group  # told each group's size (metrics)
        self._waiting: list[tuple[BalanceRequest, asyncio.Future, float | None]] = []  # with the call's deadline
        self.max_in_flight = max_in_flight
        self._in_flight = 0  # groups being booked now
        self._skip_until = 0.0  # groups skip busy accounts at once until then (an account was found held)

    async def submit(self, request: BalanceRequest) -> Any:
        """The request's outcome: its result, an `idempotency.Replayed`, or the DomainError refusing it."""
        answer = asyncio.get_running_loop().create_future()
        self._waiting.append((request, answer, deadlines.take()))
        if self._in_flight < self.max_in_flight:
            self._in_flight += 1
            asyncio.get_running_loop().create_task(self._drain())
        outcome = await answer
        if isinstance(outcome, AccountBusy):  # booked again alone, once the busy account is free
            await self.run(lambda: self.db.run(lambda conn: _wait_for(conn, outcome.account_id)))
            outcome = await self.alone(request)
        return outcome

    async def alone(self, request: BalanceRequest) -> Any:
        return (await self.run(lambda: self._book([request], skip_locked=False)))[0]

    def _book(self, group: list[BalanceRequest], *, skip_locked: bool, lock_wait_ms: int | None = None) -> list[Any]:
        # a group's unit is a few statements: its BEGIN goes with the first, its COMMIT with the one
        # write of its bookings, events and records (three round trips in all)
        def unit(conn: Connection) -> list[Any]:
            return book_many(conn, group, skip_locked=skip_locked, lock_wait_ms=lock_wait_ms, write_at_commit=True)

        try:
            return self.db.run(unit, fold=True)
        except IntegrityError:
            # a request with the same key committed meanwhile elsewhere: the group rolled back
            # whole; once more, each request finds its stored result or books anew
            return self.db.run(unit, fold=True)

    def _book_group(self, group: list[BalanceRequest]) -> list[Any]:
        """A group waits briefly for rows others hold; when one stays held, it skips what is busy."""
        if time.monotonic() < self._skip_until:
            return self._book(group, skip_locked=True)
        try:
            return self._book(group, skip_locked=False, lock_wait_ms=GROUP_LOCK_WAIT_MS)
        except Aborted as exc:
            if db_errors.sqlstate(exc.__cause__) not in db_errors.LOCK_TIMEOUT_CODES:
                raise
            self._skip_until = time.monotonic() + SKIP_FOR_S
            return self._book(group, skip_locked=True)

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
                    outcomes = await self.run(lambda g=group: self._book_group([request for request, _, _ in g]))
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
            self._in_flight -= 1
