"""The fault scenarios of SPEC §10, each against a server subprocess on a database of the suite's
own cluster, with retrying clients and the ledger check at the end. Each answers a `Result`:
what clients were told, what the ledger holds, and the checks that decide whether it passed.

`quick=True` runs a shorter version of a scenario (the `make test` cases); the timing targets
(shutdown within grace + 1 s, health within 2 s, half the throughput of the other clubs) are
checked in the full runs (`make faults`) only, where the machine is not shared with the unit tests.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import psycopg2

from cobalt.payments.v1 import payments_pb2 as pb
from cobalt.payments.v1 import payments_pb2_grpc as pb_grpc
from faults.invariants import LedgerCheck
from faults.load import HealthWatch, PayLoad, Workload
from faults.pgcluster import PgCluster
from faults.rig import Rig
from faults.serverproc import SERVICE_NAME, TOKENS, ServerExited, ServerProc

ORG_ACCOUNT_KIND = 2  # server.domain.types.AccountKind.ORGANISATION


@dataclass
class Result:
    name: str
    acknowledged: int = 0
    lost: int = 0
    doubled: int = 0
    recovery_s: float | None = None
    codes: Counter = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # checks that did not hold
    timing_failures: list[str] = field(default_factory=list)  # timing targets missed (full runs only)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return not self.failures and not self.timing_failures

    def expect(self, ok: bool, what: str) -> None:
        if not ok:
            self.failures.append(what)

    def expect_timing(self, ok: bool, what: str) -> None:
        if not ok:
            self.timing_failures.append(what)

    def ledger(self, check: LedgerCheck, loads: list[PayLoad]) -> None:
        self.acknowledged += sum(len(load.acked()) for load in loads)
        self.lost += len(check.lost)
        self.doubled += len(check.doubled)
        for load in loads:
            self.codes.update(load.codes)
        self.expect(not check.lost, f"{len(check.lost)} acknowledged payments lost")
        self.expect(not check.doubled, f"{len(check.doubled)} keys booked twice")
        self.expect(not check.booked_refused, f"{len(check.booked_refused)} refused keys booked")
        for problem in check.problems:
            self.failures.append(problem)
        unsettled = sum(len(load.unsettled()) for load in loads)
        if unsettled:
            self.notes.append(f"{unsettled} keys unsettled when the clients gave up")
        self.expect(self.codes.get("INTERNAL", 0) == 0, f"{self.codes.get('INTERNAL')} calls answered INTERNAL")


def _sleep(seconds: float) -> None:
    time.sleep(seconds)


def _recovery(load: PayLoad, fault_at: float, fault_over: float) -> float | None:
    """From the fault until a payment first sent after it was over was acknowledged."""
    back = load.first_ack_of_attempt_after(fault_over)
    return None if back is None else round(back - fault_at, 2)


# ---------------------------------------------------------------------------- server killed
def kill9_under_load(pg: PgCluster, quick: bool = False) -> Result:
    """kill -9 of the server under load, twice; started again on the same port each time."""
    result = Result("kill -9 of the server under load")
    with Rig(pg, "kill9") as rig:
        load = rig.pay_load(clients=16).start()
        faults = []
        for _ in range(1 if quick else 2):
            _sleep(2 if quick else 4)
            fault_at = time.monotonic()
            rig.server.kill()
            rig.server.spawn()
            rig.server.wait_serving()
            faults.append(fault_at)
        _sleep(2 if quick else 4)
        load.stop()
        recoveries = [_recovery(load, t, t) for t in faults]
        result.ledger(rig.check(load), [load])
        result.recovery_s = max((r for r in recoveries if r is not None), default=None)
        result.expect(all(r is not None for r in recoveries), "no payment went through after a restart")
    return result


# ---------------------------------------------------------------------------- database restarts
def pg_restart_under_load(pg: PgCluster, mode: str, quick: bool = False, down_s: float = 0.0) -> Result:
    """PostgreSQL stopped (`fast`: clean; `immediate`: a crash) and started again under load;
    the server is not restarted. Health must follow the database."""
    label = {"fast": "PostgreSQL fast restart under load", "immediate": "PostgreSQL immediate stop under load"}[mode]
    result = Result(label)
    with Rig(pg, f"pg{mode}") as rig:
        watch = HealthWatch(rig.server.target, SERVICE_NAME, interval_s=0.05).start()
        load = rig.pay_load(clients=16).start()
        _sleep(2 if quick else 4)
        fault_at = time.monotonic()
        pg.stop(mode)
        stopped_at = time.monotonic()
        if down_s:
            _sleep(down_s)
        restart_at = time.monotonic()
        pg.start()
        started_at = time.monotonic()
        _sleep(3 if quick else 5)
        load.stop()
        watch.stop()
        result.ledger(rig.check(load), [load])
        result.recovery_s = _recovery(load, fault_at, started_at)
        result.expect(result.recovery_s is not None, "no payment went through after the restart")
        result.expect(load.first_ack_of_attempt_after(started_at) is not None, "payments did not resume")
        served_again = watch.first("SERVING", started_at)
        result.expect(served_again is not None, "health did not say SERVING after the database came back")
        if served_again is not None:
            result.notes.append(f"health SERVING {served_again - started_at:.2f} s after PostgreSQL was up")
            if not quick:
                result.expect_timing(served_again - started_at <= 2.0, "health SERVING more than 2 s after the restart")
        if down_s:  # the database was down long enough for health to see it
            not_serving = watch.first("NOT_SERVING", fault_at)
            result.expect(not_serving is not None and not_serving < restart_at + 0.1,
                          "health did not say NOT_SERVING while the database was down")
            if not_serving is not None:
                result.notes.append(f"health NOT_SERVING {not_serving - stopped_at:.2f} s after PostgreSQL stopped")
                if not quick:
                    result.expect_timing(not_serving - stopped_at <= 2.0, "health NOT_SERVING more than 2 s late")
    return result


# ---------------------------------------------------------------------------- shutdown
def hold_org_row(pg: PgCluster, dbname: str, organisation_id: int) -> psycopg2.extensions.connection:
    """A transaction holding organisation `organisation_id`'s account row FOR UPDATE (close or roll
    back the connection to release it)."""
    conn = psycopg2.connect(pg.dsn(dbname))
    with conn.cursor() as cur:
        cur.execute("SELECT id FROM accounts WHERE kind = %s AND ext_id = %s FOR UPDATE",
                    (ORG_ACCOUNT_KIND, organisation_id))
        assert cur.fetchone() is not None, f"no account for organisation {organisation_id}"
    return conn


def sigterm_with_calls_blocked(pg: PgCluster, quick: bool = False, grace_s: int = 2) -> Result:
    """Calls blocked on a locked row when SIGTERM comes: the process exits within grace + 1 s,
    the cut-off calls commit nothing (even once the lock goes), and their retries, sent to the
    server started again, book each key once."""
    result = Result("SIGTERM with calls blocked on a lock")
    # A lock timeout longer than the test: the calls are still blocked when the grace ends.
    with Rig(pg, "sigterm", PAYMENTS_SHUTDOWN_GRACE_S=str(grace_s), PAYMENTS_LOCK_TIMEOUT_MS="60000") as rig:
        holder = hold_org_row(pg, rig.dbname, 1)
        try:
            blocked = rig.pay_load(clients=8, workload=Workload(rig.members, (1,)), deadline_s=30,
                                   settle_timeout_s=30, backoff_s=(0.2, 1.0)).start()
            others = rig.pay_load(clients=4, workload=Workload(rig.members, rig.organisations[1:]),
                                  deadline_s=5, settle_timeout_s=30, seed=2).start()
            _sleep(1.5)
            code, took_s = rig.server.terminate(timeout_s=30)
            result.notes.append(f"exit code {code} {took_s:.2f} s after SIGTERM (grace {grace_s} s)")
            result.recovery_s = round(took_s, 2)
            result.expect(code == 0, f"exit code {code}")
            if not quick:
                result.expect_timing(took_s <= grace_s + 1.0, f"exit took {took_s:.2f} s, over grace + 1 s")
            in_flight_keys = [r.key for r in blocked.records.values() if r.final is None]
        finally:
            holder.rollback()  # the lock goes: a cut-off call that were still alive would commit now
            holder.close()
        _sleep(1.0)
        booked_before_restart = rig.check().booked
        committed_late = [k for k in in_flight_keys if booked_before_restart.get(k)]
        result.expect(not committed_late, f"{len(committed_late)} cut-off calls committed after the exit")
        result.notes.append(f"{len(in_flight_keys)} calls blocked at SIGTERM")
        rig.server.start()  # the clients' retries settle every key
        blocked.stop()
        others.stop()
        result.ledger(rig.check(blocked, others), [blocked, others])
    return result


# ---------------------------------------------------------------------------- one locked account
def locked_account(pg: PgCluster, quick: bool = False, hold_s: float = 10.0, **server_env: str) -> Result:
    """One organisation's row held FOR UPDATE for `hold_s`: Pays to the 7 other clubs keep at
    least half their throughput; Pays to the locked one wait at most the lock timeout and are
    retried, and go through once it is released."""
    result = Result("one club locked while others pay")
    if quick:
        hold_s = 4.0
    with Rig(pg, "locked", **server_env) as rig:
        others_orgs = rig.organisations[1:]
        others = rig.pay_load(clients=16, workload=Workload(rig.members, others_orgs)).start()
        locked = rig.pay_load(clients=4, workload=Workload(rig.members, (1,)), seed=3).start()
        _sleep(2 if quick else 4)
        base_t0 = time.monotonic() - (1.5 if quick else 3.0)
        baseline = others.acks_between(base_t0, time.monotonic()) / (time.monotonic() - base_t0)
        holder = hold_org_row(pg, rig.dbname, 1)
        locked_at = time.monotonic()
        _sleep(hold_s)
        released_at = time.monotonic()
        holder.rollback()
        holder.close()
        _sleep(2 if quick else 3)
        others.stop()
        locked.stop()
        during = others.acks_between(locked_at, released_at) / (released_at - locked_at)
        share = during / baseline if baseline else 0.0
        result.notes.append(f"other clubs: {baseline:.0f}/s before, {during:.0f}/s while club 1 was locked "
                            f"({share:.0%})")
        result.recovery_s = _recovery(locked, locked_at, released_at)
        result.expect(during > 0, "no Pay to another club went through while one club was locked")
        if not quick:
            result.expect_timing(share >= 0.5, f"other clubs kept {share:.0%} of their throughput, under 50 %")
        result.ledger(rig.check(others, locked), [others, locked])
    return result


# ---------------------------------------------------------------------------- deadlines and overload
def short_deadlines(pg: PgCluster, quick: bool = False) -> Result:
    """Calls with deadlines of 1 to 20 ms, not retried at once: what the server booked for them
    after their caller had given up is counted; then a patient client settles every key."""
    result = Result("short deadlines (1-20 ms)")
    with Rig(pg, "deadlines") as rig:
        load = rig.pay_load(clients=16, deadline_s=(0.001, 0.020), retry=False).start()
        _sleep(3 if quick else 5)
        load.stop()
        gave_up = load.unsettled()
        booked = rig.check().booked
        late = sum(1 for r in gave_up if booked.get(r.key))
        result.notes.append(f"{len(gave_up)} calls timed out at the client, {late} of them booked all the same "
                            f"(their database work had started in time); then resent with the same keys")
        load.settle_the_rest()
        result.ledger(rig.check(load), [load])
    return result


def server_answers(server: ServerProc, method: str = "Pay") -> list[tuple[str, float]]:
    """(status, duration in ms) of every call of `method` the server logged."""
    return [(r.get("status", ""), float(r.get("duration_ms", 0))) for r in server.records()
            if r.get("event") == "rpc" and r.get("method") == method]


def overload(pg: PgCluster, quick: bool = False, clients: int = 1000, limit: int = 256,
             deadline_s: float = 0.3) -> Result:
    """`clients` calls in flight with 0.3 s deadlines against a server that takes `limit`: the rest
    are refused with RESOURCE_EXHAUSTED at once, and the calls it takes are answered in time."""
    result = Result(f"overload ({clients} in flight, {deadline_s} s deadlines)")
    with Rig(pg, "overload", PAYMENTS_MAX_IN_FLIGHT=str(limit)) as rig:
        load = rig.pay_load(clients=clients, deadline_s=deadline_s, retry=True, backoff_s=(0.05, 0.3),
                            settle_timeout_s=0, channels=8).start()
        _sleep(4 if quick else 8)
        window = (load.started_at + 1.0, time.monotonic())
        load.stop()
        seen = load.codes_between(*window)
        span = window[1] - window[0]
        result.notes.append("clients, per second: " + ", ".join(f"{code} {n / span:.0f}" for code, n in seen.most_common()))
        answers = server_answers(rig.server)
        ok_late = sum(1 for status, ms in answers if status == "OK" and ms > deadline_s * 1000)
        refusals = sorted(ms for status, ms in answers if status == "RESOURCE_EXHAUSTED")
        by_status = Counter(status for status, _ in answers)
        result.notes.append("server answered: " + ", ".join(f"{code} {n}" for code, n in by_status.most_common())
                            + f"; OK after the deadline: {ok_late}")
        if refusals:
            result.notes.append(f"RESOURCE_EXHAUSTED within {refusals[len(refusals) // 2]:.1f} ms (median), "
                                f"{refusals[int(len(refusals) * 0.99)]:.1f} ms (p99), server-side")
        result.expect(by_status.get("RESOURCE_EXHAUSTED", 0) > 0, "no call was refused with RESOURCE_EXHAUSTED")
        result.expect(seen.get("OK", 0) > 0, "no call was answered in time")
        load.settle_the_rest()
        result.ledger(rig.check(load), [load])
    return result


# ---------------------------------------------------------------------------- the event stream
class DurableConsumer:
    """Subscribe as a durable consumer, Ack every `ack_every` events, resubscribe after any break."""

    def __init__(self, target: str, name: str, ack_every: int = 50):
        self.target = target
        self.name = name
        self.ack_every = ack_every
        self.metadata = (("authorization", f"Bearer {TOKENS['app']}"),)
        self.received: list[int] = []
        self.breaks = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="consumer", daemon=True)
        self._call = None

    def start(self) -> DurableConsumer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._call is not None:
            self._call.cancel()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            channel = grpc.insecure_channel(self.target)
            stub = pb_grpc.PaymentsServiceStub(channel)
            try:
                self._call = stub.Subscribe(pb.SubscribeRequest(route_codes=["FAULTS"], kinds=[pb.PAYMENT_SUCCEEDED],
                                                                consumer=self.name), metadata=self.metadata)
                unacked = 0
                for event in self._call:
                    self.received.append(event.sequence)
                    unacked += 1
                    if unacked >= self.ack_every:
                        stub.Ack(pb.AckRequest(consumer=self.name, sequence=event.sequence), metadata=self.metadata,
                                 timeout=5)
                        unacked = 0
            except grpc.RpcError:
                self.breaks += 1
                self._stop.wait(0.2)
            finally:
                channel.close()


def subscribe_across_kill9(pg: PgCluster, quick: bool = False) -> Result:
    """A durable consumer reading PAYMENT_SUCCEEDED under load while the server is killed -9 and
    started again: after resubscribing (from its last ack) it has every event, with no gap."""
    result = Result("durable Subscribe consumer across kill -9")
    with Rig(pg, "subscribe") as rig:
        consumer = DurableConsumer(rig.server.target, f"faults-{uuid.uuid4().hex[:6]}").start()
        load = rig.pay_load(clients=8).start()
        _sleep(2 if quick else 4)
        fault_at = time.monotonic()
        rig.server.kill()
        rig.server.spawn()
        rig.server.wait_serving()
        result.recovery_s = None
        _sleep(2 if quick else 4)
        load.stop()
        with contextlib.closing(psycopg2.connect(rig.dsn)) as conn, conn.cursor() as cur:
            cur.execute("SELECT sequence FROM outbox_events WHERE kind = 'PAYMENT_SUCCEEDED' AND route_code = 'FAULTS'")
            expected = {row[0] for row in cur.fetchall()}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not expected <= set(consumer.received):
            _sleep(0.2)
        consumer.stop()
        got = set(consumer.received)
        missing = expected - got
        duplicates = len(consumer.received) - len(got)
        result.recovery_s = _recovery(load, fault_at, fault_at)
        result.notes.append(f"{len(expected)} events, {len(missing)} missing, {duplicates} delivered again "
                            f"after the restart (unacknowledged), {consumer.breaks} stream breaks")
        result.expect(not missing, f"{len(missing)} events never reached the consumer")
        result.expect(consumer.breaks >= 1, "the stream did not break: the kill did not happen under it")
        result.ledger(rig.check(load), [load])
    return result


# ---------------------------------------------------------------------------- starting without a database
def start_with_database_down(pg: PgCluster, quick: bool = False) -> Result:
    """With PostgreSQL stopped the server logs one line and exits non-zero; with PAYMENTS_DB_WAIT_S
    it waits, and serves once the database is up."""
    result = Result("start with the database down")
    dbname = f"faults_start_{uuid.uuid4().hex[:6]}"
    pg.create_database(dbname)
    pg.stop("fast")
    try:
        srv = ServerProc(pg.url(dbname))
        srv.spawn()
        code = srv.wait_exit(30)
        srv.close()
        lines = [line for line in srv.lines + srv.stderr_lines if line.strip()]
        result.notes.append(f"exit code {code}, {len(lines)} line(s): {lines[-1][:160] if lines else ''}")
        result.expect(code not in (0, None), f"exit code {code} (expected non-zero)")
        result.expect(len(lines) == 1, f"{len(lines)} lines of output (expected one)")
        waiting = ServerProc(pg.url(dbname), PAYMENTS_DB_WAIT_S="20")
        waiting.spawn()
        _sleep(1.5)
        result.expect(waiting.running(), "with PAYMENTS_DB_WAIT_S the server did not wait for the database")
        started = time.monotonic()
        pg.start()
        try:
            took = waiting.wait_serving(30)
            result.recovery_s = round(time.monotonic() - started, 2)
            result.notes.append(f"with PAYMENTS_DB_WAIT_S=20: serving {took:.2f} s after PostgreSQL was started")
        except (ServerExited, TimeoutError) as exc:
            result.failures.append(f"the waiting server did not serve: {exc}")
        finally:
            waiting.close()
    finally:
        if not pg.is_running():
            pg.start()
        with contextlib.suppress(Exception):
            pg.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
    return result


ALL: list[tuple[str, Callable[..., Result]]] = [
    ("kill9", kill9_under_load),
    ("pg_fast", lambda pg, quick=False: pg_restart_under_load(pg, "fast", quick)),
    ("pg_immediate", lambda pg, quick=False: pg_restart_under_load(pg, "immediate", quick, down_s=2.5)),
    ("sigterm", sigterm_with_calls_blocked),
    ("locked", locked_account),
    ("deadlines", short_deadlines),
    ("overload", overload),
    ("subscribe", subscribe_across_kill9),
    ("start_down", start_with_database_down),
]
