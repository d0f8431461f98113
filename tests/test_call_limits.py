"""Bounded load and deadlines (server.api.call_limits), health following the database
(server.health_monitor) and the lock timeout of pooled sessions."""

from __future__ import annotations

import asyncio
import socket
import time

import grpc
import pytest
from conftest import TOKENS, admin_postgres_url, start_server
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import create_engine, text

from cobalt.payments.v1 import payments_pb2 as pb
from server import deadlines
from server.api import call_limits
from server.api.call_limits import InFlight
from server.deadlines import DeadlineExceeded
from server.domain.errors import Aborted, Unavailable
from server.health_monitor import DatabaseProbe, HealthMonitor
from server.ledger.db import Database


class FakeContext:
    def __init__(self, remaining_s: float | None):
        self.remaining_s = remaining_s

    def time_remaining(self) -> float | None:
        return self.remaining_s


def in_new_context(fn):  # noqa: ANN001, ANN201 - the contextvar of one call, as each gRPC call has its own
    import contextvars

    return contextvars.copy_context().run(fn)


def test_in_flight_refuses_beyond_its_limit_and_frees_places() -> None:
    limit = InFlight(2)
    assert limit.try_enter() and limit.try_enter()
    assert not limit.try_enter()
    assert limit.refused == 1
    limit.leave()
    assert limit.try_enter()


def test_work_whose_deadline_passed_before_it_started_does_not_run() -> None:
    ran: list[str] = []

    def call(remaining_s: float | None, wait_s: float) -> None:
        deadlines.note(FakeContext(remaining_s))
        work = call_limits.guarded(lambda: ran.append("first"))
        later = call_limits.guarded(lambda: ran.append("later"))
        time.sleep(wait_s)  # the wait for a database thread
        try:
            work()
        finally:
            later()  # the call's later work (say, closing what it opened) is not cut off

    in_new_context(lambda: call(1.0, 0))
    assert ran == ["first", "later"]
    ran.clear()
    with pytest.raises(DeadlineExceeded) as caught:
        in_new_context(lambda: call(0.01, 0.03))
    assert caught.value.code == "DEADLINE_EXCEEDED" and "nothing was booked" in caught.value.message
    assert ran == ["later"]
    ran.clear()
    in_new_context(lambda: call(None, 0.01))  # no deadline: no limit
    assert ran == ["first", "later"]


def test_no_database_work_starts_once_the_shutdown_closed_it() -> None:
    call_limits.close_database_work()
    try:
        with pytest.raises(Unavailable):
            in_new_context(lambda: call_limits.guarded(lambda: None)())
    finally:
        call_limits.reopen_database_work()
    in_new_context(lambda: call_limits.guarded(lambda: None)())


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_health_follows_the_probe() -> None:
    """NOT_SERVING when the database does not answer the probe, SERVING when it does."""
    seen: list[bool] = []

    async def record(serving: bool) -> None:
        seen.append(serving)

    async def run(url: str) -> None:
        engine = create_engine(url)
        monitor = HealthMonitor(DatabaseProbe(engine, interval_s=0.05, timeout_s=1), record)
        await monitor.start()
        await asyncio.sleep(0.2)
        await monitor.stop()
        engine.dispose()

    asyncio.run(run(admin_postgres_url()))
    assert seen == [True]
    seen.clear()
    asyncio.run(run(f"postgresql+psycopg2://postgres@127.0.0.1:{closed_port()}/x"))
    assert seen == [False]


def test_a_probe_that_stops_answering_goes_stale() -> None:
    engine = create_engine(admin_postgres_url())
    probe = DatabaseProbe(engine, interval_s=10, timeout_s=1)
    try:
        assert probe.probe() and probe.healthy(stale_s=1.0)
        probe.last_ok -= 5  # as if the last answer were 5 s old (a hung probe)
        assert not probe.healthy(stale_s=1.0)
    finally:
        probe.stop()
        engine.dispose()


@pytest.mark.postgres
def test_pooled_sessions_wait_for_a_lock_at_most_the_lock_timeout(postgres_url: str) -> None:
    """A transaction waiting on a row lock fails after the lock timeout with ABORTED, and the unit
    of work does not wait again."""
    db = Database.from_url(postgres_url, pool_size=2, lock_timeout_ms=100)
    holder = create_engine(postgres_url).connect()
    try:
        holder.execute(text("CREATE TABLE IF NOT EXISTS lock_probe (id int primary key)"))
        holder.execute(text("INSERT INTO lock_probe VALUES (1) ON CONFLICT DO NOTHING"))
        holder.commit()
        holder.execute(text("SELECT id FROM lock_probe WHERE id = 1 FOR UPDATE"))
        with pytest.raises(Aborted) as caught:  # without the lock timeout this waits until the holder ends
            db.run(lambda conn: conn.execute(text("SELECT id FROM lock_probe WHERE id = 1 FOR UPDATE")).all())
        assert "locked" in caught.value.message
    finally:
        holder.rollback()
        holder.execute(text("DROP TABLE IF EXISTS lock_probe"))
        holder.commit()
        holder.close()
        db.dispose()


@pytest.mark.postgres
def test_a_server_refuses_calls_beyond_its_bound_with_resource_exhausted(postgres_url: str) -> None:
    """With one call in flight allowed and one call held in the database, the next is refused at
    once with RESOURCE_EXHAUSTED; health and streams are not counted."""
    srv = start_server(postgres_url, "postgresql", max_in_flight=1)
    try:
        metadata = (("authorization", f"Bearer {TOKENS['admin']}"),)
        with srv.channel() as channel:
            stub = channel.unary_unary("/cobalt.payments.v1.PaymentsService/GetAdminSummary",
                                       request_serializer=pb.GetAdminSummaryRequest.SerializeToString,
                                       response_deserializer=pb.GetAdminSummaryResponse.FromString)
            stub(pb.GetAdminSummaryRequest(), metadata=metadata, timeout=5)
            in_flight = srv.server.in_flight
            in_flight.count = in_flight.limit  # the server's one place is taken (by a call held elsewhere)
            try:
                with pytest.raises(grpc.RpcError) as caught:
                    stub(pb.GetAdminSummaryRequest(), metadata=metadata, timeout=5)
                assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
                assert health.status == health_pb2.HealthCheckResponse.SERVING
            finally:
                in_flight.count = 0
            stub(pb.GetAdminSummaryRequest(), metadata=metadata, timeout=5)  # the place is free again
    finally:
        srv.stop()
