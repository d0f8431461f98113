"""A group's unit of work: three round trips (BEGIN with the lookup, the locks, the write with the
COMMIT), run on the event loop (server/ledger/green.py), and nothing left behind when it fails."""

from __future__ import annotations

import asyncio

import pytest
from ledger_invariants import check_invariants, snapshot
from sqlalchemy import event, text
from sqlalchemy.exc import DBAPIError, IntegrityError

from server.domain.types import PostingType, member_account
from server.ledger import green, idempotency, ledger
from server.services.fees import MAX_LOW_BALANCE_LIMIT_CENTS
from server.services.group_commit import book_many
from server.services.pay import PayCommand, PayRequest


def _request(member: int, org: int, cents: int, key: str) -> PayRequest:
    return PayRequest(PayCommand("app", member, cents, org, None, "Entry", PostingType.ENTRY_TO_EVENT),
                      idempotency.Pending("app", key, "Pay", f"hash-{key}"))


def _open_transactions(db) -> int:  # noqa: ANN001
    with db.engine.connect() as conn:
        return conn.execute(text(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid() "
            "AND state LIKE 'idle in transaction%'")).scalar_one()


def test_a_group_is_three_round_trips_and_commits_with_its_write(server, admin):
    admin.upsert_organisation(7, "Club")
    for member in range(1, 6):  # above any low-balance limit: no settings to read after the Pay
        admin.adjust(MAX_LOW_BALANCE_LIMIT_CENTS + 10_000, "opening", member_id=member)
    before = snapshot(server.db)
    sent: list[str] = []

    def count(conn, cursor, statement, parameters, context, executemany):  # noqa: ANN001, ANN202
        sent.append(statement)

    requests = [_request(member, 7, 250, f"k{member}") for member in range(1, 6)]
    event.listen(server.db.engine, "after_cursor_execute", count)
    try:
        results = server.db.run(lambda conn: book_many(conn, requests, lock_wait_ms=200, write_at_commit=True),
                                fold=True)
    finally:
        event.remove(server.db.engine, "after_cursor_execute", count)
    assert [r.balance_cents for r in results] == [MAX_LOW_BALANCE_LIMIT_CENTS + 9_750] * 5
    assert len(sent) == 3, [s[:80] for s in sent]
    assert sent[0].startswith("BEGIN; SET LOCAL lock_timeout = 200; SELECT")
    assert "FOR UPDATE" in sent[1]
    assert "INSERT INTO postings" in sent[2] and "INSERT INTO outbox_events" in sent[2]
    assert "INSERT INTO idempotency_keys" in sent[2] and sent[2].endswith("; COMMIT")
    after = snapshot(server.db)
    assert after.transactions == before.transactions + 5 and after.postings == before.postings + 10
    assert after.events == before.events + 5 and after.idempotency_records == before.idempotency_records + 5
    assert _open_transactions(server.db) == 0
    # the same requests again: answered from their records, nothing booked
    again = server.db.run(lambda conn: book_many(conn, requests, write_at_commit=True), fold=True)
    assert [type(r) for r in again] == [idempotency.Replayed] * 5
    assert snapshot(server.db) == after
    check_invariants(server.db)


def test_a_group_whose_last_write_fails_writes_nothing_and_leaves_no_transaction_open(server, admin):
    admin.upsert_organisation(7, "Club")
    admin.adjust(10_000, "opening", member_id=1)
    admin.adjust(10_000, "opening", member_id=2)
    requests = [_request(1, 7, 100, "first"), _request(2, 7, 100, "taken")]
    # the second key's record appears between the lookup and the write (another process booked it)
    server.db.run(lambda conn: book_many(conn, [_request(2, 7, 100, "taken")]))
    before = snapshot(server.db)

    def unit(conn):  # noqa: ANN001, ANN202
        outcomes = [request.plan(conn) for request in requests]
        booked = ledger.post(conn, outcomes, write_at_commit=True)
        for request, done in zip(requests, booked, strict=True):
            request.pending.record(conn, request.finish(conn, done))

    with pytest.raises(IntegrityError):
        server.db.run(unit, fold=True, retries=0)
    assert snapshot(server.db) == before, "the bookings went with the write that failed"
    assert _open_transactions(server.db) == 0
    assert app_balance(server, 1) == 10_000
    check_invariants(server.db)


def app_balance(server, member: int) -> int:  # noqa: ANN001
    return server.db.read(lambda conn: ledger.balance_of(conn, member_account(member)))


def test_a_write_that_would_miss_a_balance_is_refused_by_the_statement_itself(server, admin):
    admin.upsert_organisation(7, "Club")
    admin.adjust(1_000, "opening", member_id=1)
    before = snapshot(server.db)

    def unit(conn):  # noqa: ANN001, ANN202
        request = _request(1, 7, 100, "k")
        (done,) = ledger.post(conn, [request.plan(conn)], write_at_commit=True)
        rows = ledger.unit_state(conn)[ledger._MONEY]
        rows.balances[member_account(999_999)] = (5, done.created_at.isoformat())  # no such account

    with pytest.raises(DBAPIError, match="ledger write refused"):
        server.db.run(unit, fold=True, retries=0)
    assert snapshot(server.db) == before
    assert _open_transactions(server.db) == 0
    with server.db.engine.connect() as conn:
        assert conn.execute(text("SELECT ledger_expect(true, 'fine')")).scalar_one() is True


def test_on_loop_waits_for_the_database_on_the_loop(server):
    """While a unit waits for PostgreSQL (pg_sleep), the event loop goes on with other work."""
    green.install()
    in_flight = {"now": False, "ticks_meanwhile": 0}

    def unit(conn):  # noqa: ANN001, ANN202
        in_flight["now"] = True
        try:
            return conn.exec_driver_sql("SELECT pg_sleep(0.3), 42").one()[1]
        finally:
            in_flight["now"] = False

    async def tick() -> None:
        while True:
            if in_flight["now"]:
                in_flight["ticks_meanwhile"] += 1
            await asyncio.sleep(0.01)

    async def main() -> int:
        ticker = asyncio.create_task(tick())
        try:
            return await green.on_loop(lambda: server.db.run(unit))
        finally:
            ticker.cancel()

    assert asyncio.run(main()) == 42
    assert in_flight["ticks_meanwhile"] > 0, "the loop was held up while the statement ran"
