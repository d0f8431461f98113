"""The common Pay (member → organisation) as one statement on PostgreSQL: it writes exactly what
the careful path writes, its stored answer is the response byte for byte, and whenever a decision
is needed on the way (short funds, a balance left below the low limit, an unknown organisation, a
repeated key) it changes nothing and the careful path answers."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest
from conftest import record_answers
from ledger_invariants import check_invariants, snapshot
from sqlalchemy import select

from cobalt.payments.v1 import payments_pb2 as pb
from server.api.ledger_api import LedgerApi
from server.domain.types import PostingType, member_account, organisation_account
from server.ledger import idempotency, one_statement
from server.ledger.schema import idempotency_keys, outbox_events, postings, transactions
from server.services import pay

pytestmark = pytest.mark.postgres

MEMBER, ORG = 1, 7


@pytest.fixture
def server(pg_server):  # noqa: ANN001, ANN201 - PostgreSQL alone
    return pg_server


@pytest.fixture
def one_statement_results(monkeypatch) -> list:  # noqa: ANN001
    """What each try of the one statement answered (a balance, or None: it changed nothing)."""
    return record_answers(monkeypatch, one_statement, "book_member_payments")


@pytest.fixture
def funded(admin) -> None:  # noqa: ANN001
    admin.upsert_organisation(ORG, "North Shore Bridge Club")
    admin.upsert_member(MEMBER, "Ada")
    admin.adjust(100_000, "opening", member_id=MEMBER)


def _rows(server, payment_id: str) -> dict:  # noqa: ANN001
    with server.db.engine.connect() as conn:
        txn = conn.execute(select(transactions).where(transactions.c.payment_id == payment_id)).one()
        legs = conn.execute(select(postings).where(postings.c.transaction_id == txn.id).order_by(postings.c.reference)).all()
        event = conn.execute(select(outbox_events).where(outbox_events.c.payment_id == payment_id)).one()
    return {"transaction": txn, "postings": legs, "event": event}


def _comparable(rows: dict) -> dict:
    """What must be the same whichever path booked it (ids, references and times differ)."""
    txn = rows["transaction"]
    return {
        "transaction": (txn.type, txn.description, txn.principal, txn.batch_id, txn.event_id, txn.session_id),
        "postings": [(p.account_id, p.amount_cents, p.counterparty_account_id, p.reference.rsplit("-", 1)[1], p.type,
                      p.description, p.event_id, p.session_id) for p in rows["postings"]],
        "event": (rows["event"].kind, rows["event"].member_id, rows["event"].organisation_id,
                  rows["event"].other_member_id, rows["event"].amount_cents, rows["event"].route_code,
                  rows["event"].route_payload, rows["event"].event_id, rows["event"].session_id),
    }


def _stored(server, key: str) -> bytes:  # noqa: ANN001
    with server.db.engine.connect() as conn:
        return bytes(conn.execute(select(idempotency_keys.c.response).where(idempotency_keys.c.key == key)).scalar_one())


def test_one_statement_writes_what_the_careful_path_writes(server, app, funded, one_statement_results, monkeypatch):  # noqa: ANN001
    args = dict(organisation_id=ORG, description="Congress entry", route_code="EVT", route_payload='{"table": 3}',
                event_id=12, session_id=34)
    fast = app.pay(MEMBER, 1_250, idempotency_key="fast", **args)
    assert one_statement_results == [100_000 - 1_250], "the Pay was booked by the one statement"
    monkeypatch.setattr(pay, "in_one_statement", lambda cmd: False)
    careful = app.pay(MEMBER, 1_250, idempotency_key="careful", **args)
    assert len(one_statement_results) == 1, "the second Pay took the careful path"
    assert (fast.status, fast.balance_cents, careful.balance_cents) == (pb.SUCCEEDED, 98_750, 97_500)

    fast_rows, careful_rows = _rows(server, fast.payment_id), _rows(server, careful.payment_id)
    assert _comparable(fast_rows) == _comparable(careful_rows)
    txn, (member_leg, org_leg), event = fast_rows["transaction"], fast_rows["postings"], fast_rows["event"]
    assert txn.reference == fast.reference and member_leg.reference == f"{fast.reference}-1"
    assert (member_leg.account_id, member_leg.amount_cents, member_leg.balance_after_cents) == (
        member_account(MEMBER), -1_250, 98_750)
    assert (org_leg.account_id, org_leg.amount_cents, org_leg.balance_after_cents) == (organisation_account(ORG), 1_250, 1_250)
    assert member_leg.created_at == org_leg.created_at == txn.created_at, "one time, read after both row locks"
    assert (event.balance_cents, event.reference) == (98_750, fast.reference)
    # the stored answer is the response, byte for byte, on either path
    assert _stored(server, "fast") == fast.SerializeToString(deterministic=True)
    assert _stored(server, "careful") == careful.SerializeToString(deterministic=True)
    assert app.balance_cents(organisation_id=ORG) == 2_500
    check_invariants(server.db)


def test_a_repeated_key_gets_the_stored_answer_and_books_nothing_more(server, app, funded, one_statement_results):  # noqa: ANN001
    first = app.pay(MEMBER, 700, organisation_id=ORG, idempotency_key="k1")
    before = snapshot(server.db)
    again, call = app.call("Pay", pb.PayRequest(idempotency_key="k1", member_id=MEMBER, organisation_id=ORG,
                                                amount_cents=700), with_call=True)
    assert again == first
    assert dict(call.trailing_metadata()).get("idempotent-replay") == "true"
    assert one_statement_results == [99_300, None], "the repeat changed nothing in the one statement"
    assert snapshot(server.db) == before
    with pytest.raises(grpc.RpcError) as err:
        app.pay(MEMBER, 701, organisation_id=ORG, idempotency_key="k1")
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert snapshot(server.db) == before


def test_a_balance_left_below_the_low_limit_takes_the_careful_path(server, app, admin, funded,  # noqa: ANN001
                                                                   one_statement_results):
    # the default low limit is $20: paying down to $25 is the one statement, to $15 the careful path
    app.pay(MEMBER, 100_000 - 2_500, organisation_id=ORG)
    low = app.pay(MEMBER, 1_000, organisation_id=ORG)
    assert one_statement_results == [2_500, None]
    assert low.balance_cents == 1_500
    with server.db.engine.connect() as conn:
        kinds = conn.execute(select(outbox_events.c.kind).order_by(outbox_events.c.sequence)).scalars().all()
    assert kinds[-2:] == ["PAYMENT_SUCCEEDED", "LOW_BALANCE"]
    # the statement reads the current limit: raised to $30, a Pay leaving $14 is low as well
    admin.set_fee_settings(low_balance_limit_cents=3_000)
    app.pay(MEMBER, 100, organisation_id=ORG)
    assert one_statement_results[-1] is None
    with server.db.engine.connect() as conn:
        assert conn.execute(select(outbox_events.c.kind).order_by(outbox_events.c.sequence.desc())).scalars().first() \
            == "LOW_BALANCE"
    check_invariants(server.db)


def test_short_funds_and_an_unknown_organisation_change_nothing(server, app, funded, one_statement_results):  # noqa: ANN001
    before = snapshot(server.db)
    with pytest.raises(grpc.RpcError) as err:
        app.pay(MEMBER, 1_000, organisation_id=ORG + 1)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND, "the member was debited in the statement, which then failed"
    with pytest.raises(grpc.RpcError) as err:
        app.pay(MEMBER, 100_001, organisation_id=ORG)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert one_statement_results == [None, None]
    assert snapshot(server.db) == before
    with server.db.engine.connect() as conn:
        assert conn.execute(select(idempotency_keys).where(idempotency_keys.c.method == "Pay")).all() == []


@pytest.mark.parametrize("value", [0, 1, 127, 128, 2_000, 16_383, 16_384, 2**21 - 1, 2**21, 2**28, 2**35 + 5,
                                   2**49 - 1, 2**56, 2**62 + 12_345, 2**63 - 1])
def test_the_statements_varint_is_protobufs(server, value):  # noqa: ANN001
    with server.db.engine.connect() as conn:
        encoded = conn.exec_driver_sql(
            f"SELECT {one_statement._VARINT_OF_BALANCE} FROM (SELECT CAST(%(v)s AS bigint) AS balance_cents) AS d",
            {"v": value}).scalar_one()
    assert bytes(encoded) == idempotency._varint(value)
    if value:  # protobuf leaves a zero out
        assert bytes(encoded) == pb.PayResponse(balance_cents=value).SerializeToString()[1:]


@pytest.mark.parametrize("balance", [1, 2_000, 16_384, 2**40, 2**63 - 1])
def test_response_around_splits_the_serialisation_at_the_field(balance):  # noqa: ANN001
    response = pb.PayResponse(status=pb.SUCCEEDED, payment_id="pay_1", balance_cents=balance,
                              reference="PAY-AAAA-BBBB-CCCC")
    head, tail = idempotency.response_around(response, "balance_cents")
    assert head + idempotency._varint(balance) + tail == response.SerializeToString(deterministic=True)


# ---------------------------------------------------------------- several payments in one statement
def _payment(member_id: int, org_id: int, amount_cents: int, key: str,
             principal: str = "app") -> one_statement.MemberPayment:
    cmd = pay.PayCommand(principal=principal, member_id=member_id, amount_cents=amount_cents, organisation_id=org_id,
                         other_member_id=None, description=f"entry {key}", payment_type=PostingType.ENTRY_TO_EVENT,
                         route_code="EVT").validated()
    record = idempotency.Pending(principal, key, "Pay", f"hash-{key}")
    return pay.member_payment(cmd, record, LedgerApi.pay_response)


def _book_in_one_statement(db, payments: list) -> list:  # noqa: ANN001
    """One statement on a connection of its own, on an event loop of its own."""
    connection = one_statement.LoopConnection(db)
    try:
        return asyncio.run(one_statement.book_member_payments(connection, payments, 2_000))
    finally:
        connection.close()


@pytest.fixture
def members_and_clubs(admin) -> None:  # noqa: ANN001
    for org in (7, 8):
        admin.upsert_organisation(org, f"Club {org}")
    for member, cents in ((1, 50_000), (2, 50_000), (3, 2_500), (4, 50_000), (5, 50_000)):
        admin.upsert_member(member, f"Member {member}")
        admin.adjust(cents, "opening", member_id=member)


def test_one_statement_books_several_payments_to_several_clubs(server, members_and_clubs):  # noqa: ANN001
    batch = [_payment(1, 7, 1_000, "a"), _payment(2, 8, 2_000, "b"), _payment(1, 7, 500, "c"),  # member 1 again
             _payment(3, 7, 1_000, "d"),  # would leave $15, below the $20 limit
             _payment(4, 7, 3_000, "e"), _payment(5, 7, 700, "f")]
    balances = _book_in_one_statement(server.db, batch)
    assert balances == [49_000, 48_000, None, None, 47_000, 49_300], "the first of a member's payments is taken"
    check_invariants(server.db)  # includes each account's balance-after chain in statement order
    with server.db.engine.connect() as conn:
        club7 = conn.execute(select(postings.c.reference, postings.c.amount_cents, postings.c.balance_after_cents)
                             .where(postings.c.account_id == organisation_account(7))
                             .order_by(postings.c.created_at, postings.c.id)).all()
        n_events = len(conn.execute(select(outbox_events.c.sequence).where(outbox_events.c.kind == "PAYMENT_SUCCEEDED")).all())
    assert [(ref.rsplit("-", 1)[0], amount, after) for ref, amount, after in club7] == [
        (batch[0].reference, 1_000, 1_000), (batch[4].reference, 3_000, 4_000), (batch[5].reference, 700, 4_700)]
    assert n_events == 4
    for payment, balance in zip(batch, balances, strict=True):
        if balance is None:
            continue
        expected = pb.PayResponse(status=pb.SUCCEEDED, payment_id=payment.payment_id, balance_cents=balance,
                                  reference=payment.reference)
        assert _stored(server, payment.record_key) == expected.SerializeToString(deterministic=True)


def test_text_of_every_kind_arrives_as_it_was_sent(server, members_and_clubs):  # noqa: ANN001
    """The payments of a statement travel as one JSON document: quotes, backslashes, percent signs,
    accents, emoji and JSON-looking payloads must arrive exactly as sent, on every row."""
    texts = ['Entry "A" \\ 100%', "Café — Zoë's table", "\U0001f0cf Bridge night ♠♥", '{"table": 3, "x": "\\u0041"}']
    batch = []
    for i, (member, text) in enumerate(zip((1, 2, 4, 5), texts, strict=True)):
        cmd = pay.PayCommand(principal="app", member_id=member, amount_cents=100 + i, organisation_id=7,
                             other_member_id=None, description=text, payment_type=PostingType.ENTRY_TO_EVENT,
                             route_code=f"R{i}", route_payload=text).validated()
        batch.append(pay.member_payment(cmd, idempotency.Pending("app", f"text-{i}", "Pay", f"h{i}"),
                                        LedgerApi.pay_response))
    assert None not in _book_in_one_statement(server.db, batch)
    for payment in batch:
        rows = _rows(server, payment.payment_id)
        assert rows["transaction"].description == payment.description
        assert {p.description for p in rows["postings"]} == {payment.description}
        assert (rows["event"].route_code, rows["event"].route_payload) == (payment.route_code, payment.route_payload)
    check_invariants(server.db)


@pytest.mark.parametrize("spoiler", ["unknown club", "key used before"])
def test_one_failing_payment_fails_the_whole_statement(server, app, members_and_clubs, spoiler):  # noqa: ANN001
    app.pay(4, 100, organisation_id=8, idempotency_key="used")  # a record under key "used"
    before = snapshot(server.db)
    with server.db.engine.connect() as conn:
        caller = conn.execute(select(idempotency_keys.c.principal).where(idempotency_keys.c.key == "used")).scalar_one()
    bad = _payment(2, 9, 1_000, "x") if spoiler == "unknown club" else _payment(2, 8, 1_000, "used", caller)
    balances = _book_in_one_statement(server.db, [_payment(1, 7, 1_000, "ok"), bad])
    assert balances == [None, None]
    assert snapshot(server.db) == before


def test_concurrent_pays_share_statements_and_keep_the_ledger(server, members_and_clubs, one_statement_results,  # noqa: ANN001
                                                               monkeypatch):
    sizes: list[int] = []
    real = one_statement.book_member_payments

    async def sized(connection, payments, default_low_limit_cents):  # noqa: ANN001, ANN202
        sizes.append(len(payments))
        return await real(connection, payments, default_low_limit_cents)

    monkeypatch.setattr(one_statement, "book_member_payments", sized)
    answers: list = []
    errors: list = []

    def payer(thread: int) -> None:
        with server.client("app") as client:
            for i in range(25):
                member, org = (1, 2, 4)[(thread + i) % 3], (7, 8)[i % 2]
                try:
                    answers.append((member, client.pay(member, 10 + thread, organisation_id=org)))
                except grpc.RpcError as exc:
                    errors.append(exc)

    threads = [threading.Thread(target=payer, args=(t,)) for t in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(answers) == 16 * 25
    assert max(sizes) > 1, "payments that arrived together shared a statement"
    check_invariants(server.db)
    with server.db.engine.connect() as conn:
        after = dict(conn.execute(select(postings.c.payment_id, postings.c.balance_after_cents)
                                  .where(postings.c.amount_cents < 0)).all())
    assert all(after[resp.payment_id] == resp.balance_cents for _, resp in answers), "each answer is its booking"


def test_a_broken_statement_connection_is_opened_again(server, members_and_clubs):  # noqa: ANN001
    connection = one_statement.LoopConnection(server.db)

    async def scenario() -> list:
        first = await one_statement.book_member_payments(connection, [_payment(1, 7, 100, "before")], 2_000)
        with server.db.engine.connect() as conn:  # the database drops the connection, as a restart would
            conn.exec_driver_sql(f"SELECT pg_terminate_backend({connection._conn.get_backend_pid()})")
        before = snapshot(server.db)
        broken = await one_statement.book_member_payments(connection, [_payment(1, 7, 200, "during")], 2_000)
        unchanged = snapshot(server.db) == before
        after = await one_statement.book_member_payments(connection, [_payment(1, 7, 300, "after")], 2_000)
        return [first, broken, unchanged, after]

    try:
        assert asyncio.run(scenario()) == [[49_900], [None], True, [49_600]]
    finally:
        connection.close()
    check_invariants(server.db)


def test_a_row_lock_held_elsewhere_does_not_hold_up_the_other_pays(server, members_and_clubs,  # noqa: ANN001
                                                                    one_statement_results):
    blocker = server.db.engine.raw_connection()  # a long transaction holding member 1's row
    cur = blocker.cursor()
    cur.execute("BEGIN")
    cur.execute(f"UPDATE accounts SET balance_cents = balance_cents WHERE id = {member_account(1)}")
    outcome: dict = {}

    def pay_member_1() -> None:
        with server.client("app") as client:
            outcome["member 1"] = client.pay(1, 100, organisation_id=7)

    waiting = threading.Thread(target=pay_member_1)
    try:
        waiting.start()
        time.sleep(0.1)  # its statement is in flight, waiting for the lock
        started = time.monotonic()
        with server.client("app") as client:
            other = client.call("Pay", pb.PayRequest(idempotency_key="other", member_id=2, organisation_id=7,
                                                     amount_cents=100))
        assert time.monotonic() - started < 2, "the other Pay waited for the lock only as long as the lock timeout"
        assert other.status == pb.SUCCEEDED and other.balance_cents == 49_900
        assert waiting.is_alive(), "member 1's Pay waits for its row on the careful path"
    finally:
        cur.execute("ROLLBACK")
        blocker.close()
        waiting.join(30)
    assert outcome["member 1"].balance_cents == 49_900
    assert None in one_statement_results, "the statement that met the lock gave up and changed nothing"
    check_invariants(server.db)
