"""The failover harness (SPEC §6, §10): a primary and a synchronous standby of our own, the server on
a libpq multi-host URL, retrying clients, kill -9 of the primary, promotion, a fail-back, and the
checks: money conserved, no key booked twice, no acknowledged payment lost, no event missed or
numbered twice by a live stream, a durable consumer or a stream resumed from a cursor, and a restore
drill from the base backup and the WAL archive.

    .venv/bin/python tests/failover/harness.py [--phase-s 12] [--clients 16] [--promote-after-s 3]

Steps:
 1. a (primary) and b (synchronous standby), WAL archived from both; the server on
    host=a&host=b&target_session_attrs=read-write; organisations and funded members; a base backup.
 2. Load on a: the Pays a second one primary took, with every commit waiting for the standby.
 3. The reproduction of numbers handed out again: with the clients paused, a transaction draws 100
    event numbers and stays open; once the event reader has seen them, kill -9 of a. Its draws were
    never made durable, so b, promoted, hands those numbers out again to the payments that follow.
    b is promoted after --promote-after-s (an operator's or a failover manager's reaction time: calls
    and health while there is no primary are watched meanwhile).
 4. Load on b; a stream resumed from the last event before the kill must get every event since.
    CHECKPOINT on b, pg_rewind of a, a becomes b's synchronous standby.
 5. Fail-back: kill -9 of b under load, a promoted at once.
 6. Load on a, then stop: the ledger and the streams are checked against the database; a restore
    point, payments after it, and the restore drill: the base backup with the archive, recovered to
    the restore point, must hold exactly the ledger as it was there.
Exit status 0 when every check holds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import psycopg2

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent
for path in (str(TESTS), str(ROOT)):
    if path not in sys.path:
        sys.path.insert(0, path)

from faults import invariants  # noqa: E402
from faults.load import HealthWatch, PayLoad  # noqa: E402
from faults.rig import Rig  # noqa: E402
from faults.serverproc import SERVICE_NAME, TOKENS  # noqa: E402

from failover.replication import ReplicatedPair  # noqa: E402
from failover.stream_audit import (  # noqa: E402
    StreamWatch,
    audit,
    audit_watch,
    read_resumed,
    stored_events,
)

DRAWN_IN_OPEN_TRANSACTION = 100


class FailoverRig(Rig):
    """The fault suite's rig, with the server and the checks on the pair's multi-host URL."""

    def __init__(self, pair: ReplicatedPair, **server_env: str):
        super().__init__(pair.primary, "failover", **server_env)
        self.pair = pair

    @property
    def dsn(self) -> str:
        return self.pair.dsn(self.dbname)

    @property
    def url(self) -> str:
        return self.pair.url(self.dbname)


def scalar(dsn: str, sql: str, params: tuple = ()):  # noqa: ANN201
    with contextlib.closing(psycopg2.connect(dsn, connect_timeout=5)) as conn, conn.cursor() as cur:
        cur.execute(sql, params)
        return cur.fetchone()[0]


def newest_event(dsn: str) -> int:
    return scalar(dsn, "SELECT coalesce(max(sequence), 0) FROM outbox_events")


def wait_reader_probed_after(dsn: str, dbname: str, since, timeout_s: float = 10) -> bool:  # noqa: ANN001
    """Until the server's event reader ran its probe (or its read) after `since` (a database time)."""
    from server.events.hub import _PROBE, _READ_RANGE

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        latest = scalar(dsn, "SELECT max(state_change) FROM pg_stat_activity WHERE datname = %s "
                             "AND (query LIKE %s OR query LIKE %s)",
                        (dbname, f"EXECUTE {_PROBE.name}%", f"EXECUTE {_READ_RANGE.name}%"))
        if latest is not None and latest > since:
            return True
        time.sleep(0.05)
    return False


def switch_report(load: PayLoad, health: HealthWatch, killed: float, promotion: tuple[float, float]) -> dict:
    """What clients and health saw from a kill until payments went through again (after the load).
    There is no primary from the kill until the promotion is asked for."""
    asked, promoted = promotion
    first_ok = load.first_ack_of_attempt_after(killed)
    samples = [(t, o, s) for t, o, s in health.samples if killed <= t < asked]
    not_serving = health.first("NOT_SERVING", killed)
    serving_again = health.first("SERVING", asked)
    return {
        "kill_to_promotion_asked_s": round(asked - killed, 2),
        "kill_to_promoted_s": round(promoted - killed, 2),
        "kill_to_first_success_s": round(first_ok - killed, 2) if first_ok else None,
        "promotion_asked_to_first_success_s": round(first_ok - asked, 2) if first_ok else None,
        "codes_until_first_success": dict(load.codes_between(killed, first_ok or time.monotonic())),
        "health_not_serving_after_s": (round(not_serving - killed, 2)
                                       if not_serving is not None and not_serving < asked else None),
        "health_serving_samples_after_2s_without_primary": sum(
            1 for t, o, s in samples if t >= killed + 2 and "SERVING" in (o, s)),
        "health_samples_without_primary": len(samples),
        "health_serving_again_after_promotion_asked_s": (round(serving_again - asked, 2)
                                                   if serving_again is not None else None),
    }


def ledger_snapshot(dsn: str) -> dict:
    with contextlib.closing(psycopg2.connect(dsn, connect_timeout=5)) as conn, conn.cursor() as cur:
        cur.execute("SELECT id, balance_cents FROM accounts ORDER BY id")
        balances = cur.fetchall()
        cur.execute("SELECT count(*), coalesce(max(id), 0) FROM transactions")
        transactions = cur.fetchone()
        cur.execute("SELECT count(*), coalesce(max(sequence), 0) FROM outbox_events")
        events = cur.fetchone()
    return {"balances": balances, "transactions": list(transactions), "events": list(events)}


def run(args: argparse.Namespace) -> dict:
    report: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    began = time.monotonic()
    pair = ReplicatedPair.create()
    a, b = pair.nodes["a"], pair.nodes["b"]
    report["postgresql"] = a.sql("SHOW server_version")[0][0]
    rig = FailoverRig(pair, PAYMENTS_EVENT_POLL_INTERVAL_MS="200", PAYMENTS_SHUTDOWN_GRACE_S="2")
    watches: list[StreamWatch] = []
    health: HealthWatch | None = None
    try:
        rig.__enter__()
        pair.note("server serving; organisations and members funded")
        server = rig.server
        assert server is not None
        backup = pair.root / "base-backup"
        pair.base_backup(backup)
        token = TOKENS["app"]
        live = StreamWatch(server.target, token, "live stream").start()
        durable = StreamWatch(server.target, token, "durable consumer", consumer="failover-audit").start()
        watches = [live, durable]
        health = HealthWatch(server.target, SERVICE_NAME).start()

        # 2. load on one primary with a synchronous standby
        load1 = rig.pay_load(clients=args.clients, seed=1).start()
        time.sleep(args.phase_s)
        steady_from = load1.started_at + 2
        steady = load1.acks_between(steady_from, time.monotonic())
        report["pays_per_s_one_primary"] = round(steady / (time.monotonic() - steady_from), 1)
        load1.stop()
        pair.note("load stopped; an open transaction draws event numbers")

        # 3. the reproduction, and the failover
        dsn_a = a.dsn(rig.dbname)
        committed_at_kill = newest_event(dsn_a)
        drawer = psycopg2.connect(dsn_a)
        with drawer.cursor() as cur:
            cur.execute("SELECT max(outbox_next_sequence()), clock_timestamp() "
                        "FROM generate_series(1, %s)", (DRAWN_IN_OPEN_TRANSACTION,))
            drawn_max, drawn_at = cur.fetchone()
        reader_saw = wait_reader_probed_after(dsn_a, rig.dbname, drawn_at)
        killed = pair.kill9(a)
        drawer.close()
        load2 = rig.pay_load(clients=args.clients, seed=2).start()
        time.sleep(args.promote_after_s)
        promoted = pair.promote(b)

        # 4. on b: a stream resumed from before the kill; a rewound into b's synchronous standby
        time.sleep(2)
        through = newest_event(rig.dsn)
        resumed = audit("stream resumed from the last event before the kill",
                        stored_events(rig.dsn, committed_at_kill, through),
                        read_resumed(server.target, token, committed_at_kill, through))
        report["reproduction"] = {
            "committed_before_kill": committed_at_kill,
            "drawn_in_open_transaction_through": drawn_max,
            "event_reader_probed_while_open": reader_saw,
            "numbers_handed_out_again": scalar(
                rig.dsn, "SELECT count(*) FROM outbox_events WHERE sequence > %s AND sequence <= %s",
                (committed_at_kill, drawn_max)),
            "resumed_stream": resumed.summary(),
            "resumed_stream_gaps": resumed.gaps,
        }
        pair.note("resumed stream read; CHECKPOINT and pg_rewind of a")
        rewind_started = time.monotonic()
        report["pg_rewind"] = pair.rewind_into_standby(a).splitlines()[-3:]
        report["rewind_to_synchronous_s"] = round(time.monotonic() - rewind_started, 2)
        time.sleep(args.phase_s / 2)

        # 5. fail-back under load
        killed2 = pair.kill9(b)
        promoted2 = pair.promote(a)

        # 6. load on a, then the checks
        time.sleep(args.phase_s / 2)
        load2.stop()
        pair.note("load stopped; checks")
        report["failover"] = switch_report(load2, health, killed, promoted)
        report["failback"] = switch_report(load2, health, killed2, promoted2)
        loads = [load1, load2]
        # The fault suite's check looks up each payment's events by payment id: with no index there,
        # its time grows with the square of the payments. The index changes no answer.
        pair.primary.sql("CREATE INDEX IF NOT EXISTS failover_check_events_by_payment "
                         "ON outbox_events (payment_id)", dbname=rig.dbname)
        check = rig.check(*loads)
        acked = sum(len(load.acked()) for load in loads)
        codes: Counter[str] = Counter()
        for load in loads:
            codes.update(load.codes)
        report["payments"] = {
            "keys": sum(len(load.records) for load in loads),
            "acknowledged": acked,
            "lost": len(check.lost),
            "doubled": len(check.doubled),
            "booked_though_refused": len(check.booked_refused),
            "unsettled": sum(len(load.unsettled()) for load in loads),
            "invariant_problems": check.problems,
            "answers": dict(codes),
        }
        newest = newest_event(rig.dsn)
        for watch in watches:
            watch.wait_through(newest, timeout_s=20)
            watch.stop()
        stored = stored_events(rig.dsn, 0)
        audits = [audit_watch(watch, {s: e for s, e in stored.items() if s > watch.after_sequence})
                  for watch in watches]
        report["streams"] = [x.summary() for x in audits]
        report["stream_gaps"] = sum(x.gaps for x in audits) + resumed.gaps
        report["streams_ok"] = all(x.ok for x in audits) and resumed.ok
        report["stream_endings"] = {w.name: Counter(status for _, status in w.endings) for w in watches}

        # the restore drill
        drill_started = time.monotonic()
        pair.note("restore drill")
        final = pair.primary
        final.sql("SELECT pg_create_restore_point('drill')")
        at_restore_point = ledger_snapshot(rig.dsn)
        after_keys = []
        with rig.client("app") as app:
            for amount in (101, 102, 103):
                key = uuid.uuid4().hex
                app.pay(rig.members[0], amount, organisation_id=rig.organisations[0], description="after the drill",
                        idempotency_key=key)
                after_keys.append(key)
        pair.wait_archived(final)
        restored = pair.restore(backup, "drill")
        restored_dsn = restored.dsn(rig.dbname)
        with contextlib.closing(psycopg2.connect(restored_dsn)) as conn, conn.cursor() as cur:
            restored_problems = invariants.ledger_problems(cur)
        restored_snapshot = ledger_snapshot(restored_dsn)
        report["restore_drill"] = {
            "restored_equals_restore_point": restored_snapshot == at_restore_point,
            "transactions": restored_snapshot["transactions"][0],
            "after_restore_point_absent": scalar(
                restored_dsn, "SELECT count(*) FROM transactions WHERE description = 'after the drill'") == 0,
            "invariant_problems": restored_problems,
            "seconds": round(time.monotonic() - drill_started, 2),
        }
        report["events"] = [f"{t - began:7.2f}s {what}" for t, what in pair.events]
    finally:
        for watch in watches:
            with contextlib.suppress(Exception):
                watch.stop()
        if health is not None:
            health.stop()
        if rig.server is not None:
            rig.server.close()
        if args.keep:
            print(f"kept: {pair.root}", file=sys.stderr)
        else:
            pair.destroy()
    report["seconds"] = round(time.monotonic() - began, 1)
    return report


def verdict(report: dict) -> list[str]:
    """What fell short; empty when every check held."""
    failed = []
    pays = report["payments"]
    for name in ("lost", "doubled", "booked_though_refused", "unsettled"):
        if pays[name]:
            failed.append(f"{pays[name]} payments {name.replace('_', ' ')}")
    if pays["invariant_problems"]:
        failed.append(f"ledger invariants: {pays['invariant_problems']}")
    if pays["answers"].get("INTERNAL"):
        failed.append(f"{pays['answers']['INTERNAL']} calls answered INTERNAL")
    repro = report["reproduction"]
    notes = report.setdefault("notes", [])
    if not repro["event_reader_probed_while_open"]:
        failed.append("the event reader never saw the open transaction's numbers: the reproduction did not run")
    elif not repro["numbers_handed_out_again"]:
        # whether the standby had the sequence's WAL at the kill is the machine's timing, not the service's:
        # the run still checks every stream for gaps; tests/test_events_numbers_again.py stages the reuse always
        notes.append("this run's promotion handed out no number again (the standby had the sequence's WAL)")
    if report["stream_gaps"] or not report["streams_ok"]:
        failed.append(f"event streams: {report['streams']} / {repro['resumed_stream']}")
    for switch in ("failover", "failback"):
        seen = report[switch]
        if seen["kill_to_first_success_s"] is None:
            failed.append(f"{switch}: no payment went through afterwards")
        if seen["health_serving_samples_after_2s_without_primary"]:
            failed.append(f"{switch}: health said SERVING more than 2 s into {seen['kill_to_promotion_asked_s']} s "
                          "without a primary")
    drill = report["restore_drill"]
    if not (drill["restored_equals_restore_point"] and drill["after_restore_point_absent"]) \
            or drill["invariant_problems"]:
        failed.append(f"restore drill: {drill}")
    return failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--phase-s", type=float, default=12.0, help="seconds of load per phase")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--promote-after-s", type=float, default=3.0,
                        help="seconds without a primary before the first promotion")
    parser.add_argument("--json", type=Path, help="write the report here too")
    parser.add_argument("--keep", action="store_true", help="keep the nodes' directory (and leave them running)")
    args = parser.parse_args(argv)
    report = run(args)
    failed = verdict(report)
    report["failed"] = failed
    text = json.dumps(report, indent=2, default=str)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    summary = [
        f"payments: {report['payments']['acknowledged']} acknowledged, {report['payments']['lost']} lost, "
        f"{report['payments']['doubled']} doubled; {report['pays_per_s_one_primary']} Pays/s on one primary",
        f"failover: kill to first success {report['failover']['kill_to_first_success_s']} s "
        f"(promoted after {report['failover']['kill_to_promoted_s']} s); fail-back: "
        f"{report['failback']['kill_to_first_success_s']} s",
        f"events: {report['stream_gaps']} gaps; {report['reproduction']['numbers_handed_out_again']} numbers "
        "handed out again after the promotion",
        f"restore drill: {'ok' if report['restore_drill']['restored_equals_restore_point'] else 'FAILED'} "
        f"in {report['restore_drill']['seconds']} s; whole run {report['seconds']} s",
        "FAILED: " + "; ".join(failed) if failed else "every check held",
        *report.get("notes", []),
    ]
    print("\n".join(summary), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
