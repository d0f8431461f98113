"""The event stream through gRPC (SPEC §6), on PostgreSQL: what each movement emits,
filters, replay from a cursor, Ack and resume, rollbacks, slow consumers, retention."""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import timedelta

import grpc
import pytest
from conftest import record_backend, scratch_database, start_server
from sqlalchemy import func, select, update

from clients.events import tail
from cobalt.payments.v1 import payments_pb2 as pb
from server.domain.types import EventKind
from server.events.outbox import NewEvent, emit
from server.ledger.db import utcnow
from server.ledger.schema import outbox_events

WAIT_S = 10


class Collector:
    """A Subscribe stream read on a thread; `wait_for(n)` until n events arrived."""

    def __init__(self, client, request: pb.SubscribeRequest):  # noqa: ANN001
        self.events: list[pb.Event] = []
        self.error: grpc.RpcError | None = None
        self._cond = threading.Condition()
        self._call = client.stream("Subscribe", request, timeout_s=60)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for ev in self._call:
                with self._cond:
                    self.events.append(ev)
                    self._cond.notify_all()
        except grpc.RpcError as exc:
            with self._cond:
                self.error = exc
                self._cond.notify_all()

    def wait_for(self, n: int, timeout_s: float = WAIT_S) -> list[pb.Event]:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while len(self.events) < n and self.error is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return list(self.events)

    def wait_error(self, timeout_s: float = WAIT_S) -> grpc.RpcError:
        self._thread.join(timeout_s)
        assert self.error is not None, f"the stream did not end; got {len(self.events)} events"
        return self.error

    def close(self) -> None:
        self._call.cancel()
        self._thread.join(5)


@pytest.fixture
def collectors():
    made: list[Collector] = []

    def make(client, **fields) -> Collector:  # noqa: ANN001, ANN003
        c = Collector(client, pb.SubscribeRequest(**fields))
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def outbox_sequences(server) -> list[int]:  # noqa: ANN001
    with server.db.engine.connect() as conn:
        return list(conn.execute(select(outbox_events.c.sequence).order_by(outbox_events.c.sequence)).scalars())


def newest(server) -> int:  # noqa: ANN001
    seqs = outbox_sequences(server)
    return seqs[-1] if seqs else 0


def wait_live(srv, streams: int) -> None:  # noqa: ANN001
    hub = srv.server.servicer.event_hub
    deadline = time.monotonic() + WAIT_S
    while hub.live_streams < streams and time.monotonic() < deadline:
        time.sleep(0.01)
    assert hub.live_streams >= streams


def kinds(events: list[pb.Event]) -> list[str]:
    return [pb.EventKind.Name(e.kind) for e in events]


def test_each_movement_emits_its_event_with_fields(server, app, admin, collectors):
    admin.upsert_organisation(7, "Bridge Club")
    live = collectors(app, after_sequence=newest(server))
    adjust = admin.adjust(10_000, "opening credit", member_id=1)
    paid = app.pay(1, 2_500, organisation_id=7, description="Entry", route_code="EVT",
                   route_payload='{"entry": 42}', event_id=42, session_id=3)
    m2m = app.pay(1, 1_000, other_member_id=2, description="lunch", route_code="M2M", route_payload="p2")
    moved = app.transfer(3, 6_000, from_member_id=1, description="gift")  # leaves member 1 with 500: low
    events = live.wait_for(6)
    assert kinds(events) == ["ADJUSTED", "PAYMENT_SUCCEEDED", "PAYMENT_SUCCEEDED", "TRANSFER_RECEIVED",
                             "TRANSFER_RECEIVED", "LOW_BALANCE"]
    seqs = [e.sequence for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == 6
    assert seqs == outbox_sequences(server)

    adj, pay_org, pay_m2m, recv_m2m, recv_tr, low = events
    assert (adj.member_id, adj.amount_cents, adj.balance_cents, adj.reason) == (1, 10_000, 10_000, "opening credit")
    assert adj.payment_id == adjust.adjustment_id
    assert (pay_org.member_id, pay_org.organisation_id, pay_org.amount_cents) == (1, 7, 2_500)
    assert (pay_org.route_code, pay_org.route_payload) == ("EVT", '{"entry": 42}')
    assert (pay_org.payment_id, pay_org.balance_cents) == (paid.payment_id, 7_500)
    assert (pay_org.event_id, pay_org.session_id) == (42, 3)
    assert pay_org.reference and pay_org.time.seconds > 0
    assert (pay_m2m.other_member_id, pay_m2m.route_code, pay_m2m.payment_id) == (2, "M2M", m2m.payment_id)
    assert (recv_m2m.member_id, recv_m2m.other_member_id, recv_m2m.amount_cents) == (2, 1, 1_000)
    assert (recv_m2m.route_code, recv_m2m.route_payload, recv_m2m.balance_cents) == ("M2M", "p2", 1_000)
    assert (recv_tr.member_id, recv_tr.other_member_id, recv_tr.amount_cents) == (3, 1, 6_000)
    assert (recv_tr.payment_id, recv_tr.balance_cents) == (moved.transfer_id, 6_000)
    assert (low.member_id, low.balance_cents) == (1, 500)
    assert low.reason


def test_filters_by_route_code_and_kind_in_replay_and_live(server, app, admin, collectors):
    admin.upsert_organisation(7, "Club")
    admin.adjust(50_000, "credit", member_id=1)
    app.pay(1, 100, organisation_id=7, route_code="EVT")
    app.pay(1, 200, organisation_id=7, route_code="UPP")
    app.pay(1, 300, other_member_id=2, route_code="EVT")
    by_route = collectors(app, route_codes=["EVT"])
    by_kind = collectors(app, kinds=[pb.TRANSFER_RECEIVED, pb.ADJUSTED])
    both = collectors(app, route_codes=["EVT"], kinds=[pb.PAYMENT_SUCCEEDED])
    app.pay(1, 400, organisation_id=7, route_code="EVT")
    app.pay(1, 500, other_member_id=3, route_code="CAU")
    app.pay(1, 600, organisation_id=7, route_code="UPP")
    got = by_route.wait_for(4)
    assert [(k, e.amount_cents) for k, e in zip(kinds(got), got, strict=True)] == [
        ("PAYMENT_SUCCEEDED", 100), ("PAYMENT_SUCCEEDED", 300), ("TRANSFER_RECEIVED", 300), ("PAYMENT_SUCCEEDED", 400)]
    got = by_kind.wait_for(3)
    assert [(k, e.amount_cents) for k, e in zip(kinds(got), got, strict=True)] == [
        ("ADJUSTED", 50_000), ("TRANSFER_RECEIVED", 300), ("TRANSFER_RECEIVED", 500)]
    got = both.wait_for(3)
    assert [e.amount_cents for e in got] == [100, 300, 400]
    time.sleep(0.3)  # nothing else arrives
    assert len(by_route.events) == 4 and len(by_kind.events) == 3 and len(both.events) == 3


def test_replay_from_a_cursor_returns_exactly_the_missed_events(server, app, admin, collectors):
    admin.upsert_organisation(7, "Club")
    admin.adjust(50_000, "credit", member_id=1)
    for i in range(5):
        app.pay(1, 100 + i, organisation_id=7, route_code="EVT")
    everything = collectors(app).wait_for(6)
    assert len(everything) == 6
    cursor = everything[2].sequence
    for i in range(3):
        app.pay(1, 200 + i, organisation_id=7, route_code="EVT")
    stream = collectors(app, after_sequence=cursor)
    resumed = stream.wait_for(6)
    expected = [s for s in outbox_sequences(server) if s > cursor]
    assert [e.sequence for e in resumed] == expected
    assert [e.amount_cents for e in resumed] == [102, 103, 104, 200, 201, 202]
    time.sleep(0.3)
    assert len(stream.events) == 6


def test_ack_then_resume_as_a_durable_consumer(server, app, admin, collectors):
    admin.upsert_organisation(7, "Club")
    admin.adjust(50_000, "credit", member_id=1)
    for i in range(4):
        app.pay(1, 10 + i, organisation_id=7, route_code="EVT")
    first = collectors(app, consumer="entries").wait_for(5)
    assert len(first) == 5
    acked = app.call("Ack", pb.AckRequest(consumer="entries", sequence=first[2].sequence))
    assert acked.acked_sequence == first[2].sequence
    back = app.call("Ack", pb.AckRequest(consumer="entries", sequence=first[0].sequence))
    assert back.acked_sequence == first[2].sequence  # never moves back
    resumed = collectors(app, consumer="entries").wait_for(2)
    assert [e.sequence for e in resumed] == [first[3].sequence, first[4].sequence]
    # an explicit cursor wins over the acknowledged one
    explicit = collectors(app, consumer="entries", after_sequence=first[0].sequence).wait_for(4)
    assert [e.sequence for e in explicit] == [e.sequence for e in first[1:]]
    # consumer names are scoped by principal: another app's "entries" starts from the beginning
    with server.client("app2") as other:
        assert len(collectors(other, consumer="entries").wait_for(5)) == 5
        with pytest.raises(grpc.RpcError) as err:
            other.call("Ack", pb.AckRequest(consumer="entries", sequence=first[-1].sequence + 1000))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        app.call("Ack", pb.AckRequest(consumer="", sequence=first[0].sequence))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_rolled_back_payments_emit_nothing(server, app, admin, collectors):
    admin.upsert_organisation(7, "Club")
    admin.adjust(10_000, "credit", member_id=1)
    before = outbox_sequences(server)
    live = collectors(app, after_sequence=newest(server))
    with pytest.raises(grpc.RpcError) as err:
        app.transfer(2, 50_000, from_member_id=1)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    try:
        short = app.pay(1, 20_000, organisation_id=7, route_code="EVT")
        assert short.status != pb.SUCCEEDED
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION

    def emit_then_fail(conn):  # noqa: ANN001, ANN202 - a transaction that wrote an event, then failed
        emit(conn, NewEvent(EventKind.ADJUSTED, member_id=99, amount_cents=1))
        raise RuntimeError("rolled back")

    with pytest.raises(RuntimeError):
        server.db.run(emit_then_fail)
    assert outbox_sequences(server) == before
    app.pay(1, 300, organisation_id=7, route_code="EVT")  # the stream goes on past the unused number
    got = live.wait_for(1)
    assert kinds(got) == ["PAYMENT_SUCCEEDED"] and got[0].amount_cents == 300
    time.sleep(0.3)
    assert len(live.events) == 1
    assert app.balance_cents(member_id=1) == 9_700


def test_unauthenticated_and_bad_subscribe(server):
    from clients.payments_client import PaymentsClient

    with PaymentsClient(server.target, "not-a-token") as stranger:
        with pytest.raises(grpc.RpcError) as err:
            list(stranger.stream("Subscribe", pb.SubscribeRequest(), timeout_s=5))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with grpc.insecure_channel(server.target) as channel:
        from cobalt.payments.v1 import payments_pb2_grpc

        stub = payments_pb2_grpc.PaymentsServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Subscribe(pb.SubscribeRequest(), timeout=5))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with server.client("app") as app:
        with pytest.raises(grpc.RpcError) as err:
            list(app.stream("Subscribe", pb.SubscribeRequest(kinds=[0]), timeout_s=5))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as err:  # a cursor from another database, say
            list(app.stream("Subscribe", pb.SubscribeRequest(after_sequence=newest(server) + 10), timeout_s=5))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "after_sequence" in err.value.details()


def test_expired_cursor_is_out_of_range(server, app, admin, collectors):
    admin.upsert_organisation(7, "Club")
    admin.adjust(50_000, "credit", member_id=1)
    for i in range(4):
        app.pay(1, 10 + i, organisation_id=7, route_code="EVT")
    seqs = outbox_sequences(server)
    old = utcnow() - timedelta(days=server.server.settings.event_retention_days + 1)
    with server.db.engine.begin() as conn:  # the first three events are past the retention
        conn.execute(update(outbox_events).where(outbox_events.c.sequence <= seqs[2]).values(created_at=old))
    hub = server.server.servicer.event_hub
    deleted = asyncio.run_coroutine_threadsafe(hub.prune_now(), server.loop).result(10)
    assert deleted == 3
    with server.db.engine.connect() as conn:
        assert conn.execute(select(func.min(outbox_events.c.sequence))).scalar() == seqs[3]
    stale = collectors(app, after_sequence=seqs[0])
    err = stale.wait_error()
    assert err.code() == grpc.StatusCode.OUT_OF_RANGE
    assert str(seqs[2]) in err.details()
    app.call("Ack", pb.AckRequest(consumer="late", sequence=seqs[1]))
    assert collectors(app, consumer="late").wait_error().code() == grpc.StatusCode.OUT_OF_RANGE
    kept = collectors(app, after_sequence=seqs[2]).wait_for(2)
    assert [e.sequence for e in kept] == seqs[3:]
    assert [e.sequence for e in collectors(app).wait_for(2)] == seqs[3:]  # 0: from the oldest kept


def test_a_slow_subscriber_is_cut_off_and_resumes(tmp_path, request):  # noqa: ANN001
    backend = "postgresql"
    srv = start_server(scratch_database(), backend, extra={"event_queue_events": 5})
    try:
        with srv.client("app") as app, srv.client("admin") as admin:
            start = newest(srv)
            live = Collector(app, pb.SubscribeRequest(after_sequence=start))
            fast = Collector(app, pb.SubscribeRequest(after_sequence=-1, route_codes=["NONE"]))
            wait_live(srv, 2)  # both joined the fan-out before the burst

            def burst(conn):  # noqa: ANN001, ANN202 - 20 events in one commit: one fan-out
                emit(conn, *[NewEvent(EventKind.ADJUSTED, member_id=1, amount_cents=i + 1) for i in range(20)])

            srv.db.run(burst)
            err = live.wait_error()
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "fell" in err.details() and "after_sequence" in err.details()
            assert fast.error is None  # a subscriber with nothing queued is not affected
            # resuming from the last sequence seen gives the rest, without gaps
            seen = live.events
            resume_from = seen[-1].sequence if seen else start
            rest = Collector(app, pb.SubscribeRequest(after_sequence=resume_from)).wait_for(20 - len(seen))
            got = [e.amount_cents for e in seen + rest]
            assert got == list(range(1, 21))
            admin.adjust(5, "after", member_id=2)
            fast.close()
            live.close()
    finally:
        srv.stop()
        record_backend(backend)


def test_tail_follows_the_stream_and_dedupes(server, app, admin):
    admin.adjust(1_000, "credit", member_id=1)
    admin.adjust(2_000, "credit", member_id=2)
    got = []
    for ev in tail(app, kinds=["ADJUSTED"]):
        got.append(ev)
        if len(got) == 2:
            break
    assert [e.amount_cents for e in got] == [1_000, 2_000]


def test_a_hundred_subscribers_each_get_every_event_and_pay_goes_on(server, app, admin, capsys):
    """Fan-out correctness with 100 open streams (half filtered); Pay latency is logged, not asserted."""
    from cobalt.payments.v1 import payments_pb2_grpc

    admin.upsert_organisation(7, "Club")
    admin.adjust(1_000_000, "credit", member_id=1)
    base = newest(server)

    def pay_latency_ms(n: int) -> float:
        started = time.perf_counter()
        for i in range(n):
            app.pay(1, 1 + i, organisation_id=7, route_code="EVT" if i % 2 else "UPP")
        return (time.perf_counter() - started) * 1000 / n

    alone_ms = pay_latency_ms(10)
    received: dict[int, list[int]] = {}
    loop = asyncio.new_event_loop()
    ready = threading.Event()

    async def subscribe_all() -> None:
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = payments_pb2_grpc.PaymentsServiceStub(channel)

            async def one(i: int) -> None:
                request = pb.SubscribeRequest(after_sequence=base, route_codes=["EVT"] if i % 2 else [])
                got = received.setdefault(i, [])
                call = stub.Subscribe(request, metadata=(("authorization", "Bearer test-app-token"),), timeout=30)
                async for ev in call:
                    got.append(ev.sequence)
                    if len(got) == (15 if i % 2 else 30):  # 10 earlier Pays replayed, 20 live; half are EVT
                        call.cancel()
                        return

            tasks = [asyncio.create_task(one(i)) for i in range(100)]
            ready.set()
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)

    runner = threading.Thread(target=lambda: loop.run_until_complete(subscribe_all()), daemon=True)
    runner.start()
    ready.wait(10)
    wait_live(server, 100)
    watched_ms = pay_latency_ms(20)
    runner.join(40)
    loop.close()
    everything = [s for s in outbox_sequences(server) if s > base]
    evt = {e.sequence for e in stored_events(server, base) if e.route_code == "EVT"}
    assert len(received) == 100
    for i, got in received.items():
        assert got == (sorted(evt) if i % 2 else everything), f"subscriber {i}"
    with capsys.disabled():
        print(f"\n[{server.backend}] Pay latency: {alone_ms:.1f} ms alone, {watched_ms:.1f} ms with 100 streams open")


def stored_events(server, after: int):  # noqa: ANN001, ANN201
    from server.events import store

    with server.db.engine.connect() as conn:
        return store.read_range(conn, after, 1 << 62, limit=10_000)


def test_streams_end_with_unavailable_when_the_server_stops(tmp_path):
    srv = start_server(scratch_database(), "postgresql")
    stopped = False
    try:
        with srv.client("app") as app, srv.client("admin") as admin:
            admin.adjust(100, "credit", member_id=1)
            stream = Collector(app, pb.SubscribeRequest())
            assert len(stream.wait_for(1)) == 1
            wait_live(srv, 1)
            started = time.monotonic()
            srv.stop()
            stopped = True
            err = stream.wait_error()
            assert err.code() == grpc.StatusCode.UNAVAILABLE
            assert f"after_sequence={stream.events[0].sequence}" in err.details()
            assert time.monotonic() - started < 5  # not held until the grace period runs out
    finally:
        if not stopped:
            srv.stop()
        record_backend("postgresql")


def test_paging_and_a_small_ring_keep_order_and_filters(tmp_path, request):  # noqa: ANN001
    """Tiny pages, reader batches and ring: catching up crosses pages, the ring and the live hand-off."""
    backend = "postgresql"
    srv = start_server(scratch_database(), backend, extra={"event_replay_page": 3, "event_read_batch": 4, "event_ring_events": 5})
    try:
        with srv.client("app") as app:
            base = newest(srv)
            keep = Collector(app, pb.SubscribeRequest(after_sequence=base))  # live from the start
            wait_live(srv, 1)

            def burst(start: int):  # noqa: ANN202
                def write(conn):  # noqa: ANN001, ANN202
                    emit(conn, *[NewEvent(EventKind.ADJUSTED, member_id=1, amount_cents=start + i,
                                          route_code="A" if (start + i) % 3 else "B") for i in range(7)])
                return write

            for start in range(0, 35, 7):
                srv.db.run(burst(start))
            wanted = [s for s in outbox_sequences(srv) if s > base]
            assert [e.sequence for e in keep.wait_for(35)] == wanted
            # joiners after the fact: from the table (pages of 3), from the ring, and filtered
            assert [e.amount_cents for e in Collector(app, pb.SubscribeRequest(after_sequence=base)).wait_for(35)] \
                == list(range(35))
            assert [e.amount_cents for e in Collector(app, pb.SubscribeRequest(after_sequence=wanted[-3]))
                    .wait_for(2)] == [33, 34]
            b_only = Collector(app, pb.SubscribeRequest(after_sequence=base, route_codes=["B"])).wait_for(12)
            assert [e.amount_cents for e in b_only] == [n for n in range(35) if n % 3 == 0]
            srv.db.run(burst(35))
            assert [e.amount_cents for e in keep.wait_for(42)][35:] == list(range(35, 42))
            keep.close()
    finally:
        srv.stop()
        record_backend(backend)


@pytest.mark.postgres
def test_on_postgresql_the_reader_reads_again_after_its_connection_is_lost(pg_server, collectors):
    """The reader probes and reads on a connection of its own, on the event loop. Killed, it is
    opened again, and the stream goes on with nothing lost or repeated."""
    from server.events.hub import _PROBE, _READ_RANGE

    with pg_server.client("app") as app, pg_server.client("admin") as admin:
        admin.upsert_organisation(7, "Club")
        admin.adjust(50_000, "credit", member_id=1)
        stream = collectors(app, route_codes=["RCN"])
        wait_live(pg_server, 1)
        app.pay(1, 101, organisation_id=7, route_code="RCN")
        assert [e.amount_cents for e in stream.wait_for(1)] == [101]
        with pg_server.db.engine.connect() as conn:
            killed = conn.exec_driver_sql(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid() AND (query LIKE %(probe)s OR query LIKE %(read)s)",
                {"probe": f"EXECUTE {_PROBE.name}%", "read": f"EXECUTE {_READ_RANGE.name}%"}).scalar_one()
        assert killed == 1  # the reader's connection, and only it
        for amount in (102, 103):
            app.pay(1, amount, organisation_id=7, route_code="RCN")
        got = stream.wait_for(3)  # after the failed step, the next poll (within a second) opens a new one
        assert [e.amount_cents for e in got] == [101, 102, 103]
        time.sleep(0.3)
        assert len(stream.events) == 3 and stream.error is None
