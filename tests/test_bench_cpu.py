"""`bench.cpu`: the CPU of each part of a benchmark scenario, per operation, read from /proc."""

from __future__ import annotations

import os
import sys
import time

import pytest
from sqlalchemy import create_engine, text

from bench import cpu
from tests.conftest import PG_URL, require_postgres

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads Linux's /proc")


def _busy(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_a_process_and_its_main_thread_are_read() -> None:
    before_cpu, before_sched = cpu.process_cpu_s(os.getpid()), cpu.thread_sched_s(os.getpid())
    _busy(0.3)
    after_cpu, after_sched = cpu.process_cpu_s(os.getpid()), cpu.thread_sched_s(os.getpid())
    assert before_cpu is not None and after_cpu is not None
    assert after_cpu - before_cpu >= 0.2
    if before_sched is not None:  # (kept by nearly every Linux kernel)
        assert after_sched is not None
        assert after_sched[0] - before_sched[0] >= 0.2  # running
        assert after_sched[1] >= before_sched[1] >= 0  # waiting for a CPU only adds up
    assert cpu.process_cpu_s(2**22 + 12345) is None  # no such process
    assert cpu.thread_sched_s(2**22 + 12345) is None


def test_the_meter_divides_by_the_operations() -> None:
    meter = cpu.CpuMeter([os.getpid()], postgres_is_local=False)
    meter.start()
    _busy(0.3)
    split = meter.stop(100)
    # this process is both the "server" and the load generator here: 0.3 s over 100 operations, >= 3 ms each
    assert 2.5 <= split["server_ms_per_op"] <= 20
    assert 2.5 <= split["load_generator_ms_per_op"] <= 20
    assert split["postgresql_ms_per_op"] is None  # not asked for: the database is elsewhere
    assert 0 <= split["machine_idle"] <= 1
    if split["server_loop_running"] is not None:
        assert 0.4 <= split["server_loop_running"] <= 1.05
        assert 0 <= split["server_loop_waiting_for_cpu"] <= 1.05
    assert "CPU ms/op: server" in cpu.describe(split)


def test_a_meter_without_servers_reports_none_for_them() -> None:
    meter = cpu.CpuMeter([], postgres_is_local=False)
    meter.start()
    split = meter.stop(10)
    assert split["server_ms_per_op"] is None and split["server_loop_running"] is None
    assert "server" not in cpu.describe(split)
    with pytest.raises(AssertionError, match="start"):
        cpu.CpuMeter([], postgres_is_local=False).stop(1)


@pytest.mark.postgres
def test_postgresql_cpu_counts_a_backend_that_has_ended() -> None:
    require_postgres()
    from bench.database import BenchDatabase

    if not BenchDatabase(PG_URL).is_local:
        pytest.skip("PostgreSQL runs on another host")
    before = cpu.postgres_cpu_s()
    engine = create_engine(PG_URL)
    with engine.connect() as conn:  # a backend of its own, busy in PostgreSQL for a while, then gone
        conn.execute(text("SELECT sum(i) FROM generate_series(1, 4000000) AS i"))
    engine.dispose()
    time.sleep(0.3)  # the server reaps the backend and adds its time to its children's
    after = cpu.postgres_cpu_s()
    assert before is not None and after is not None
    assert after - before >= 0.1
