"""The benchmark harness keeps working: `python -m bench.run --quick` against PostgreSQL runs every
scenario and the ledger invariants hold after each. It asserts that it runs, not how fast."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.conftest import admin_postgres_url

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.postgres, pytest.mark.e2e]


def test_bench_quick_runs_and_the_invariants_hold() -> None:
    pg_url = admin_postgres_url()
    stem = f"test-quick-{uuid.uuid4().hex[:8]}"
    env = dict(os.environ, PAYMENTS_BENCH_POSTGRES_URL=pg_url)
    proc = subprocess.run([sys.executable, "-m", "bench.run", "--quick", "--profile", "--out", stem], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)
    results = ROOT / "bench" / "results"
    try:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "ledger invariants held after every scenario" in proc.stdout
        data = json.loads((results / f"{stem}.json").read_text())
        try:
            import matplotlib  # noqa: F401 - the bench set (make bench) draws the chart; make test's set does not
            assert (results / f"{stem}.png").stat().st_size > 1000
        except ImportError:
            assert "chart: not drawn" in proc.stdout
        rows = data["scenarios"]
        for name in ("floor_spread", "floor_hot", "grpc_floor", "pay_spread", "pay_hot", "transfer", "get_balance",
                     "statement_first_page", "statement_deep_page", "pay_spread_2proc", "pay_hot_2proc",
                     "pay_spread_no_accept_ahead"):
            assert rows[name]["count"] > 0, name
            assert rows[name]["invariants"]["ok"] is True, name
            assert rows[name]["p50_ms"] <= rows[name]["p99_ms"], name
        assert data["final_check"]["ok"] is True
        # the disk under the commits, probed alone before and after the scenarios
        for when in ("before", "after"):
            probe = data["commit_probe"][when]
            assert probe["commits"] > 0 and 0 < probe["p50_ms"] <= probe["max_ms"], (when, probe)
            assert probe["over_50ms"] <= probe["over_20ms"] <= probe["commits"], (when, probe)
        assert f"commit probe before the scenarios: {data['commit_probe']['before']['commits']} commits" in proc.stdout
        assert data["checkpoint_before_each_scenario"] is True  # the test role is a superuser
        for name in ("floor_spread", "grpc_floor", "pay_spread", "statement_first_page", "pay_hot_2proc",
                     "delivery_one_process"):
            probe = rows[name]["commit_probe"]  # and under each scenario's load, one commit every 100 ms
            assert probe["interval_ms"] == 100 and probe["commits"] > 0 and probe["p50_ms"] > 0, (name, probe)
        assert "commit probe under load" in proc.stdout
        # where the CPU went (bench.cpu): the servers' and PostgreSQL's (local here) per operation
        for name in ("pay_spread", "transfer", "pay_spread_2proc"):
            split = rows[name]["cpu"]
            # reported; its size depends on what else the machine runs (a shared PostgreSQL), so not judged here
            assert split["server_ms_per_op"] is not None and split["postgresql_ms_per_op"] is not None, (name, split)
            assert rows[name]["server_cpu_ms_per_op"] == split["server_ms_per_op"]
        # the gRPC floor: the server's stack answering at once, no database: a server CPU figure, no ratio to the floor
        assert rows["grpc_floor"]["cpu"]["server_ms_per_op"] > 0 and rows["grpc_floor"]["throughput"] is False
        floor_split = rows["floor_spread"]["cpu"]
        assert floor_split["server_ms_per_op"] is None and floor_split["postgresql_ms_per_op"] is not None
        assert "CPU per operation" in proc.stdout
        for name in ("delivery_one_process", "delivery_two_processes"):
            assert rows[name].get("skipped") or rows[name]["count"] > 0, name
        assert "x floor" in proc.stdout  # the table was printed
        for name in ("pay_spread", "pay_hot"):  # --profile: a flame graph, or why py-spy could not attach
            profile = rows[name]["profile"]
            if not profile.startswith("not profiled: "):
                assert profile == f"{stem}-{name}.svg"
                assert (results / profile).read_text().lstrip().startswith("<?xml")
    finally:
        for suffix in (".json", ".png", "-pay_spread.svg", "-pay_hot.svg"):
            (results / f"{stem}{suffix}").unlink(missing_ok=True)


def test_bench_invariant_check_fails_loudly_on_a_broken_ledger() -> None:
    pg_url = admin_postgres_url()
    from bench.database import BenchDatabase, Seed

    db = BenchDatabase(pg_url)
    db.create()
    try:
        db.seed(Seed(members=20, organisations=2, statement_postings=100))
        assert db.check_invariants("clean")["ok"] is True
        with db.connect() as conn, conn.cursor() as cur:  # money from nowhere: balances no longer sum to zero
            cur.execute("UPDATE accounts SET balance_cents = balance_cents + 1 WHERE id = (SELECT min(id) FROM accounts "
                        "WHERE kind = 1)")
        with pytest.raises(AssertionError, match="INVARIANTS BROKEN"):
            db.check_invariants("corrupted")
    finally:
        db.drop()


def test_bench_checkpoint_reports_false_where_the_role_may_not() -> None:
    pg_url = admin_postgres_url()
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    from bench.database import BenchDatabase

    db = BenchDatabase(pg_url)
    db.create()
    role = f"bench_plain_{uuid.uuid4().hex[:8]}"
    superuser_url = db.url
    try:
        assert db.checkpoint() is True  # the test role is a superuser
        with db.connect() as conn, conn.cursor() as cur:
            cur.execute(f'CREATE ROLE "{role}" LOGIN')
        db.url = make_url(superuser_url).set(username=role).render_as_string(hide_password=False)
        assert db.checkpoint() is False, "a role without pg_checkpoint may not checkpoint: the run goes on without"
    finally:
        db.url = superuser_url
        db.drop()
        admin = create_engine(pg_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'DROP ROLE IF EXISTS "{role}"'))
        admin.dispose()
