"""Subscribe streams that watch the event stream across failovers, and what they are compared with.

- `StreamWatch` keeps one Subscribe stream open in a thread; when the stream ends it subscribes again
  (a durable consumer: after its acknowledged sequence; otherwise after the last sequence it saw),
  as a careful consumer would. A durable one acknowledges as it goes.
- `audit()` compares what a watch received with the outbox as the database holds it at the end:
  events missing (gaps), events out of order within one stream, and numbers received for two
  different events (a number handed out again and delivered twice).
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field

import grpc
import psycopg2

from cobalt.payments.v1 import payments_pb2 as pb
from cobalt.payments.v1 import payments_pb2_grpc as pb_grpc

Identity = tuple[int, str, int]  # (kind, payment id, member id): what tells two events apart


def identity(kind: int | str, payment_id: str, member_id: int) -> Identity:
    kind_number = pb.EventKind.Value(kind) if isinstance(kind, str) else kind
    return kind_number, payment_id, member_id


class StreamWatch:
    def __init__(self, target: str, token: str, name: str, *, consumer: str = "", after_sequence: int = 0,
                 ack_every: int = 200, resubscribe_s: float = 0.2):
        self.target = target
        self.metadata = (("authorization", f"Bearer {token}"),)
        self.name = name
        self.consumer = consumer
        self.after_sequence = after_sequence
        self.ack_every = ack_every
        self.resubscribe_s = resubscribe_s
        self.received: dict[int, Identity] = {}
        self.reused: list[tuple[int, Identity, Identity]] = []  # a number received for two different events
        self.out_of_order = 0  # a sequence at or below the previous one within one stream
        self.subscriptions = 0
        self.endings: list[tuple[float, str]] = []  # (when, status) each time a stream ended
        self.last_seen = 0
        self._stop = threading.Event()
        self._call = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"watch-{name}", daemon=True)

    def start(self) -> StreamWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            if self._call is not None:
                self._call.cancel()
        self._thread.join(10)

    def wait_through(self, sequence: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while self.last_seen < sequence:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def _run(self) -> None:
        channel = grpc.insecure_channel(self.target)
        stub = pb_grpc.PaymentsServiceStub(channel)
        try:
            while not self._stop.is_set():
                after = 0 if self.consumer else max(self.after_sequence, self.last_seen)
                request = pb.SubscribeRequest(consumer=self.consumer, after_sequence=after)
                status = "ENDED"
                try:
                    with self._lock:
                        self._call = stub.Subscribe(request, metadata=self.metadata)
                    self.subscriptions += 1
                    previous = -1
                    unacked = 0
                    for ev in self._call:
                        seen = identity(ev.kind, ev.payment_id, ev.member_id)
                        if ev.sequence <= previous:
                            self.out_of_order += 1
                        previous = ev.sequence
                        known = self.received.get(ev.sequence)
                        if known is None:
                            self.received[ev.sequence] = seen
                        elif known != seen:
                            self.reused.append((ev.sequence, known, seen))
                        self.last_seen = max(self.last_seen, ev.sequence)
                        unacked += 1
                        if self.consumer and unacked >= self.ack_every:
                            self._ack(stub, ev.sequence)
                            unacked = 0
                except grpc.RpcError as err:
                    status = err.code().name
                self.endings.append((time.monotonic(), status))
                if self.consumer and self.last_seen:
                    self._ack(stub, self.last_seen)
                self._stop.wait(self.resubscribe_s)
        finally:
            channel.close()

    def _ack(self, stub: pb_grpc.PaymentsServiceStub, sequence: int) -> None:
        with contextlib.suppress(grpc.RpcError):  # an ack lost in a failover is sent again later
            stub.Ack(pb.AckRequest(consumer=self.consumer, sequence=sequence), metadata=self.metadata, timeout=5)


@dataclass
class StreamAudit:
    name: str
    expected: int  # events in the database in the range watched
    received: int
    missing: list[int] = field(default_factory=list)  # in the database, never received: gaps
    unknown: list[int] = field(default_factory=list)  # received, not in the database
    different: list[int] = field(default_factory=list)  # received as one event, stored as another
    reused: int = 0
    out_of_order: int = 0
    subscriptions: int = 0

    @property
    def gaps(self) -> int:
        return len(self.missing)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unknown or self.different or self.reused or self.out_of_order)

    def summary(self) -> str:
        return (f"{self.name}: {self.received}/{self.expected} events, gaps {self.gaps}, "
                f"not in the database {len(self.unknown)}, changed {len(self.different)}, "
                f"numbers received twice for different events {self.reused}, out of order {self.out_of_order}, "
                f"subscriptions {self.subscriptions}")


def stored_events(dsn: str, after: int, through: int | None = None) -> dict[int, Identity]:
    with contextlib.closing(psycopg2.connect(dsn)) as conn, conn.cursor() as cur:
        cur.execute("SELECT sequence, kind, payment_id, member_id FROM outbox_events WHERE sequence > %s "
                    "AND sequence <= coalesce(%s, sequence)", (after, through))
        return {seq: identity(kind, payment_id, member_id) for seq, kind, payment_id, member_id in cur.fetchall()}


def audit(name: str, stored: dict[int, Identity], received: dict[int, Identity], *, reused: int = 0,
          out_of_order: int = 0, subscriptions: int = 0) -> StreamAudit:
    result = StreamAudit(name, len(stored), len(received), reused=reused, out_of_order=out_of_order,
                         subscriptions=subscriptions)
    result.missing = sorted(set(stored) - set(received))
    result.unknown = sorted(set(received) - set(stored))
    result.different = sorted(seq for seq in set(stored) & set(received) if stored[seq] != received[seq])
    return result


def audit_watch(watch: StreamWatch, stored: dict[int, Identity]) -> StreamAudit:
    received = {seq: ev for seq, ev in watch.received.items() if seq > watch.after_sequence}
    return audit(watch.name, stored, received, reused=len(watch.reused), out_of_order=watch.out_of_order,
                 subscriptions=watch.subscriptions)


def read_resumed(target: str, token: str, after_sequence: int, through: int,
                 timeout_s: float = 10) -> dict[int, Identity]:
    """A stream resumed from a cursor, read until it passes `through` (or the time is up)."""
    got: dict[int, Identity] = {}
    with grpc.insecure_channel(target) as channel:
        call = pb_grpc.PaymentsServiceStub(channel).Subscribe(
            pb.SubscribeRequest(after_sequence=after_sequence), metadata=(("authorization", f"Bearer {token}"),),
            timeout=timeout_s)
        with contextlib.suppress(grpc.RpcError):
            for ev in call:
                if ev.sequence > through:
                    break
                got[ev.sequence] = identity(ev.kind, ev.payment_id, ev.member_id)
                if ev.sequence == through:
                    break
        call.cancel()
    return got
