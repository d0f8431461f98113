"""Many clients at once on PostgreSQL: 16 threads × 200 Pays and Transfers over a few members and
one hot organisation, some members short of funds, some requests sent twice at the same moment
with the same key. Afterwards the ledger must hold: money conserved, no member or organisation
below zero, every balance equal to its postings, one booking per SUCCEEDED response, no lost
update, no ABORTED/deadlock. Replaying the whole run with the same keys books nothing more."""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

import grpc
import pytest
from conftest import AUTH_SPEC, TOKENS, _truncate_all, record_backend
from ledger_invariants import check_invariants, snapshot
from server_process import ServerProcess
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from clients.payments_client import PaymentsClient
from cobalt.payments.v1 import payments_pb2 as pb
from server.domain.types import member_account, organisation_account
from server.ledger.db import Database
from server.ledger.schema import transactions

pytestmark = pytest.mark.postgres

THREADS = 16
PER_THREAD = 200
HOT_ORG = 7
RICH = [1, 2, 3, 4]
SHORT = [5, 6]  # start with a few dollars: most of their payments fail
FUNDING = {1: 150_000, 2: 120_000, 3: 100_000, 4: 80_000, 5: 500, 6: 300}


@dataclass
class Op:
    method: str
    request: object
    role: str = "app"
    outcomes: list = field(default_factory=list)  # (status name, response or None)


def make_ops(rng: random.Random) -> list[Op]:
    members = RICH + SHORT
    ops = []
    for _ in range(THREADS * PER_THREAD):
        payer = rng.choice(members)
        amount = rng.randint(50, 900)
        roll = rng.random()
        key = uuid.uuid4().hex
        if roll < 0.35:
            ops.append(Op("Pay", pb.PayRequest(idempotency_key=key, member_id=payer, organisation_id=HOT_ORG,
                                               amount_cents=amount, description="entry", route_code="EVT")))
        elif roll < 0.5:
            other = rng.choice([m for m in members if m != payer])
            ops.append(Op("Pay", pb.PayRequest(idempotency_key=key, member_id=payer, other_member_id=other,
                                               amount_cents=amount, description="m2m")))
        elif roll < 0.9:
            req = pb.TransferRequest(idempotency_key=key, to_member_id=rng.choice([m for m in members if m != payer]),
                                     amount_cents=amount, description="transfer")
            getattr(req, "from").member_id = payer
            ops.append(Op("Transfer", req))
        else:  # the hot organisation pays a member out: it is debited as well as credited
            req = pb.TransferRequest(idempotency_key=key, to_member_id=payer, amount_cents=amount * 3,
                                     description="prize")
            getattr(req, "from").organisation_id = HOT_ORG
            ops.append(Op("Transfer", req, role="admin"))
    return ops


def run_concurrently(server, ops: list[Op], plan: list[list[int]]) -> None:  # noqa: ANN001
    barrier = threading.Barrier(len(plan))
    errors: list[BaseException] = []

    def worker(indexes: list[int]) -> None:
        try:
            with server.client("app") as app, server.client("admin") as admin:
                barrier.wait()
                for i in indexes:
                    op = ops[i]
                    client = admin if op.role == "admin" else app
                    try:
                        resp, call = client.call(op.method, op.request, with_call=True)
                        replayed = dict(call.trailing_metadata() or ()).get("idempotent-replay") == "true"
                        op.outcomes.append(("OK", resp, replayed))
                    except grpc.RpcError as err:
                        op.outcomes.append((err.code().name, err.details(), False))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(p,)) for p in plan]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors


def response_id(resp) -> str:  # noqa: ANN001
    return resp.payment_id if isinstance(resp, pb.PayResponse) else resp.transfer_id


def apply_effect(op: Op, balances: Counter) -> None:
    req = op.request
    if op.method == "Pay":
        payee = organisation_account(req.organisation_id) if req.HasField("organisation_id") \
            else member_account(req.other_member_id)
        balances[member_account(req.member_id)] -= req.amount_cents
        balances[payee] += req.amount_cents
    else:
        src = getattr(req, "from")
        source = member_account(src.member_id) if src.HasField("member_id") else organisation_account(src.organisation_id)
        balances[source] -= req.amount_cents
        balances[member_account(req.to_member_id)] += req.amount_cents


def deadlocks(db: Database) -> int:
    with db.engine.connect() as conn:
        conn.exec_driver_sql("SELECT pg_stat_clear_snapshot()")
        return conn.exec_driver_sql(
            "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()").scalar_one()


class PgServer:
    """`payments-server` in its own process (its own GIL, as in production) on the run's PostgreSQL."""

    def __init__(self, url: str):
        # Commits need not wait for the disk here: this test is about locking, not durability, and the
        # hot organisation's lock is held until commit, so the flush would dominate the test's time.
        fast = make_url(url).update_query_dict({"options": "-c synchronous_commit=off"})
        self.proc = ServerProcess(fast.render_as_string(hide_password=False), AUTH_SPEC,
                                  PAYMENTS_DB_THREADS="16", PAYMENTS_DB_POOL_SIZE="16").start()
        self.db = Database.from_url(url, pool_size=2)
        _truncate_all(self.db)  # after the server has migrated the database

    def client(self, role: str) -> PaymentsClient:
        return PaymentsClient(self.proc.target, TOKENS[role])

    def close(self) -> int:
        code = self.proc.stop()
        self.db.dispose()
        return code


@pytest.fixture
def pg(postgres_url):  # noqa: ANN001, ANN201
    srv = PgServer(postgres_url)
    yield srv
    assert srv.close() == 0
    record_backend("postgresql")


def test_many_clients_pay_and_transfer_on_postgresql(pg):
    rng = random.Random(20261126)
    with pg.client("admin") as admin:
        admin.upsert_organisation(HOT_ORG, "Hot Congress")
        for member_id, cents in FUNDING.items():
            admin.adjust(cents, "opening", member_id=member_id)
    start = snapshot(pg.db)
    expected = Counter(start.balances)
    deadlocks_before = deadlocks(pg.db)

    ops = make_ops(rng)
    plan = [list(range(t, len(ops), THREADS)) for t in range(THREADS)]
    duplicates = rng.sample(range(len(ops)), len(ops) // 20)  # the same request twice, at about the same time
    for i in duplicates:
        plan[(i % THREADS + 1) % THREADS].append(i)
        plan[(i % THREADS + 1) % THREADS].sort()
    run_concurrently(pg, ops, plan)

    codes = Counter(outcome[0] for op in ops for outcome in op.outcomes)
    assert set(codes) <= {"OK", "FAILED_PRECONDITION"}, f"no ABORTED, deadlock or internal error: {codes}"
    time.sleep(1)  # statistics reach pg_stat_database within about a second
    assert deadlocks(pg.db) == deadlocks_before, "PostgreSQL saw no deadlock (not even one retried away)"
    assert codes["OK"] > len(ops) // 2 and codes["FAILED_PRECONDITION"] > 0, codes

    succeeded = []
    for op in ops:
        oks = [o for o in op.outcomes if o[0] == "OK"]
        if not oks:
            continue
        ids = {response_id(o[1]) for o in oks}
        assert len(ids) == 1, "a key sent twice at once gets one booking and one answer"
        if len(oks) > 1:
            assert oks[0][1] == oks[1][1] and sum(o[2] for o in oks) == 1, "the second answer is the replay"
        succeeded.append(op)
        apply_effect(op, expected)

    check_invariants(pg.db)
    final = snapshot(pg.db)
    assert final.balances[organisation_account(HOT_ORG)] >= 0
    assert {k: v for k, v in final.balances.items() if v} == {k: v for k, v in expected.items() if v}, \
        "every balance is what the successful responses add up to: no lost update"
    with pg.db.engine.connect() as conn:
        per_payment = Counter(dict(conn.execute(
            select(transactions.c.payment_id, func.count()).where(transactions.c.type != "MANUAL_ADJUSTMENT")
            .group_by(transactions.c.payment_id)).all()))
    assert sorted(per_payment) == sorted(response_id(next(o[1] for o in op.outcomes if o[0] == "OK"))
                                         for op in succeeded)
    assert set(per_payment.values()) == {1}, "exactly one booked transaction per SUCCEEDED response"

    # Replay the whole run with the same keys. Drain every account first so that a request that
    # failed for want of funds fails again: nothing at all may be booked by the replay.
    with pg.client("admin") as admin:
        for acct, cents in final.balances.items():
            if cents and acct % 4 in (1, 2):
                kind = {"member_id": acct // 4} if acct % 4 == 1 else {"organisation_id": acct // 4}
                admin.adjust(-cents, "drain before replay", **kind)
    drained = snapshot(pg.db)
    first_outcomes = {i: list(op.outcomes) for i, op in enumerate(ops)}
    for op in ops:
        op.outcomes.clear()
    run_concurrently(pg, ops, [list(range(t, len(ops), THREADS)) for t in range(THREADS)])
    after_replay = snapshot(pg.db)
    assert after_replay == drained, "the replay booked nothing"
    for i, op in enumerate(ops):
        [(status, resp, replayed)] = op.outcomes
        first_ok = [o for o in first_outcomes[i] if o[0] == "OK"]
        if first_ok:
            assert (status, resp, replayed) == ("OK", first_ok[0][1], True)
        else:
            assert status == "FAILED_PRECONDITION"
    check_invariants(pg.db, negative_allowed=set())
