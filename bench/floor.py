"""The floor: a bare psycopg2 loop doing the minimum work of one payment, no server in between.

Per payment: the idempotency row, the member debit with its funds check, the organisation credit,
the transaction row and its two postings with the balance after, one outbox row, commit. The same
tables and indexes as the service, so the comparison is fair.
"""

from __future__ import annotations

import random
import secrets
import threading
import time

from bench.stats import Samples
from server.domain.types import member_account, organisation_account


def _one_payment(cur, member_id: int, org_id: int, amount_cents: int) -> None:  # noqa: ANN001
    member_acct, org_acct = member_account(member_id), organisation_account(org_id)
    ref = "PAY-" + secrets.token_hex(6).upper()
    cur.execute(
        "INSERT INTO idempotency_keys (principal, key, method, request_hash, result, created_at) "
        "VALUES ('floor', %s, 'Pay', %s, %s, now())",
        (secrets.token_hex(16), secrets.token_hex(32), '{"type": "floor", "data": {}}'),
    )
    cur.execute(
        "UPDATE accounts SET balance_cents = balance_cents - %s, last_movement_at = clock_timestamp() "
        "WHERE id = %s AND balance_cents >= %s RETURNING balance_cents",
        (amount_cents, member_acct, amount_cents),
    )
    member_after = cur.fetchone()
    if member_after is None:
        raise RuntimeError(f"member {member_id} ran out of funds in the floor loop")
    cur.execute(
        "UPDATE accounts SET balance_cents = balance_cents + %s, last_movement_at = clock_timestamp() "
        "WHERE id = %s RETURNING balance_cents",
        (amount_cents, org_acct),
    )
    org_after = cur.fetchone()[0]
    cur.execute(
        "INSERT INTO transactions (reference, type, description, principal, payment_id, created_at) "
        "VALUES (%s, 'ENTRY_TO_EVENT', 'Entry', 'floor', %s, clock_timestamp()) RETURNING id, created_at",
        (ref, "pay_" + secrets.token_hex(10)),
    )
    txn_id, at = cur.fetchone()
    cur.execute(
        "INSERT INTO postings (transaction_id, account_id, amount_cents, balance_after_cents, counterparty_account_id, "
        "reference, type, description, created_at) VALUES "
        "(%s, %s, %s, %s, %s, %s, 'ENTRY_TO_EVENT', 'Entry', %s), (%s, %s, %s, %s, %s, %s, 'ENTRY_TO_EVENT', 'Entry', %s)",
        (txn_id, member_acct, -amount_cents, member_after[0], org_acct, ref + "-1", at,
         txn_id, org_acct, amount_cents, org_after, member_acct, ref + "-2", at),
    )
    cur.execute(
        "INSERT INTO outbox_events (kind, member_id, organisation_id, amount_cents, balance_cents, reference, created_at) "
        "VALUES ('PAYMENT_SUCCEEDED', %s, %s, %s, %s, %s, now())",
        (member_id, org_id, amount_cents, member_after[0], ref),
    )


def run_floor(connect, *, threads: int, duration_s: float, members: int, organisations: list[int]) -> Samples:  # noqa: ANN001
    """`threads` connections paying as fast as they can for `duration_s`; payees drawn from `organisations`."""
    samples = Samples()
    connected = threading.Barrier(threads + 1)
    go = threading.Event()
    stop_at: list[float] = [0.0]
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        conn = connect()
        latencies: list[float] = []
        try:
            cur = conn.cursor()
            connected.wait()
            go.wait()
            while time.perf_counter() < stop_at[0]:
                t0 = time.perf_counter()
                _one_payment(cur, rng.randint(1, members), rng.choice(organisations), rng.randint(100, 1000))
                conn.commit()
                latencies.append(time.perf_counter() - t0)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
            connected.abort()
        finally:
            conn.close()
            samples.extend(latencies)

    pool = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(threads)]
    for t in pool:
        t.start()
    try:
        connected.wait()
    except threading.BrokenBarrierError:
        pass
    samples.started()
    stop_at[0] = time.perf_counter() + duration_s
    go.set()
    for t in pool:
        t.join()
    samples.stopped()
    if errors:
        raise errors[0]
    return samples
