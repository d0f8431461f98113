"""Two `payments-server` processes on one PostgreSQL database (SPEC §6): a subscriber on either
receives, in order and without gaps, every event committed through both, even while writers commit
out of sequence order; after one process is killed mid-stream, resuming on the other from the last
sequence seen completes the stream."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from conftest import AUTH_SPEC, TOKENS, record_backend
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import create_engine, func, select

from clients.payments_client import PaymentsClient
from cobalt.payments.v1 import payments_pb2 as pb
from server.domain.types import EventKind
from server.events.outbox import NewEvent, emit
from server.ledger.db import Database, run_before_commit
from server.ledger.schema import outbox_events

pytestmark = pytest.mark.postgres

ROOT = Path(__file__).resolve().parent.parent
SERVER_BIN = ROOT / ".venv" / "bin" / "payments-server"
MEMBERS = range(101, 121)


class ServerProcess:
    def __init__(self, database_url: str, log_path: Path):
        env = dict(os.environ, PAYMENTS_DATABASE_URL=database_url, PAYMENTS_GRPC_ADDR="127.0.0.1:0",
                   PAYMENTS_AUTH_TOKENS=AUTH_SPEC, PAYMENTS_DB_POOL_SIZE="4", PAYMENTS_DB_THREADS="6",
                   PAYMENTS_SHUTDOWN_GRACE_S="1",
                   # no fallback poll within the test: events from the other process arrive by NOTIFY
                   PAYMENTS_EVENT_POLL_INTERVAL_MS="120000")
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        binary = [str(SERVER_BIN)] if SERVER_BIN.exists() else [sys.executable, "-m", "server"]
        self.proc = subprocess.Popen(binary, env=env, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT)
        self.target = ""

    def wait_serving(self, timeout_s: float = 30) -> str:
        import json

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log_path.read_text()[-2000:]
            for line in self.log_path.read_text().splitlines():
                if '"serving"' in line:
                    self.target = f"127.0.0.1:{json.loads(line)['port']}"
                    with grpc.insecure_channel(self.target) as ch:
                        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
                        assert health.status == health_pb2.HealthCheckResponse.SERVING
                    return self.target
            time.sleep(0.05)
        raise AssertionError("server did not start: " + self.log_path.read_text()[-2000:])

    def client(self, role: str = "app") -> PaymentsClient:
        return PaymentsClient(self.target, TOKENS[role])

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


class StreamReader:
    """Reads one Subscribe stream on a thread, recording sequences and the error that ended it."""

    def __init__(self, client: PaymentsClient, after_sequence: int):
        self.sequences: list[int] = []
        self.payment_ids: set[str] = set()
        self.error: grpc.RpcError | None = None
        self._call = client.stream("Subscribe", pb.SubscribeRequest(after_sequence=after_sequence), timeout_s=120)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for ev in self._call:
                self.sequences.append(ev.sequence)
                self.payment_ids.add(ev.payment_id)
        except grpc.RpcError as exc:
            self.error = exc

    def wait_until(self, through: int, timeout_s: float = 20) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and (not self.sequences or self.sequences[-1] < through):
            if self.error is not None:
                return
            time.sleep(0.02)

    def close(self) -> None:
        self._call.cancel()
        self.thread.join(5)


def outbox_after(engine, after: int) -> list[int]:  # noqa: ANN001
    with engine.connect() as conn:
        return list(conn.execute(select(outbox_events.c.sequence).where(outbox_events.c.sequence > after)
                                 .order_by(outbox_events.c.sequence)).scalars())


def newest(engine) -> int:  # noqa: ANN001
    with engine.connect() as conn:
        return conn.execute(select(func.coalesce(func.max(outbox_events.c.sequence), 0))).scalar_one()


def pay_many(server: ServerProcess, count: int, seed: int, payment_ids: list[str],
             more: Callable[[], bool] = lambda: False) -> None:
    """`count` Pays, and more (up to ten times as many) while `more()` says so."""
    rnd = random.Random(seed)
    with server.client() as app:
        done = 0
        while done < count or (more() and done < 10 * count):
            done += 1
            member = rnd.choice(MEMBERS)
            if rnd.random() < 0.3:
                other = rnd.choice([m for m in MEMBERS if m != member])
                resp = app.pay(member, rnd.randint(1, 50), other_member_id=other, route_code="M2M")
            else:
                resp = app.pay(member, rnd.randint(1, 50), organisation_id=7, route_code="EVT")
            payment_ids.append(resp.payment_id)


def slow_writers(engine, stop: threading.Event, held: list[int]) -> None:  # noqa: ANN001
    """Transactions that draw a sequence number, then wait while others commit higher ones."""
    db = Database(engine)

    def draw_then_wait(conn) -> None:  # noqa: ANN001
        emit(conn, NewEvent(EventKind.ADJUSTED, member_id=999, amount_cents=1, reason="slow writer"))
        run_before_commit(conn)  # the event row is written (its number drawn) now, not at the commit
        held.append(conn.execute(select(func.max(outbox_events.c.sequence))).scalar_one())
        time.sleep(0.15)

    while not stop.is_set():
        db.run(draw_then_wait)


def assert_no_gap(received: list[int], expected: list[int]) -> None:
    assert len(received) == len(set(received)), "a sequence was delivered twice in one stream"
    assert received == sorted(received), "out of order"
    missing = sorted(set(expected) - set(received))
    assert not missing, f"{len(missing)} events never delivered, e.g. {missing[:5]}"
    assert received == expected


def test_two_processes_deliver_everything_in_order_even_when_one_dies(postgres_url, tmp_path):
    engine = create_engine(postgres_url, pool_size=3)
    a = ServerProcess(postgres_url, tmp_path / "a.log")
    b = ServerProcess(postgres_url, tmp_path / "b.log")
    readers: list[StreamReader] = []
    try:
        a.wait_serving()
        b.wait_serving()
        with a.client("admin") as admin:
            admin.upsert_organisation(7, "Club")
            for m in MEMBERS:
                admin.adjust(1_000_000, "credit", member_id=m)

        # 1. concurrent Pays on both processes plus out-of-order committers; subscribers on both
        base = newest(engine)
        on_a = StreamReader(a.client(), base)
        on_b = StreamReader(b.client(), base)
        readers += [on_a, on_b]
        stop, held, via_a, via_b = threading.Event(), [], [], []
        slow = threading.Thread(target=slow_writers, args=(engine, stop, held), daemon=True)
        slow.start()
        with ThreadPoolExecutor(6) as pool:
            # pay at least until the slow writers held three numbers across others' commits
            jobs = [pool.submit(pay_many, srv, 15, seed, ids, lambda: len(held) < 3)
                    for seed, (srv, ids) in enumerate([(a, via_a), (a, via_a), (a, via_a),
                                                       (b, via_b), (b, via_b), (b, via_b)])]
            for job in jobs:
                job.result()
        stop.set()
        slow.join(10)
        expected = outbox_after(engine, base)
        on_a.wait_until(expected[-1])
        on_b.wait_until(expected[-1])
        assert on_a.error is None and on_b.error is None
        assert len(held) >= 3 and set(held) <= set(expected)
        assert_no_gap(on_a.sequences, expected)
        assert_no_gap(on_b.sequences, expected)
        assert set(via_b) <= on_a.payment_ids and set(via_a) <= on_b.payment_ids

        # 1b. writes through B alone reach A's subscriber promptly: only B's NOTIFY can wake A
        base = newest(engine)
        only_b: list[str] = []
        started = time.monotonic()
        pay_many(b, 5, 7, only_b)
        on_a.wait_until(outbox_after(engine, base)[-1], timeout_s=10)
        assert time.monotonic() - started < 10
        assert set(only_b) <= on_a.payment_ids
        assert_no_gap(on_a.sequences, outbox_after(engine, expected[0] - 1))

        # 2. kill B while its subscriber is mid-stream, resume on A from the last sequence seen
        base = newest(engine)
        victim = StreamReader(b.client(), base)
        readers.append(victim)
        payer = threading.Thread(target=pay_many, args=(a, 60, 99, []), daemon=True)
        payer.start()
        while len(victim.sequences) < 10 and victim.error is None:
            time.sleep(0.01)
        b.kill()
        victim.thread.join(10)
        assert victim.error is not None and victim.error.code() == grpc.StatusCode.UNAVAILABLE
        before_kill = list(victim.sequences)
        resumed = StreamReader(a.client(), before_kill[-1])
        readers.append(resumed)
        payer.join(60)
        expected = outbox_after(engine, base)
        resumed.wait_until(expected[-1])
        assert resumed.error is None
        assert_no_gap(resumed.sequences, [s for s in expected if s > before_kill[-1]])
        assert_no_gap(before_kill + resumed.sequences, expected)
    finally:
        for r in readers:
            r.close()
        a.stop()
        b.stop()
        engine.dispose()
        record_backend("postgresql")
