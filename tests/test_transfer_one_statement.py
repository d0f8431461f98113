"""The common Transfer (member → member) as one statement on PostgreSQL: it writes what the careful
path writes, its stored answer is the response byte for byte, and whenever a decision is needed on
the way (short funds, a payer left below the low limit, a payee's first account, a repeated key, an
account already in the statement) it changes nothing and the careful path answers."""

from __future__ import annotations

import asyncio
import random
import threading
import uuid

import grpc
import pytest
from conftest import record_answers
from ledger_invariants import check_invariants, snapshot
from sqlalchemy import select

from cobalt.payments.v1 import payments_pb2 as pb
from server.api.ledger_api import LedgerApi
from server.domain.types import PostingType, member_account
from server.ledger import idempotency, transfer_statement
from server.ledger.loop_connection import LoopConnection
from server.ledger.schema import accounts, idempotency_keys, outbox_events, postings, transactions
from server.services import transfer

pytestmark = pytest.mark.postgres


@pytest.fixture
def server(pg_server):  # noqa: ANN001, ANN201 - PostgreSQL alone
    return pg_server


@pytest.fixture
def statement_results(monkeypatch) -> list:  # noqa: ANN001
    """What each transfer sent to the one statement got: balances after, or None (it changed nothing)."""
    return record_answers(monkeypatch, transfer_statement, "book_member_transfers")


@pytest.fixture
def members(admin) -> None:  # noqa: ANN001
    for member, cents in ((1, 50_000), (2, 10_000), (3, 5_000), (4, 50_000), (5, 50_000)):
        admin.upsert_member(member, f"Member {member}")
        admin.adjust(cents, "opening", member_id=member)


def _rows(server, transfer_id: str) -> dict:  # noqa: ANN001
    with server.db.engine.connect() as conn:
        txn = conn.execute(select(transactions).where(transactions.c.payment_id == transfer_id)).one()
        legs = conn.execute(select(postings).where(postings.c.transaction_id == txn.id).order_by(postings.c.reference)).all()
        event = conn.execute(select(outbox_events).where(outbox_events.c.payment_id == transfer_id)).one()
    return {"transaction": txn, "postings": legs, "event": event}


def _comparable(rows: dict) -> dict:
    txn, event = rows["transaction"], rows["event"]
    return {
        "transaction": (txn.type, txn.description, txn.principal, txn.batch_id, txn.event_id, txn.session_id),
        "postings": [(p.account_id, p.amount_cents, p.counterparty_account_id, p.reference.rsplit("-", 1)[1], p.type,
                      p.description, p.event_id, p.session_id) for p in rows["postings"]],
        "event": (event.kind, event.member_id, event.organisation_id, event.other_member_id, event.amount_cents,
                  event.route_code, event.route_payload, event.reason, event.event_id, event.session_id),
    }


def _stored(server, key: str) -> bytes:  # noqa: ANN001
    with server.db.engine.connect() as conn:
        return bytes(conn.execute(select(idempotency_keys.c.response).where(idempotency_keys.c.key == key)).scalar_one())


def _transfer(app, from_member: int, to_member: int, cents: int, key: str | None = None,  # noqa: ANN001
              description: str = "") -> pb.TransferResponse:
    req = pb.TransferRequest(idempotency_key=key or uuid.uuid4().hex, to_member_id=to_member,
                             amount_cents=cents, description=description)
    getattr(req, "from").member_id = from_member
    return app.call("Transfer", req)


def test_one_statement_writes_what_the_careful_path_writes(server, app, members, statement_results,  # noqa: ANN001
                                                           monkeypatch):
    fast = _transfer(app, 1, 2, 1_250, "fast", "Table money")
    assert statement_results == [(48_750, 11_250)], "the Transfer was booked by the one statement"
    monkeypatch.setattr(transfer, "in_one_statement", lambda cmd: False)
    careful = _transfer(app, 1, 2, 1_250, "careful", "Table money")
    assert len(statement_results) == 1, "the second Transfer took the careful path"
    assert (fast.from_balance_cents, fast.to_balance_cents) == (48_750, 11_250)
    assert (careful.from_balance_cents, careful.to_balance_cents) == (47_500, 12_500)

    fast_rows, careful_rows = _rows(server, fast.transfer_id), _rows(server, careful.transfer_id)
    assert _comparable(fast_rows) == _comparable(careful_rows)
    txn, (payer_leg, payee_leg), event = fast_rows["transaction"], fast_rows["postings"], fast_rows["event"]
    assert txn.reference == fast.reference and payer_leg.reference == f"{fast.reference}-1"
    assert (payer_leg.account_id, payer_leg.amount_cents, payer_leg.balance_after_cents) == (member_account(1), -1_250, 48_750)
    assert (payee_leg.account_id, payee_leg.amount_cents, payee_leg.balance_after_cents) == (member_account(2), 1_250, 11_250)
    assert payer_leg.created_at == payee_leg.created_at == txn.created_at, "one time, read after both row locks"
    assert (event.kind, event.member_id, event.other_member_id, event.balance_cents, event.reference) == (
        "TRANSFER_RECEIVED", 2, 1, 11_250, fast.reference)
    assert _stored(server, "fast") == fast.SerializeToString(deterministic=True)
    assert _stored(server, "careful") == careful.SerializeToString(deterministic=True)
    # no description: the transaction is described by its kind, on either path
    plain = _transfer(app, 4, 5, 100, "plain")
    assert _rows(server, plain.transfer_id)["transaction"].description == PostingType.MEMBER_TRANSFER.display_name
    check_invariants(server.db)


def test_a_repeated_key_gets_the_stored_answer_and_books_nothing_more(server, app, members, statement_results):  # noqa: ANN001
    first = _transfer(app, 1, 2, 700, "k1")
    before = snapshot(server.db)
    req = pb.TransferRequest(idempotency_key="k1", to_member_id=2, amount_cents=700)
    getattr(req, "from").member_id = 1
    again, call = app.call("Transfer", req, with_call=True)
    assert again == first
    assert dict(call.trailing_metadata()).get("idempotent-replay") == "true"
    assert statement_results == [(49_300, 10_700), None], "the repeat changed nothing in the one statement"
    assert snapshot(server.db) == before
    with pytest.raises(grpc.RpcError) as err:
        _transfer(app, 1, 2, 701, "k1")
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert snapshot(server.db) == before


def test_short_funds_a_low_balance_and_a_payees_first_account_take_the_careful_path(  # noqa: ANN001
        server, app, admin, members, statement_results):
    before = snapshot(server.db)
    with pytest.raises(grpc.RpcError) as err:
        _transfer(app, 3, 1, 5_001)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert statement_results == [None] and snapshot(server.db) == before
    # the default low limit is $20: leaving member 3 at $15 is the careful path, with its event
    low = _transfer(app, 3, 1, 3_500)
    assert statement_results[-1] is None and low.from_balance_cents == 1_500
    with server.db.engine.connect() as conn:
        kinds = conn.execute(select(outbox_events.c.kind).order_by(outbox_events.c.sequence)).scalars().all()
    assert kinds[-2:] == ["TRANSFER_RECEIVED", "LOW_BALANCE"]
    # member 9 has no account yet: the careful path opens it; the next transfer to it is the statement
    with server.db.engine.connect() as conn:
        assert conn.execute(select(accounts.c.id).where(accounts.c.id == member_account(9))).first() is None
    first = _transfer(app, 1, 9, 400)
    second = _transfer(app, 1, 9, 600)
    assert statement_results[-2] is None and statement_results[-1] == (second.from_balance_cents, 1_000)
    assert (first.to_balance_cents, second.to_balance_cents) == (400, 1_000)
    check_invariants(server.db)


def _member_transfer(from_member: int, to_member: int, cents: int, key: str) -> transfer_statement.MemberTransfer:
    cmd = transfer.TransferCommand(principal="app", is_admin=False, to_member_id=to_member, amount_cents=cents,
                                   description=f"transfer {key}", from_member_id=from_member).validated()
    return transfer.member_transfer(cmd, idempotency.Pending("app", key, "Transfer", f"hash-{key}"),
                                    LedgerApi.transfer_response)


def test_a_batch_books_each_account_once_and_leaves_the_rest_to_the_careful_path(server, members):  # noqa: ANN001
    batcher = transfer_statement.TransferBatcher(server.db, 2_000)
    items = [_member_transfer(1, 2, 100, "a"), _member_transfer(4, 5, 200, "b"),
             _member_transfer(2, 3, 300, "c"),  # member 2 is already in the statement
             _member_transfer(5, 1, 400, "d")]  # both already in it
    try:
        answers = asyncio.run(batcher._run(batcher._connections[0], items))
    finally:
        batcher.close()
    assert answers == [(49_900, 10_100), (49_800, 50_200), None, None]
    with server.db.engine.connect() as conn:
        assert conn.execute(select(idempotency_keys.c.key).where(idempotency_keys.c.method == "Transfer")
                            .order_by(idempotency_keys.c.key)).scalars().all() == ["a", "b"]
    check_invariants(server.db)


def test_a_statement_that_cannot_be_completed_changes_nothing(server, members) -> None:  # noqa: ANN001
    connection = LoopConnection(server.db)
    items = [_member_transfer(1, 2, 100, "x"), _member_transfer(4, 5, 200, "x")]  # one key twice
    before = snapshot(server.db)
    try:
        assert asyncio.run(transfer_statement.book_member_transfers(connection, items, 2_000)) == [None, None]
    finally:
        connection.close()
    assert snapshot(server.db) == before


def test_concurrent_transfers_share_statements_and_keep_the_ledger(server, admin, monkeypatch) -> None:  # noqa: ANN001
    people = list(range(10, 30))
    for member in people:
        admin.upsert_member(member, f"Member {member}")
        admin.adjust(50_000, "opening", member_id=member)
    sizes: list[int] = []
    real = transfer_statement.book_member_transfers

    async def spy(connection, transfers, default_low_limit_cents):  # noqa: ANN001, ANN202
        sizes.append(len(transfers))
        return await real(connection, transfers, default_low_limit_cents)

    monkeypatch.setattr(transfer_statement, "book_member_transfers", spy)
    answers: list = []
    errors: list = []

    def run(seed: int) -> None:
        rng = random.Random(seed)
        with server.client("app") as client:
            for i in range(20):
                a, b = rng.sample(people, 2)
                try:
                    answers.append(_transfer(client, a, b, rng.randint(1, 300), f"t{seed}-{i}"))
                except grpc.RpcError as exc:
                    errors.append(exc)

    threads = [threading.Thread(target=run, args=(s,)) for s in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[:3]
    assert len(answers) == 12 * 20
    assert sum(sizes) > 0 and max(sizes) > 1, "transfers that arrived together shared a statement"
    check_invariants(server.db)
    with server.db.engine.connect() as conn:
        after = {(r.payment_id, r.amount_cents < 0): r.balance_after_cents
                 for r in conn.execute(select(postings.c.payment_id, postings.c.amount_cents, postings.c.balance_after_cents))}
    assert all(after[(a.transfer_id, True)] == a.from_balance_cents and after[(a.transfer_id, False)] == a.to_balance_cents
               for a in answers), "each answer is its booking"
