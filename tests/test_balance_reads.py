"""GetBalance on PostgreSQL, read on the event loop with the other balances asked for at once: it
answers exactly what the database-thread read answers, for every kind of account; an unregistered
organisation is NOT_FOUND; calls that arrive together share a statement; and a broken connection
costs no answer."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import grpc
import pytest

from server.domain.errors import NotFound
from server.domain.types import AutoTopUpStatus, SystemAccount, member_account, organisation_account, system_account
from server.ledger import balance_reads
from server.ledger.loop_connection import LoopConnection
from server.services import accounts

pytestmark = pytest.mark.postgres


@pytest.fixture
def server(pg_server):  # noqa: ANN001, ANN201 - PostgreSQL alone
    return pg_server


@pytest.fixture
def ledger(server) -> None:  # noqa: ANN001
    """Member 1 funded with a card (auto top-up on), member 2 with a card and no account yet, member 3
    with neither; club 7 registered and paid; club 8 not registered."""
    with server.client("admin") as admin, server.client("app") as app:
        admin.upsert_organisation(7, "North Shore Bridge Club")
        admin.upsert_member(1, "Ada")
        admin.adjust(10_000, "opening", member_id=1)
        app.pay(1, 2_500, organisation_id=7, description="entry")
    with server.db.engine.begin() as conn:
        for member, status, cents in ((1, AutoTopUpStatus.ON, 5_000), (2, AutoTopUpStatus.OFF, 7_000)):
            conn.exec_driver_sql(
                "INSERT INTO member_cards (member_id, auto_top_up_status, auto_top_up_amount_cents, updated_at) "
                "VALUES (%s, %s, %s, %s)", (member, int(status), cents, datetime.now(UTC)))


ACCOUNTS = [member_account(1), member_account(2), member_account(3), organisation_account(7),
            system_account(SystemAccount.ADJUSTMENTS), organisation_account(8)]


def _thread_read(server, acct: int):  # noqa: ANN001, ANN202
    try:
        return server.db.read(lambda conn: accounts.get_balance(conn, acct))
    except NotFound as exc:
        return ("NotFound", exc.message)


def test_the_batched_read_answers_what_the_thread_read_answers(server, ledger) -> None:  # noqa: ANN001
    connection = LoopConnection(server.db)
    try:
        answers = asyncio.run(balance_reads.read_balances(connection, ACCOUNTS + ACCOUNTS[::-1]))
    finally:
        connection.close()
    as_compared = [("NotFound", a.message) if isinstance(a, NotFound) else a for a in answers]
    expected = [_thread_read(server, a) for a in ACCOUNTS + ACCOUNTS[::-1]]
    assert as_compared == expected
    by_account = dict(zip(ACCOUNTS, as_compared[:len(ACCOUNTS)], strict=True))
    assert by_account[member_account(1)].balance_cents == 7_500
    assert by_account[member_account(1)].auto_top_up_status == AutoTopUpStatus.ON
    assert by_account[member_account(2)].auto_top_up_amount_cents == 7_000 and by_account[member_account(2)].name == ""
    assert by_account[member_account(3)].auto_top_up_status == AutoTopUpStatus.OFF
    assert by_account[organisation_account(7)].balance_cents == 2_500
    assert by_account[system_account(SystemAccount.ADJUSTMENTS)].balance_cents == -10_000
    assert by_account[organisation_account(8)] == ("NotFound", "organisation 8 is not registered")


def test_get_balance_through_grpc_and_an_unregistered_club(server, ledger) -> None:  # noqa: ANN001
    with server.client("app") as app:
        ada = app.get_balance(member_id=1)
        assert (ada.balance_cents, ada.name, ada.auto_top_up_amount_cents) == (7_500, "Ada", 5_000)
        assert ada.last_movement_at.seconds > 0
        assert app.balance_cents(organisation_id=7) == 2_500
        with pytest.raises(grpc.RpcError) as err:
            app.get_balance(organisation_id=8)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "organisation 8 is not registered" in err.value.details()


def test_balances_asked_for_together_share_a_statement(server, ledger, monkeypatch) -> None:  # noqa: ANN001
    sizes: list[int] = []
    real = balance_reads.read_balances

    async def spy(connection, account_ids):  # noqa: ANN001, ANN202
        sizes.append(len(account_ids))
        await asyncio.sleep(0.005)  # a slower database: the next calls queue behind this read
        return await real(connection, account_ids)

    monkeypatch.setattr(balance_reads, "read_balances", spy)
    with server.client("app") as app, ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda i: app.balance_cents(member_id=1 if i % 2 else 3), range(160)))
    assert answers == [7_500 if i % 2 else 0 for i in range(160)]
    assert sum(sizes) == 160 and max(sizes) > 1, "balances asked for together shared a read"


def test_a_broken_read_connection_costs_no_answer_and_is_opened_again(server, ledger) -> None:  # noqa: ANN001
    with server.client("app") as app:
        assert app.balance_cents(member_id=1) == 7_500  # the reader's connection is open now
        conns = [c for c in _reader(server)._connections if c._conn is not None]
        assert conns, "the read went through the event-loop connection"
        with server.db.engine.connect() as conn:  # the database drops it, as a restart would
            conn.exec_driver_sql(f"SELECT pg_terminate_backend({conns[0]._conn.get_backend_pid()})")
        assert app.balance_cents(member_id=1) == 7_500  # answered through a database thread
        assert app.balance_cents(member_id=1) == 7_500  # and the connection is open again
    assert any(c._conn is not None and not c._conn.closed for c in _reader(server)._connections)


def _reader(server) -> balance_reads.BalanceReader:  # noqa: ANN001
    return server.server.servicer.balance_reader
