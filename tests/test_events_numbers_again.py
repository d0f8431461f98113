"""Event numbers handed out again (SPEC §6, §10): after a crash or a promotion, PostgreSQL may hand
out sequence numbers again that transactions which never committed had drawn. Here that is staged in
the test's own database, with no crash: a transaction draws numbers and stays open while the event
reader sees them; then the sequence is set back to where a promoted standby would go on from, and the
open transaction and the reader's session end, as a failover ends them. Payments made then take the
numbers again, and a live stream and a stream resumed from a cursor both receive them.
(`make faults` does the same with a real kill -9 and promotion: tests/failover/.) And a database that
lost events the reader had published, as after a restore to an earlier point."""

from __future__ import annotations

import time

import pytest
from test_events_stream import Collector, wait_live

from cobalt.payments.v1 import payments_pb2 as pb
from server.events.hub import _PROBE, _READ_RANGE

pytestmark = pytest.mark.postgres

WAIT_S = 10


def _wait(predicate, what: str) -> None:  # noqa: ANN001
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.01)


def test_numbers_drawn_again_reach_live_and_resumed_streams(pg_server):
    hub = pg_server.server.servicer.event_hub
    engine = pg_server.db.engine
    with pg_server.client("app") as app, pg_server.client("admin") as admin:
        admin.upsert_organisation(7, "Club")
        admin.adjust(50_000, "credit", member_id=1)
        live = Collector(app, pb.SubscribeRequest(route_codes=["AGN"]))
        wait_live(pg_server, 1)
        first = app.pay(1, 100, organisation_id=7, route_code="AGN")
        (seen,) = live.wait_for(1)
        assert seen.payment_id == first.payment_id

        drawer = engine.raw_connection()  # a writer that draws numbers and never commits
        try:
            with drawer.cursor() as cur:
                cur.execute("BEGIN")  # whatever the pool's isolation level
                cur.execute("SELECT max(outbox_next_sequence()) FROM generate_series(1, 50)")
                (drawn_up_to,) = cur.fetchone()
            assert drawn_up_to >= seen.sequence + 50
            _wait(lambda: hub._horizon.pending, "the reader saw the open writer")

            with engine.connect() as conn:
                conn.exec_driver_sql(  # where a promoted standby goes on from: the open writer's draws were never durable
                    "SELECT setval(pg_get_serial_sequence('outbox_events', 'sequence'), "
                    "(SELECT max(sequence) FROM outbox_events))")
                ended = conn.exec_driver_sql(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                    "AND (query LIKE %(probe)s OR query LIKE %(read)s OR query LIKE %(draw)s)",
                    {"probe": f"EXECUTE {_PROBE.name}%", "read": f"EXECUTE {_READ_RANGE.name}%",
                     "draw": "SELECT max(outbox_next_sequence())%"}).scalar_one()
                conn.commit()
            assert ended == 2  # the reader's session and the open writer's
        finally:
            drawer.invalidate()
        # the reader's next steps: one finds its connection gone, the next probes on a new session
        _wait(lambda: not hub._horizon.pending, "the reader probed again")

        paid = [app.pay(1, amount, organisation_id=7, route_code="AGN") for amount in (101, 102, 103)]
        got = live.wait_for(4)
        assert [e.payment_id for e in got] == [first.payment_id, *(p.payment_id for p in paid)]
        assert got[1].sequence <= drawn_up_to, "the payments did not take numbers the open writer had drawn"
        assert [e.sequence for e in got] == sorted({e.sequence for e in got})

        resumed = Collector(app, pb.SubscribeRequest(route_codes=["AGN"], after_sequence=seen.sequence))
        assert [e.payment_id for e in resumed.wait_for(3)] == [p.payment_id for p in paid]
        time.sleep(0.3)
        assert len(live.events) == 4 and live.error is None
        assert len(resumed.events) == 3 and resumed.error is None
        live.close()
        resumed.close()


def test_a_database_that_lost_published_events_ends_the_streams_and_starts_again(pg_server):
    """As after a restore to an earlier point: the newest events the reader published are gone. Live
    streams end with UNAVAILABLE (they resume from their own cursor), and the stream goes on from the
    database as it is."""
    hub = pg_server.server.servicer.event_hub
    engine = pg_server.db.engine
    with pg_server.client("app") as app, pg_server.client("admin") as admin:
        admin.upsert_organisation(7, "Club")
        admin.adjust(50_000, "credit", member_id=1)
        live = Collector(app, pb.SubscribeRequest(route_codes=["RST"]))
        wait_live(pg_server, 1)
        kept = app.pay(1, 100, organisation_id=7, route_code="RST")
        (seen,) = live.wait_for(1)
        for amount in (101, 102):
            app.pay(1, amount, organisation_id=7, route_code="RST")
        assert len(live.wait_for(3)) == 3
        with engine.connect() as conn:  # the restored database: the last two payments' events never happened
            conn.exec_driver_sql("DELETE FROM outbox_events WHERE sequence > %(s)s", {"s": seen.sequence})
            conn.exec_driver_sql("SELECT setval(pg_get_serial_sequence('outbox_events', 'sequence'), %(s)s)",
                                 {"s": seen.sequence})
            conn.exec_driver_sql(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid() AND (query LIKE %(probe)s OR query LIKE %(read)s)",
                {"probe": f"EXECUTE {_PROBE.name}%", "read": f"EXECUTE {_READ_RANGE.name}%"})
            conn.commit()
        error = live.wait_error(timeout_s=WAIT_S)
        assert error.code().name == "UNAVAILABLE"
        assert f"after_sequence={live.events[-1].sequence}" in error.details()

        resumed = Collector(app, pb.SubscribeRequest(route_codes=["RST"], after_sequence=seen.sequence))
        again = app.pay(1, 103, organisation_id=7, route_code="RST")
        got = resumed.wait_for(1)
        assert [e.payment_id for e in got] == [again.payment_id]
        assert got[0].sequence == seen.sequence + 1  # the number the restored database hands out next
        assert kept.payment_id == seen.payment_id and hub.published is not None
        resumed.close()
