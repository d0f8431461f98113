"""Server processes and gRPC load: closed loops with a fixed number of requests in flight, and
the commit → Subscribe delivery measurement."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import TypeVar

import grpc
import uvloop
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.stats import Samples
from cobalt.payments.v1 import payments_pb2 as pb
from cobalt.payments.v1 import payments_pb2_grpc as pb_grpc

T = TypeVar("T")

APP_TOKEN = "bench-app-" + uuid.uuid4().hex
ADMIN_TOKEN = "bench-admin-" + uuid.uuid4().hex
AUTH_SPEC = f"{APP_TOKEN}=bench-app:app,{ADMIN_TOKEN}=bench-admin:admin"
APP_METADATA = (("authorization", f"Bearer {APP_TOKEN}"),)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command() -> list[str]:
    script = Path(sys.executable).parent / "payments-server"
    return [str(script)] if script.exists() else [sys.executable, "-m", "server"]


class ServerProcess:
    """`payments-server` as its own process, so the load does not share its interpreter lock."""

    def __init__(self, database_url: str, *, env: dict[str, str] | None = None, name: str = "server",
                 source_dir: str | None = None, module: str = ""):
        self.database_url = database_url
        self.source_dir = source_dir  # run `python -m server` from this checkout instead (A/B of versions)
        self.module = module  # run `python -m <module>` instead (bench.grpc_floor)
        self.extra_env = env or {}
        self.name = name
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.log_path = Path(tempfile.gettempdir()) / f"payments-bench-{name}-{os.getpid()}.log"

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60.0) -> None:
        self.port = free_port()
        env = dict(os.environ)
        env.update({
            "PAYMENTS_DATABASE_URL": self.database_url,
            "PAYMENTS_GRPC_ADDR": self.target,
            "PAYMENTS_AUTH_TOKENS": AUTH_SPEC,
            **self.extra_env,
        })
        log = open(self.log_path, "wb")  # noqa: SIM115
        # the per-call log lines go to stdout: discard them, keep errors for the report
        if self.module:
            command = [sys.executable, "-m", self.module]
        else:
            command = [sys.executable, "-m", "server"] if self.source_dir else server_command()
        cwd = self.source_dir or (str(Path(__file__).resolve().parent.parent) if self.module else None)
        self.proc = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=log)
        log.close()
        deadline = time.monotonic() + timeout_s
        with grpc.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self.log_tail()}")
                try:
                    resp = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                    if resp.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} did not become healthy: {self.log_tail()}")
                time.sleep(0.1)

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None
        try:
            self.log_path.unlink()
        except OSError:
            pass


class Profiler:
    """py-spy recording a server process for `duration_s`: a flame graph (SVG) of where its Python
    held the interpreter lock, sampled without pausing it."""

    def __init__(self, server: ServerProcess, out: Path, duration_s: float):
        self.out = out
        out.parent.mkdir(parents=True, exist_ok=True)
        spy = Path(sys.executable).parent / "py-spy"
        self.proc: subprocess.Popen | None = None
        self.problem = ""
        if server.proc is None or not spy.exists():
            self.problem = "py-spy is not installed" if server.proc is not None else "no server process"
            return
        self.proc = subprocess.Popen(
            [str(spy), "record", "--gil", "--nonblocking", "--rate", "200", "--format", "flamegraph",
             "--output", str(out), "--pid", str(server.proc.pid), "--duration", str(max(1, round(duration_s)))],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def finish(self) -> str:
        """The SVG's path, or why there is none (py-spy may not be allowed to attach here)."""
        if self.proc is None:
            return f"not profiled: {self.problem}"
        try:
            _, err = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return "not profiled: py-spy did not finish"
        if self.proc.returncode != 0 or not self.out.exists():
            return f"not profiled: {(err or '').strip().splitlines()[-1:] or ['py-spy failed']}"
        return self.out.name  # beside the run's JSON


Call = Callable[[pb_grpc.PaymentsServiceStub, random.Random], Awaitable[object]]


def run(coro: Coroutine[object, object, T]) -> T:
    """Run the load on uvloop, as the server runs: on a two-core machine the load generator's own
    CPU is taken from the system under test, so it should spend as little as it can."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


async def closed_loop(targets: list[str], make_call: Call, *, in_flight: int, duration_s: float,
                      warmup_s: float = 0.0) -> Samples:
    """`in_flight` workers, each sending the next request as soon as its last one answered."""
    channels = [grpc.aio.insecure_channel(t) for t in targets]
    stubs = [pb_grpc.PaymentsServiceStub(c) for c in channels]
    samples = Samples()
    first_error: list[BaseException] = []
    try:
        if warmup_s > 0:
            await _loop(stubs, make_call, in_flight, warmup_s, Samples(), first_error)
        samples.started()
        await _loop(stubs, make_call, in_flight, duration_s, samples, first_error)
        samples.stopped()
    finally:
        for c in channels:
            await c.close()
    if first_error and samples.errors > len(samples.latencies_s) // 100:
        raise RuntimeError(f"{samples.errors} requests failed; first: {first_error[0]!r}")
    return samples


async def _loop(stubs: list, make_call: Call, in_flight: int, duration_s: float, samples: Samples,
                first_error: list[BaseException]) -> None:
    stop_at = time.perf_counter() + duration_s

    async def worker(i: int) -> None:
        rng = random.Random(i * 7919 + int(time.time()))
        stub = stubs[i % len(stubs)]
        latencies = []
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            try:
                await make_call(stub, rng)
            except grpc.aio.AioRpcError as exc:
                samples.errors += 1
                if not first_error:
                    first_error.append(exc)
                continue
            latencies.append(time.perf_counter() - t0)
        samples.extend(latencies)

    await asyncio.gather(*(worker(i) for i in range(in_flight)))


# ---------------------------------------------------------------------- calls
def pay_call(members: int, organisations: list[int], route_code: str = "EVT") -> Call:
    def call(stub, rng: random.Random):  # noqa: ANN001, ANN202
        return stub.Pay(
            pb.PayRequest(
                idempotency_key=uuid.uuid4().hex,
                member_id=rng.randint(1, members),
                organisation_id=rng.choice(organisations),
                amount_cents=rng.randint(100, 1000),
                description="Congress entry",
                route_code=route_code,
            ),
            metadata=APP_METADATA,
            timeout=30,
        )

    return call


def transfer_call(members: int) -> Call:
    def call(stub, rng: random.Random):  # noqa: ANN001, ANN202
        a, b = rng.sample(range(1, members + 1), 2)
        req = pb.TransferRequest(idempotency_key=uuid.uuid4().hex, to_member_id=b, amount_cents=rng.randint(100, 500),
                                 description="Table money")
        getattr(req, "from").member_id = a
        return stub.Transfer(req, metadata=APP_METADATA, timeout=30)

    return call


def balance_call(members: int) -> Call:
    def call(stub, rng: random.Random):  # noqa: ANN001, ANN202
        return stub.GetBalance(pb.GetBalanceRequest(account=pb.AccountRef(member_id=rng.randint(1, members))),
                               metadata=APP_METADATA, timeout=30)

    return call


def statement_call(member_id: int, page_token: str, page_size: int = 50) -> Call:
    async def call(stub, rng: random.Random):  # noqa: ANN001, ANN202
        resp = await stub.GetStatement(
            pb.GetStatementRequest(account=pb.AccountRef(member_id=member_id), page_size=page_size,
                                   page_token=page_token),
            metadata=APP_METADATA, timeout=30,
        )
        if len(resp.lines) != page_size:
            raise RuntimeError(f"statement page has {len(resp.lines)} lines, not {page_size}")
        return resp

    return call


# ---------------------------------------------------------------------- Subscribe delivery
async def subscribe_available(target: str, after_sequence: int) -> tuple[bool, str]:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.PaymentsServiceStub(channel)
        call = stub.Subscribe(pb.SubscribeRequest(route_codes=["NONE"], after_sequence=after_sequence),
                              metadata=APP_METADATA, timeout=1.0)
        try:
            async for _ in call:
                break
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                return True, ""
            return False, f"{exc.code().name}: {exc.details()}"
        return True, ""


async def _pay_at(stub, call: Call, rate_per_s: float, duration_s: float) -> int:  # noqa: ANN001
    """Pay at a steady rate for `duration_s`; how many were paid."""
    rng = random.Random(42)
    stop_at = time.perf_counter() + duration_s
    interval = 1.0 / rate_per_s
    next_at = time.perf_counter()
    pending = []
    while time.perf_counter() < stop_at:
        pending.append(asyncio.ensure_future(call(stub, rng)))
        next_at += interval
        await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
    await asyncio.gather(*pending)
    return len(pending)


async def delivery(pay_target: str, sub_target: str, *, subscribers: int, after_sequence: int, members: int,
                   organisations: list[int], rate_per_s: float, duration_s: float, warmup_s: float = 0.0) -> Samples:
    """Open `subscribers` streams on `sub_target` filtered to one route code, pay at a steady rate
    through `pay_target`, and time each event from its commit-time stamp (taken inside the paying
    transaction, so the figure includes the commit itself) to its arrival at each subscriber. For
    `warmup_s` first, the same payments under another route code: the streams' server reads them
    (and the paying one books them) but no stream is sent them, and they are not timed."""
    route = "DLV" + uuid.uuid4().hex[:6].upper()
    samples = Samples()
    sub_channel = grpc.aio.insecure_channel(sub_target)
    pay_channel = grpc.aio.insecure_channel(pay_target)
    sub_stub = pb_grpc.PaymentsServiceStub(sub_channel)
    pay_stub = pb_grpc.PaymentsServiceStub(pay_channel)
    expected = 0
    received: list[int] = [0]
    latencies: list[float] = []

    async def subscriber() -> None:
        call = sub_stub.Subscribe(pb.SubscribeRequest(route_codes=[route], after_sequence=after_sequence),
                                  metadata=APP_METADATA)
        try:
            async for ev in call:
                now = time.time()
                latencies.append(now - (ev.time.seconds + ev.time.nanos / 1e9))
                received[0] += 1
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                raise

    tasks = [asyncio.create_task(subscriber()) for _ in range(subscribers)]
    try:
        await asyncio.sleep(1.0)  # let every stream reach its live phase
        if warmup_s > 0:
            await _pay_at(pay_stub, pay_call(members, organisations, route_code=route + "W"), rate_per_s, warmup_s)
        samples.started()
        expected = await _pay_at(pay_stub, pay_call(members, organisations, route_code=route), rate_per_s, duration_s)
        deadline = time.perf_counter() + 5.0
        while received[0] < expected * subscribers and time.perf_counter() < deadline:
            await asyncio.sleep(0.05)
        samples.stopped()
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await sub_channel.close()
        await pay_channel.close()
    samples.extend(latencies)
    samples.errors = expected * subscribers - received[0]
    return samples
