"""Does an audience slow Pay down? Pay throughput and latency with 0 and with 100 open Subscribe streams.

    .venv/bin/python tests/perf_events_subscribers.py [--database-url URL] [--seconds 8] [--payers 8]

Starts one `payments-server` process, a payer (threads in this process) and, for the subscribed runs, a
separate process holding the streams; besides throughput and latency it reports the server process's CPU time per
Pay, which a machine busy with other work disturbs less. Scenarios: no subscriber; 100 subscribers each filtering its own
route code (each sees about 1 % of the events, the usual shape: one app, one route); 100 subscribers
receiving every event (worst case: 100 × the event rate leaves the server). Not a test: it only prints.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from conftest import AUTH_SPEC, PG_URL, TOKENS  # noqa: E402

from clients.payments_client import PaymentsClient  # noqa: E402
from cobalt.payments.v1 import payments_pb2 as pb  # noqa: E402
from cobalt.payments.v1 import payments_pb2_grpc as pb_grpc  # noqa: E402

ROUTES = [f"R{i:02d}" for i in range(100)]
MEMBERS = range(1, 201)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_server(database_url: str, log_path: Path) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, PAYMENTS_DATABASE_URL=database_url, PAYMENTS_GRPC_ADDR="127.0.0.1:0",
               PAYMENTS_AUTH_TOKENS=AUTH_SPEC)
    log = open(log_path, "wb")  # noqa: SIM115
    proc = subprocess.Popen([str(ROOT / ".venv" / "bin" / "payments-server")], env=env, stdout=log,
                            stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for line in log_path.read_text().splitlines():
            if '"serving"' in line:
                return proc, f"127.0.0.1:{json.loads(line)['port']}"
        time.sleep(0.05)
    raise SystemExit("server did not start")


def subscriber_process(target: str, count: int, filtered: bool, ready, stop, received) -> None:  # noqa: ANN001
    async def one(stub, i: int) -> None:  # noqa: ANN001
        request = pb.SubscribeRequest(after_sequence=-1, route_codes=[ROUTES[i % 100]] if filtered else [])
        call = stub.Subscribe(request, metadata=(("authorization", f"Bearer {TOKENS['app']}"),))
        try:
            async for _ in call:
                with received.get_lock():
                    received.value += 1
        except grpc.aio.AioRpcError:
            pass

    async def main() -> None:
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.PaymentsServiceStub(channel)
            tasks = [asyncio.create_task(one(stub, i)) for i in range(count)]
            await asyncio.sleep(1.0)
            ready.set()
            while not stop.is_set():
                await asyncio.sleep(0.1)
            for t in tasks:
                t.cancel()

    asyncio.run(main())


def pay_for(target: str, seconds: float, payers: int) -> dict:
    latencies: list[float] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def payer(n: int) -> None:
        mine = []
        with PaymentsClient(target, TOKENS["app"]) as app:
            i = n
            while time.monotonic() < stop_at:
                member = MEMBERS[i % len(MEMBERS)]
                t0 = time.perf_counter()
                app.pay(member, 1, organisation_id=7, route_code=ROUTES[i % 100])
                mine.append(time.perf_counter() - t0)
                i += payers
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=payer, args=(n,)) for n in range(payers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    latencies.sort()
    return {
        "pays_per_s": round(len(latencies) / seconds, 1),
        "p50_ms": round(statistics.median(latencies) * 1000, 1),
        "p99_ms": round(latencies[int(len(latencies) * 0.99) - 1] * 1000, 1),
    }


def delivery_latency(target: str, count: int = 50) -> dict:
    """From a Pay's response to its event reaching a subscriber on the same server (paced Pays)."""
    arrived: dict[str, float] = {}
    with PaymentsClient(target, TOKENS["app"]) as app:
        call = app.stream("Subscribe", pb.SubscribeRequest(after_sequence=-1, route_codes=["LAT"]))

        def read() -> None:
            try:
                for ev in call:
                    arrived[ev.payment_id] = time.perf_counter()
            except grpc.RpcError:
                pass

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        time.sleep(1.0)
        answered = {}
        for i in range(count):
            resp = app.pay(MEMBERS[i % len(MEMBERS)], 1, organisation_id=7, route_code="LAT")
            answered[resp.payment_id] = time.perf_counter()
            time.sleep(0.05)
        time.sleep(1.0)
        call.cancel()
        reader.join(5)
    delays = sorted((arrived[k] - t) * 1000 for k, t in answered.items() if k in arrived)
    return {"events": len(delays), "of": count, "p50_ms": round(statistics.median(delays), 1),
            "max_ms": round(delays[-1], 1)}


def run(database_url: str, seconds: float, payers: int, rounds: int) -> None:
    tmp = Path(tempfile.mkdtemp())
    proc, target = start_server(database_url, tmp / "server.log")
    try:
        with PaymentsClient(target, TOKENS["admin"]) as admin:
            admin.upsert_organisation(7, "Club")
            for m in MEMBERS:
                admin.adjust(10_000_000, "credit", member_id=m)
        pay_for(target, 2, payers)  # warm up
        print(json.dumps({"delivery_latency": delivery_latency(target)}), flush=True)
        scenarios = [("0 subscribers", 0, True), ("1 subscriber, own route", 1, True),
                     ("100 subscribers, own route each", 100, True),
                     ("100 subscribers, every event", 100, False)]
        for r in range(rounds):
            for name, count, filtered in scenarios:
                ready, stop = multiprocessing.Event(), multiprocessing.Event()
                received = multiprocessing.Value("q", 0)
                sub = None
                if count:
                    sub = multiprocessing.Process(target=subscriber_process,
                                                  args=(target, count, filtered, ready, stop, received))
                    sub.start()
                    ready.wait(30)
                cpu_before = cpu_seconds(proc.pid)
                figures = pay_for(target, seconds, payers)
                pays = figures["pays_per_s"] * seconds
                figures["server_cpu_ms_per_pay"] = round((cpu_seconds(proc.pid) - cpu_before) * 1000 / pays, 2)
                time.sleep(1.0)
                stop.set()
                if sub is not None:
                    sub.join(10)
                print(json.dumps({"round": r + 1, "scenario": name, **figures,
                                  "events_delivered": received.value}), flush=True)
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", default="", help="default: a fresh database on the test PostgreSQL")
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--payers", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if args.database_url:
        run(args.database_url, args.seconds, args.payers, args.rounds)
        return
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"payments_perf_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        run(make_url(PG_URL).set(database=name).render_as_string(hide_password=False), args.seconds,
            args.payers, args.rounds)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


if __name__ == "__main__":
    main()
