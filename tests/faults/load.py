"""Retrying clients for the fault suite: closed-loop workers that pay members → organisations
through grpc.aio, each key retried with the SAME idempotency key until it gets an answer that
settles it (OK, or a refusal such as FAILED_PRECONDITION), as a careful real client would.

Every key carries itself in the payment's description (`f:<key>`), so the ledger can be asked
afterwards which keys were booked and how often (faults.invariants). Every attempt is recorded
(start, end, status), so a scenario can tell what clients saw and when payments resumed.

    load = PayLoad(target, token, Workload(members=range(1, 41), organisations=range(1, 9)), clients=16)
    load.start()
    ...inject a fault...
    load.stop()                # no new keys; keys in flight are retried until settled (or give up)
    load.report()              # acknowledged, refused, unsettled, counts by status code
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import grpc

from cobalt.payments.v1 import payments_pb2 as pb
from cobalt.payments.v1 import payments_pb2_grpc as pb_grpc

DESCRIPTION_PREFIX = "f:"
PATIENT_DEADLINE_S = 10.0

# Answers after which the same key is sent again: the outcome is unknown or the server is busy.
RETRY_CODES = frozenset({
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED,
    grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
})


# Each channel its own connection; after a lost connection, try again within 100-500 ms (gRPC's
# default waits 1 s, then longer and longer: the clients would measure their own back-off).
CHANNEL_OPTIONS = [
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
]


@dataclass(frozen=True)
class Workload:
    """Who pays whom: members pay organisations, amounts in cents."""

    members: tuple[int, ...]
    organisations: tuple[int, ...]
    min_cents: int = 100
    max_cents: int = 2_000

    @classmethod
    def of(cls, members: Iterable[int], organisations: Iterable[int], **kw: int) -> Workload:
        return cls(tuple(members), tuple(organisations), **kw)


@dataclass
class Attempt:
    started: float  # time.monotonic()
    ended: float
    code: str  # "OK" or a grpc.StatusCode name


@dataclass
class KeyRecord:
    key: str
    member_id: int
    organisation_id: int
    amount_cents: int
    attempts: list[Attempt] = field(default_factory=list)
    final: str | None = None  # "OK", a refusal's code name, or None while unsettled

    @property
    def acked(self) -> bool:
        return self.final == "OK"

    @property
    def acked_at(self) -> float | None:
        return self.attempts[-1].ended if self.acked else None


def pay_request(key: str, member_id: int, organisation_id: int, amount_cents: int) -> pb.PayRequest:
    return pb.PayRequest(idempotency_key=key, member_id=member_id, organisation_id=organisation_id,
                         amount_cents=amount_cents, description=f"{DESCRIPTION_PREFIX}{key}",
                         route_code="FAULTS", route_payload=key)


class PayLoad:
    """`clients` workers, each with one call in flight at a time, on one event loop in a thread.
    `deadline_s` is each attempt's deadline, or a (low, high) range it is drawn from."""

    def __init__(self, target: str, token: str, workload: Workload, *, clients: int = 16,
                 deadline_s: float | tuple[float, float] = 5.0, retry: bool = True, settle_timeout_s: float = 60.0,
                 backoff_s: tuple[float, float] = (0.02, 0.5), rate_per_client: float | None = None,
                 choose: Callable[[random.Random, Workload], tuple[int, int]] | None = None,
                 seed: int = 1, channels: int = 4):
        self.target = target
        self.metadata = (("authorization", f"Bearer {token}"),)
        self.workload = workload
        self.clients = clients
        self.deadline_s = deadline_s
        self.retry = retry
        self.settle_timeout_s = settle_timeout_s
        self.backoff_s = backoff_s
        self.rate_per_client = rate_per_client
        self.choose = choose or (lambda rng, w: (rng.choice(w.members), rng.choice(w.organisations)))
        self.rng = random.Random(seed)
        self.channel_count = channels
        self.records: dict[str, KeyRecord] = {}
        self.codes: Counter[str] = Counter()  # every attempt's answer
        self.started_at = 0.0
        self.stopped_at = 0.0
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._done = threading.Event()
        self._error: BaseException | None = None

    # ------------------------------------------------------------ running
    def start(self) -> PayLoad:
        self._thread = threading.Thread(target=self._run_thread, name="pay-load", daemon=True)
        self._thread.start()
        while self._loop is None and not self._done.is_set():
            time.sleep(0.005)
        self.started_at = time.monotonic()
        return self

    def stop(self, timeout_s: float | None = None) -> None:
        """No new keys; wait until each key in flight is settled (or the settle timeout passes)."""
        self._stopping = True
        self.stopped_at = time.monotonic()
        self._done.wait((timeout_s or self.settle_timeout_s) + 30)
        if self._error is not None:
            raise self._error

    def _run_thread(self) -> None:
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._main(loop))
        except BaseException as exc:  # noqa: BLE001 - handed to stop()
            self._error = exc
        finally:
            loop.close()
            self._done.set()

    async def _main(self, loop: asyncio.AbstractEventLoop) -> None:
        channels = [grpc.aio.insecure_channel(self.target, options=CHANNEL_OPTIONS) for _ in range(self.channel_count)]
        stubs = [pb_grpc.PaymentsServiceStub(c) for c in channels]
        self._loop = loop
        try:
            await asyncio.gather(*(self._worker(stubs[i % len(stubs)], i) for i in range(self.clients)))
        finally:
            for c in channels:
                await c.close()

    async def _worker(self, stub: pb_grpc.PaymentsServiceStub, index: int) -> None:
        rng = random.Random(self.rng.random())
        period = 1.0 / self.rate_per_client if self.rate_per_client else 0.0
        while not self._stopping:
            began = time.monotonic()
            member_id, organisation_id = self.choose(rng, self.workload)
            record = KeyRecord(uuid.uuid4().hex, member_id, organisation_id,
                               rng.randint(self.workload.min_cents, self.workload.max_cents))
            self.records[record.key] = record
            await self.settle(stub, record, rng)
            if period:
                await asyncio.sleep(max(0.0, period - (time.monotonic() - began)))

    async def settle(self, stub: pb_grpc.PaymentsServiceStub, record: KeyRecord, rng: random.Random, *,
                     patient: bool = False) -> None:
        """Send the key until an answer settles it; after stop(), give up at the settle timeout.
        `patient`: with a long deadline, always retried, never given up."""
        request = pay_request(record.key, record.member_id, record.organisation_id, record.amount_cents)
        tries = 0
        while True:
            started = time.monotonic()
            if patient:
                deadline_s = PATIENT_DEADLINE_S
            elif isinstance(self.deadline_s, float | int):
                deadline_s = self.deadline_s
            else:
                deadline_s = rng.uniform(*self.deadline_s)
            try:
                await stub.Pay(request, metadata=self.metadata, timeout=deadline_s)
                code = "OK"
            except grpc.aio.AioRpcError as err:
                code = err.code().name
            record.attempts.append(Attempt(started, time.monotonic(), code))
            self.codes[code] += 1
            if code == "OK" or grpc.StatusCode[code] not in RETRY_CODES:
                record.final = code
                return
            if not patient and not self.retry:
                return
            if not patient and self._stopping and time.monotonic() - self.stopped_at > self.settle_timeout_s:
                return
            tries += 1
            low, high = self.backoff_s
            if code == "RESOURCE_EXHAUSTED":  # the server asks for room: give it some
                low, high = max(low, 0.1), max(high, 1.0)
            await asyncio.sleep(rng.uniform(0, min(high, low * 2 ** min(tries, 8))))

    def settle_the_rest(self, clients: int = 16) -> None:
        """After stop(): a patient client sends every key still unsettled (same key, long deadline)
        until each is settled, so that the ledger can be compared with final answers."""
        pending = self.unsettled()
        if not pending:
            return

        async def run() -> None:
            channel = grpc.aio.insecure_channel(self.target, options=CHANNEL_OPTIONS)
            stub = pb_grpc.PaymentsServiceStub(channel)
            queue: asyncio.Queue[KeyRecord] = asyncio.Queue()
            for record in pending:
                queue.put_nowait(record)

            async def worker(seed: int) -> None:
                rng = random.Random(seed)
                while not queue.empty():
                    await self.settle(stub, queue.get_nowait(), rng, patient=True)

            try:
                await asyncio.gather(*(worker(i) for i in range(clients)))
            finally:
                await channel.close()

        asyncio.run(run())

    # ------------------------------------------------------------ results
    def acked(self) -> list[KeyRecord]:
        return [r for r in list(self.records.values()) if r.acked]

    def unsettled(self) -> list[KeyRecord]:
        return [r for r in list(self.records.values()) if r.final is None]

    def ack_times(self) -> list[float]:
        return sorted(r.acked_at for r in list(self.records.values()) if r.acked)  # type: ignore[misc]

    def first_ack_of_attempt_after(self, t: float) -> float | None:
        """When the first attempt sent after `t` was answered OK (None if none was)."""
        found = [a.ended for r in list(self.records.values()) for a in r.attempts if a.code == "OK" and a.started >= t]
        return min(found) if found else None

    def acks_between(self, t0: float, t1: float, organisations: Iterable[int] | None = None) -> int:
        wanted = set(organisations) if organisations is not None else None
        return sum(1 for r in list(self.records.values())
                   if r.acked and t0 <= r.acked_at < t1  # type: ignore[operator]
                   and (wanted is None or r.organisation_id in wanted))

    def codes_between(self, t0: float, t1: float) -> Counter[str]:
        return Counter(a.code for r in list(self.records.values()) for a in r.attempts if t0 <= a.ended < t1)

    def report(self) -> dict:
        return {
            "keys": len(self.records),
            "acknowledged": len(self.acked()),
            "refused": sum(1 for r in list(self.records.values()) if r.final not in (None, "OK")),
            "unsettled": len(self.unsettled()),
            "codes": dict(self.codes),
        }


class HealthWatch:
    """Samples health ("" and the service) every `interval_s` in a thread: [(t, overall, service)]."""

    def __init__(self, target: str, service: str, interval_s: float = 0.1):
        self.target = target
        self.service = service
        self.interval_s = interval_s
        self.samples: list[tuple[float, str, str]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> HealthWatch:
        self._thread = threading.Thread(target=self._run, name="health-watch", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _run(self) -> None:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        channel = grpc.insecure_channel(self.target)
        stub = health_pb2_grpc.HealthStub(channel)

        def check(name: str) -> str:
            try:
                resp = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=0.5)
                return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
            except grpc.RpcError as err:
                return err.code().name

        try:
            while not self._stop.is_set():
                self.samples.append((time.monotonic(), check(""), check(self.service)))
                self._stop.wait(self.interval_s)
        finally:
            channel.close()

    def first(self, status: str, after: float) -> float | None:
        """When both names first showed `status` at or after `after`."""
        for t, overall, service in self.samples:
            if t >= after and overall == status and service == status:
                return t
        return None

    def serving_while(self, t0: float, t1: float) -> int:
        """Samples in [t0, t1) where either name said SERVING."""
        return sum(1 for t, o, s in self.samples if t0 <= t < t1 and "SERVING" in (o, s))
