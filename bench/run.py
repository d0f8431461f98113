"""`python -m bench.run [--quick]`: the service against the PostgreSQL floor, in one run.

Creates its own database on PAYMENTS_BENCH_POSTGRES_URL (dropped at the end), seeds it in bulk,
measures the bare-SQL floor, then the server (its own process) under load, checks the ledger
invariants after every scenario, prints a table and writes JSON and a PNG under bench/results/.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from bench import cpu, floor, load, report, scale
from bench.database import BenchDatabase, CommitProbe, Seed
from bench.scale_seed import ScaleSeed, seed_scale
from server.domain.types import member_account
from server.services.statements import _encode_token

# the commit probe during a scenario: one commit of its own row every 100 ms, a small addition to the
# load's own 100 or so commits a second, often enough to see a stall of the disk that holds the load
PROBE_INTERVAL_S = 0.1
DEFAULT_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"


@dataclass(frozen=True)
class Plan:
    mode: str
    seed: Seed
    floor_threads: int
    in_flight: int
    floor_s: float
    probe_s: float
    pay_s: float
    other_s: float
    read_s: float
    warmup_s: float
    deep_depth: int
    subscribers: int
    delivery_rate_per_s: float
    delivery_s: float
    scale: ScaleSeed  # the data-scale scenarios' seed (bench.scale_seed)
    scale_repeat: int  # calls per data-scale read scenario
    list_walks: int  # walks through every ListBalances page


FULL = Plan("full", Seed(members=10_000, organisations=100, statement_postings=1_000_000), floor_threads=16,
            in_flight=64, floor_s=12, probe_s=5, pay_s=15, other_s=10, read_s=6, warmup_s=2, deep_depth=500_000,
            subscribers=100, delivery_rate_per_s=20, delivery_s=8,
            scale=ScaleSeed(accounts=100_000, settle_small=1_000, settle_large=10_000, summary_postings=1_000_000),
            scale_repeat=15, list_walks=3)
QUICK = Plan("quick", Seed(members=1_000, organisations=100, statement_postings=20_000), floor_threads=4,
             in_flight=8, floor_s=1, probe_s=0.3, pay_s=1.5, other_s=1, read_s=0.5, warmup_s=0.3, deep_depth=10_000,
             subscribers=10, delivery_rate_per_s=10, delivery_s=1,
             scale=ScaleSeed(accounts=3_000, settle_small=100, settle_large=300, summary_postings=20_000),
             scale_repeat=3, list_walks=1)
# `make bench-scale`: the data-scale scenarios alone, on a long history of ten million lines
SCALE = replace(FULL, mode="scale", scale=replace(FULL.scale, summary_postings=10_000_000))


def machine() -> dict:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu_model": model, "platform": platform.platform(),
            "python": platform.python_version()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    parser.add_argument("--scale", action="store_true",
                        help="the data-scale scenarios alone, with ten million lines of history (longer)")
    parser.add_argument("--servers", type=int, default=1, help="server processes sharing the load (default 1)")
    parser.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra environment for the server processes, e.g. PAYMENTS_DB_THREADS=8")
    parser.add_argument("--only", default="", help="comma-separated scenario prefixes to run (default: all)")
    parser.add_argument("--out", default="", help="results file stem (default: bench-<mode>-<time>)")
    parser.add_argument("--profile", action="store_true",
                        help="record the server with py-spy during the Pay scenarios: <stem>-<scenario>.svg flame graphs "
                             "of where the server's Python holds the interpreter lock")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else SCALE if args.scale else FULL
    base_url = os.environ.get("PAYMENTS_BENCH_POSTGRES_URL", DEFAULT_URL)
    server_env = dict(item.split("=", 1) for item in args.server_env)
    only = [p for p in args.only.split(",") if p] or (["data_"] if args.scale else [])
    started_at = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    stem = args.out or f"bench-{plan.mode}-{started_at.replace(':', '')}"
    results: dict = {"mode": plan.mode, "started_at": started_at, "machine": machine(), "servers": args.servers,
                     "server_env": server_env, "plan": {k: str(v) for k, v in plan.__dict__.items()}, "scenarios": {}}
    t0 = time.perf_counter()
    db = BenchDatabase(base_url)
    db.create()
    servers: list[load.ServerProcess] = []
    try:
        with db.connect() as conn, conn.cursor() as cur:
            cur.execute("SHOW server_version")
            results["machine"]["postgresql"] = cur.fetchone()[0]
        print(f"seeding {plan.seed.members} members, {plan.seed.organisations} organisations, "
              f"{plan.seed.statement_postings} statement postings ...", flush=True)
        results["seed_s"] = round(db.seed(plan.seed), 1)
        print(f"seeded in {results['seed_s']} s", flush=True)
        if not only or any(p.startswith("data") for p in only):
            s = plan.scale
            print(f"seeding the data scale: {s.accounts:,} accounts, {s.settle_small + s.settle_large:,} organisations "
                  f"to settle, one with {s.summary_postings:,} lines ...", flush=True)
            results["scale_seed"] = seed_scale(db, s)
            results["scale_seed"]["invariants"] = db.check_invariants("the data-scale seed", full=True)
            print(f"seeded: {results['scale_seed']}", flush=True)
        results["checkpoint_before_each_scenario"] = db.checkpoint()
        results["commit_probe"] = {"before": probe(db, plan, "before the scenarios")}
        run_scenarios(plan, db, results, servers, args.servers, server_env, only, stem if args.profile else "")
        results["commit_probe"]["after"] = probe(db, plan, "after them")
        results["final_check"] = db.check_invariants("the whole run", full=True)
    finally:
        for s in servers:
            s.stop()
        db.drop()
    results["total_s"] = round(time.perf_counter() - t0, 1)
    results["targets"] = report.targets(results["scenarios"])
    json_path = report.write_json(results, stem)
    png_path = report.draw_png(results, stem)
    m = results["machine"]
    print()
    print(f"machine: {m['cpus']} cpus ({m['cpu_model']}), PostgreSQL {m['postgresql']}, Python {m['python']}; "
          f"{args.servers} server process(es); total {results['total_s']} s")
    print(report.table(results))
    for when, p in results["commit_probe"].items():
        print(f"commit probe {when} the scenarios: {report.describe_probe(p)}")
    if png_path is None:
        print(f"\nwrote {json_path} (chart: not drawn, matplotlib is in the bench set: make bench)")
    else:
        print(f"\nwrote {json_path} and {png_path}")
    print("ledger invariants held after every scenario")
    return 0


def probe(db: BenchDatabase, plan: Plan, when: str) -> dict:
    """The disk under the commits, measured alone (`BenchDatabase.commit_probe`)."""
    result = db.commit_probe(plan.probe_s)
    print(f"  commit probe {when}: {report.describe_probe(result)}", flush=True)
    return result


def run_scenarios(plan: Plan, db: BenchDatabase, results: dict, servers: list, n_servers: int,
                  server_env: dict, only: list[str], profile_stem: str = "") -> None:
    rows = results["scenarios"]
    profiles: dict[str, str] = {}  # scenario -> its flame graph (or why there is none)
    probed: list[dict] = [{}]  # the commit probe of the scenario just measured
    orgs = list(range(1, plan.seed.organisations + 1))
    members = plan.seed.members

    def wanted(name: str) -> bool:
        return not only or any(name.startswith(p) for p in only)

    def record(name: str, samples, *, throughput: bool = True, note: str = "",  # noqa: ANN001
               cpu_split: dict | None = None, extra: dict | None = None) -> None:
        row = samples.summary()
        row.update(extra or {})
        if row.get("sql_ms") and row.get("p50_ms") is not None and "vs_sql" not in row:
            row["vs_sql"] = round(row["p50_ms"] / row["sql_ms"], 2)
        if probed[0]:
            row["commit_probe"], probed[0] = probed[0], {}
        if cpu_split is not None:
            row["cpu"] = cpu_split
            if cpu_split["server_ms_per_op"] is not None:
                row["server_cpu_ms_per_op"] = cpu_split["server_ms_per_op"]
        row["throughput"] = throughput
        row["note"] = note
        row["invariants"] = db.check_invariants(name)
        if name in profiles:
            row["profile"] = profiles.pop(name)
        rows[name] = row
        extra = f"; {cpu.describe(cpu_split)}" if cpu_split else ""
        extra += f"; profile {row['profile']}" if "profile" in row else ""
        if "commit_probe" in row:
            p = row["commit_probe"]
            extra += f"; commit probe: {p['over_50ms']} of {p['commits']} over 50 ms, max {p['max_ms']} ms"
        print(f"  {name:<26} {row['per_s']:>8.0f}/s  p50 {row['p50_ms']} ms  p99 {row['p99_ms']} ms{extra}  "
              f"(invariants ok, {row['invariants']['check_s']} s)", flush=True)

    # 1. the floor
    for name, payees in (("floor_spread", orgs), ("floor_hot", orgs[:1])):
        if wanted(name):
            db.checkpoint()
            meter = cpu.CpuMeter([], postgres_is_local=db.is_local)  # the floor's own threads are the load
            probe = CommitProbe(db, PROBE_INTERVAL_S)
            probe.start()
            meter.start()
            s = floor.run_floor(db.connect, threads=plan.floor_threads, duration_s=plan.floor_s, members=members,
                                organisations=payees)
            probed[0] = probe.stop()
            record(name, s, cpu_split=meter.stop(len(s.latencies_s)), note=f"bare psycopg2, {plan.floor_threads} threads, "
                                 f"{'one organisation' if len(payees) == 1 else f'{len(payees)} organisations'}")

    flight = plan.in_flight
    cpu_used: list[dict] = [{}]

    def closed(call, duration_s: float, in_flight: int = flight, warmup_s: float = 0.0,  # noqa: ANN001, ANN202
               on: list | None = None, profile_as: str = ""):
        """Run a closed loop; where its CPU went (measured part only, `bench.cpu`) goes to cpu_used[0]. With
        `profile_as` (and --profile), the first server is recorded with py-spy meanwhile."""
        procs = on or servers[:n_servers]
        where = [s.target for s in procs]
        db.checkpoint()  # what earlier scenarios left dirty is written out now, not during this one
        if warmup_s:
            load.run(load.closed_loop(where, call, in_flight=in_flight, duration_s=warmup_s))
        spy = None
        if profile_as and profile_stem:
            spy = load.Profiler(procs[0], report.RESULTS_DIR / f"{profile_stem}-{profile_as}.svg", duration_s)
        meter = cpu.CpuMeter([s.pid for s in procs], postgres_is_local=db.is_local)
        probe = CommitProbe(db, PROBE_INTERVAL_S)
        probe.start()
        meter.start()
        samples = load.run(load.closed_loop(where, call, in_flight=in_flight, duration_s=duration_s))
        cpu_used[0] = meter.stop(len(samples.latencies_s))
        probed[0] = probe.stop()
        if spy is not None:
            profiles[profile_as] = spy.finish()
        return samples

    if wanted("grpc_floor"):  # the gRPC floor: the server's stack answering Pay at once, no database
        floor_server = load.ServerProcess(db.url, env=server_env, name="grpc-floor", module="bench.grpc_floor")
        servers.append(floor_server)
        floor_server.start()
        s = closed(load.pay_call(members, orgs), plan.other_s, warmup_s=plan.warmup_s, on=[floor_server])
        record("grpc_floor", s, throughput=False, cpu_split=cpu_used[0],
               note=f"gRPC, {flight} in flight, Pay answered at once by the same server stack, no database")
        floor_server.stop()
        servers.remove(floor_server)

    for i in range(n_servers):
        srv = load.ServerProcess(db.url, env=server_env, name=f"server{i}")
        servers.append(srv)
        srv.start()
    # 2-3. Pay
    if wanted("pay_spread"):
        s = closed(load.pay_call(members, orgs), plan.pay_s, warmup_s=plan.warmup_s, profile_as="pay_spread")
        record("pay_spread", s, note=f"gRPC, {flight} in flight, {len(orgs)} organisations", cpu_split=cpu_used[0])
    if wanted("pay_spread_no_accept_ahead") or wanted("get_balance_no_accept_ahead"):
        # the same loads on a server with accept-ahead off (what it buys)
        plain = load.ServerProcess(db.url, env={**server_env, "PAYMENTS_GRPC_ACCEPT_AHEAD": "0"}, name="no-accept-ahead")
        servers.append(plain)
        plain.start()
        if wanted("pay_spread_no_accept_ahead"):
            s = closed(load.pay_call(members, orgs), plan.pay_s, warmup_s=plan.warmup_s, on=[plain])
            record("pay_spread_no_accept_ahead", s, note="as pay_spread, PAYMENTS_GRPC_ACCEPT_AHEAD=0",
                   cpu_split=cpu_used[0])
        if wanted("get_balance_no_accept_ahead"):
            s = closed(load.balance_call(members), plan.read_s, on=[plain])
            record("get_balance_no_accept_ahead", s, note="as get_balance, PAYMENTS_GRPC_ACCEPT_AHEAD=0",
                   cpu_split=cpu_used[0])
        plain.stop()
        servers.remove(plain)
    if wanted("pay_hot"):
        s = closed(load.pay_call(members, orgs[:1]), plan.pay_s, warmup_s=plan.warmup_s, profile_as="pay_hot")
        record("pay_hot", s, note=f"gRPC, {flight} in flight, one organisation", cpu_split=cpu_used[0])
    # 4. Transfer, GetBalance, GetStatement
    if wanted("transfer"):
        s = closed(load.transfer_call(members), plan.other_s)
        record("transfer", s, note=f"member to member, {flight} in flight", cpu_split=cpu_used[0])
    if wanted("get_balance"):
        s = closed(load.balance_call(members), plan.read_s)
        record("get_balance", s, note=f"{flight} in flight", cpu_split=cpu_used[0])
    stmt_member = plan.seed.statement_member_id
    if wanted("statement"):
        created_at, posting_id = db.statement_deep_token_key(member_account(stmt_member), plan.deep_depth - 1)
        deep_token = _encode_token(created_at, posting_id)
        for name, token, label in (("statement_first_page", "", "first page"),
                                   ("statement_deep_page", deep_token, f"{plan.deep_depth:,} rows deep")):
            # one caller at a time: the latency of the page itself, not of a queue in front of it
            s = closed(load.statement_call(stmt_member, token), plan.read_s, in_flight=1, warmup_s=0.2)
            record(name, s, throughput=False,
                   note=f"{label}, 50 lines, {plan.seed.statement_postings:,} postings, 1 in flight", cpu_split=cpu_used[0])
    # the other server model: two server processes on the one database, the load spread over both
    if n_servers == 1 and (wanted("pay_spread_2proc") or wanted("pay_hot_2proc") or wanted("delivery")):
        second = load.ServerProcess(db.url, env=server_env, name="server1")
        servers.append(second)
        second.start()
    for name, payees, label in (("pay_spread_2proc", orgs, f"{len(orgs)} organisations"),
                                ("pay_hot_2proc", orgs[:1], "one organisation")):
        if n_servers == 1 and wanted(name):
            s = closed(load.pay_call(members, payees), plan.pay_s, warmup_s=plan.warmup_s, on=servers[:2])
            record(name, s, note=f"gRPC, {flight} in flight over two server processes, {label}",
                   cpu_split=cpu_used[0])
    # 5. commit -> Subscribe delivery
    if wanted("delivery"):
        run_delivery(plan, db, results, servers, server_env, record, probed)
    # 6. administrators' work as the books grow
    if any(wanted(f"data_{name}") for name in ("settle", "export", "org_summary", "admin_summary", "list_balances")):
        db.checkpoint()
        scale.run(db, servers[0], plan.scale, stmt_member, plan.seed.statement_postings, record, wanted,
                  plan.scale_repeat, plan.list_walks)


def newest_sequence(db: BenchDatabase) -> int:
    with db.connect() as conn, conn.cursor() as cur:
        cur.execute("SELECT COALESCE(max(sequence), 0) FROM outbox_events")
        return cur.fetchone()[0]


def run_delivery(plan: Plan, db: BenchDatabase, results: dict, servers: list, server_env: dict, record,  # noqa: ANN001
                 probed: list[dict]) -> None:
    rows = results["scenarios"]
    orgs = list(range(1, plan.seed.organisations + 1))
    ok, why = load.run(load.subscribe_available(servers[0].target, newest_sequence(db)))
    if not ok:
        for name in ("delivery_one_process", "delivery_two_processes"):
            rows[name] = {"skipped": f"Subscribe not available on this server ({why})"}
        print(f"  delivery: skipped, Subscribe is not available ({why})", flush=True)
        return
    if len(servers) < 2:
        second = load.ServerProcess(db.url, env=server_env, name="server-b")
        servers.append(second)
        second.start()
    for name, sub_target in (("delivery_one_process", servers[0].target),
                             ("delivery_two_processes", servers[1].target)):
        db.checkpoint()
        probe = CommitProbe(db, PROBE_INTERVAL_S)
        probe.start()
        s = load.run(load.delivery(servers[0].target, sub_target, subscribers=plan.subscribers,
                                      after_sequence=newest_sequence(db), members=plan.seed.members, organisations=orgs,
                                      rate_per_s=plan.delivery_rate_per_s, duration_s=plan.delivery_s,
                                      warmup_s=plan.warmup_s))
        probed[0] = probe.stop()
        if s.errors:
            raise AssertionError(f"{name}: {s.errors} events were not delivered to every subscriber")
        record(name, s, throughput=False,
               note=f"{plan.subscribers} subscribers, {plan.delivery_rate_per_s:.0f} Pay/s; per delivered event")


if __name__ == "__main__":
    sys.exit(main())
