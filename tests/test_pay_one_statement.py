"""The common Pay (member → organisation) as one statement on PostgreSQL: it writes exactly what
the careful path writes, its stored answer is the response byte for byte, and whenever a decision
is needed on the way (short funds, a balance left below the low limit, an unknown organisation, a
repeated key) it changes nothing and the careful path answers."""

from __future__ import annotations

import grpc
import pytest
from conftest import _truncate_all
from ledger_invariants import check_invariants, snapshot
from sqlalchemy import select

from clients.payments_client import PaymentsClient
from cobalt.payments.v1 import payments_pb2 as pb
from server.domain.types import member_account, organisation_account
from server.ledger import idempotency, one_statement
from server.ledger.schema import idempotency_keys, outbox_events, postings, transactions
from server.services import pay

pytestmark = pytest.mark.postgres

MEMBER, ORG = 1, 7


@pytest.fixture
def server(postgresql_server):  # noqa: ANN001, ANN201
    _truncate_all(postgresql_server.db)
    return postgresql_server


@pytest.fixture
def app(server) -> PaymentsClient:  # noqa: ANN001
    with server.client("app") as c:
        yield c


@pytest.fixture
def admin(server) -> PaymentsClient:  # noqa: ANN001
    with server.client("admin") as c:
        yield c


@pytest.fixture
def one_statement_results(monkeypatch) -> list:  # noqa: ANN001
    """What each try of the one statement answered (a balance, or None: it changed nothing)."""
    seen: list = []
    real = one_statement.book_member_payments

    def spy(db, payments, default_low_limit_cents):  # noqa: ANN001, ANN202
        answers = real(db, payments, default_low_limit_cents)
        seen.extend(answers)
        return answers

    monkeypatch.setattr(one_statement, "book_member_payments", spy)
    return seen


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
