"""The ledger after a fault, read straight from PostgreSQL: the invariants of SPEC §2 (money
conserved, postings of a transaction sum to zero, every balance the sum of its postings,
balance-after chains, no member below zero) and what the clients were told against what was
booked: each key booked at most once, every acknowledged key booked, nothing booked for a key
that was refused, one PAYMENT_SUCCEEDED event per booked payment; and the checks of
tests/ledger_invariants.py, which the rest of the suite shares.

The fault checks are plain SQL over the tables' stable columns, so they read any version of the
schema that keeps them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass, field

import psycopg2

from faults.load import DESCRIPTION_PREFIX, KeyRecord

MEMBER_KIND = 1  # server.domain.types.AccountKind.MEMBER


@dataclass
class LedgerCheck:
    booked: dict[str, int]  # key → transactions booked for it
    lost: list[str] = field(default_factory=list)  # acknowledged, not booked
    doubled: list[str] = field(default_factory=list)  # booked more than once
    booked_refused: list[str] = field(default_factory=list)  # refused, yet booked
    problems: list[str] = field(default_factory=list)  # broken invariants

    @property
    def ok(self) -> bool:
        return not (self.lost or self.doubled or self.booked_refused or self.problems)

    def summary(self) -> str:
        return (f"booked {len(self.booked)} keys, lost {len(self.lost)}, doubled {len(self.doubled)}, "
                f"booked though refused {len(self.booked_refused)}, problems {self.problems[:5]}")


def _one(cur, sql: str, params: tuple = ()) -> tuple:  # noqa: ANN001
    cur.execute(sql, params)
    return cur.fetchone()


def ledger_problems(cur) -> list[str]:  # noqa: ANN001
    """The invariants of the whole ledger; an empty list when all hold."""
    problems = []
    (total,) = _one(cur, "SELECT coalesce(sum(balance_cents), 0) FROM accounts")
    if total != 0:
        problems.append(f"money not conserved: the balances sum to {total}")
    (unbalanced,) = _one(cur, """
        SELECT count(*) FROM (SELECT transaction_id FROM postings GROUP BY transaction_id
                              HAVING sum(amount_cents) <> 0 OR count(*) < 2) t""")
    if unbalanced:
        problems.append(f"{unbalanced} transactions whose postings do not sum to zero (or have one leg)")
    (mismatched,) = _one(cur, """
        SELECT count(*) FROM accounts a
        LEFT JOIN (SELECT account_id, sum(amount_cents) AS total FROM postings GROUP BY account_id) p
               ON p.account_id = a.id
        WHERE a.balance_cents <> coalesce(p.total, 0)""")
    if mismatched:
        problems.append(f"{mismatched} accounts whose balance is not the sum of their postings")
    # Postings of an account are written while its row is locked: their ids follow the order of
    # the bookings, and each balance-after is the running sum in that order.
    (broken_chain,) = _one(cur, """
        SELECT count(*) FROM (
            SELECT balance_after_cents,
                   sum(amount_cents) OVER (PARTITION BY account_id ORDER BY id) AS running
            FROM postings) c
        WHERE balance_after_cents <> running""")
    if broken_chain:
        problems.append(f"{broken_chain} postings whose balance-after breaks the account's chain")
    (negative,) = _one(cur, "SELECT count(*) FROM accounts WHERE kind = %s AND balance_cents < 0", (MEMBER_KIND,))
    if negative:
        problems.append(f"{negative} member accounts below zero")
    (events_off,) = _one(cur, """
        SELECT count(*) FROM transactions t
        WHERE t.description LIKE %s
          AND (SELECT count(*) FROM outbox_events e
               WHERE e.payment_id = t.payment_id AND e.kind = 'PAYMENT_SUCCEEDED') <> 1""",
                         (DESCRIPTION_PREFIX + "%",))
    if events_off:
        problems.append(f"{events_off} payments without exactly one PAYMENT_SUCCEEDED event")
    return problems


def booked_keys(cur) -> dict[str, int]:  # noqa: ANN001
    cur.execute("SELECT substr(description, %s), count(*) FROM transactions WHERE description LIKE %s "
                "GROUP BY description", (len(DESCRIPTION_PREFIX) + 1, DESCRIPTION_PREFIX + "%"))
    return dict(cur.fetchall())


def shared_problems(url: str) -> list[str]:
    """The invariants the rest of the test suite checks (tests/ledger_invariants.py), as they grow."""
    from ledger_invariants import check_invariants
    from sqlalchemy import create_engine

    from server.ledger.db import Database

    engine = create_engine(url)
    try:
        check_invariants(Database(engine))
    except AssertionError as exc:
        return [f"ledger_invariants: {exc}"]
    finally:
        engine.dispose()
    return []


def check(dsn: str, records: Iterable[KeyRecord], *, url: str | None = None) -> LedgerCheck:
    """Compare what clients were told with what the ledger holds, and check the ledger (and, given
    its SQLAlchemy `url`, the suite's shared invariants too)."""
    with contextlib.closing(psycopg2.connect(dsn, connect_timeout=10)) as conn, conn.cursor() as cur:
        booked = booked_keys(cur)
        result = LedgerCheck(booked=booked, problems=ledger_problems(cur))
    if url is not None:
        result.problems += shared_problems(url)
    for record in records:
        times = booked.get(record.key, 0)
        if record.acked and times == 0:
            result.lost.append(record.key)
        if record.final not in (None, "OK") and times:
            result.booked_refused.append(record.key)
    result.doubled = [key for key, times in booked.items() if times > 1]
    return result
