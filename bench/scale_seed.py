"""The data-scale seed: many accounts, many organisations to settle, and one organisation with a
very long history, written in bulk SQL straight into the tables after the main seed.

Every row keeps the ledger's invariants: each transaction's postings sum to zero, each balance is
the sum of its account's postings, and each balance-after follows from the line before it. The
counterparty of every seeded line is `adjustments`. The long history is spread over the two years
before the main seed, so it is the first of `adjustments`' lines (its balance-after starts from
zero) and the main seed's lines of `adjustments` move down by its total; the members and
organisations come after the main seed and continue from `adjustments`' balance. Closed forms
throughout: no window over millions of rows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from bench.database import BenchDatabase, _drop_secondary_indexes
from server.domain.types import SystemAccount, organisation_account, system_account

ADJUSTMENTS = system_account(SystemAccount.ADJUSTMENTS)
MEMBER_BASE = 5_000_000  # extra members: ids above this
SETTLE_BASE = 100_000  # organisations to settle: ids above this
SUMMARY_ORGANISATION = 300_000  # the organisation with the long history
OPENING_CENTS = 50_000
# the long history's lines cycle through these types; line k is 100 x (k % 5 + 1) cents of type k % 5
SUMMARY_TYPES = ("MISCELLANEOUS", "ENTRY_TO_EVENT", "CLUB_PAYMENT", "CLUB_MEMBERSHIP", "ORG_TRANSFER")


@dataclass(frozen=True)
class ScaleSeed:
    accounts: int  # member and organisation accounts in all (members are added up to it)
    settle_small: int
    settle_large: int
    summary_postings: int  # lines of the organisation with the long history

    def settle_ids(self, large: bool) -> list[int]:
        first = SETTLE_BASE + 1 + (self.settle_small if large else 0)
        return list(range(first, first + (self.settle_large if large else self.settle_small)))

    @property
    def summary_account(self) -> int:
        return organisation_account(SUMMARY_ORGANISATION)


def summary_cumulative_sql(n: str) -> str:
    """SQL for the sum of the long history's first `n` amounts (see SUMMARY_TYPES)."""
    return f"(100 * (15 * (({n}) / 5) + (({n}) %% 5) * ((({n}) %% 5) + 3) / 2))"  # %% : psycopg2 parameters


def summary_cumulative(n: int) -> int:
    return 100 * (15 * (n // 5) + (n % 5) * ((n % 5) + 3) // 2)


def seed_scale(db: BenchDatabase, seed: ScaleSeed) -> dict:
    """Seed in bulk; answers the seconds each part took."""
    timings: dict[str, float] = {}
    conn = db.connect()
    try:
        with conn, conn.cursor() as cur:
            cur.execute("SET synchronous_commit = off")
            cur.execute("SET session_replication_role = replica")  # references right by construction
            cur.execute("SET maintenance_work_mem = '512MB'")
            cur.execute("SELECT balance_cents FROM accounts WHERE id = %s", (ADJUSTMENTS,))
            adj = cur.fetchone()[0]
            cur.execute("SELECT COALESCE(max(id), 0) FROM transactions")
            t0 = cur.fetchone()[0]
            cur.execute("SELECT COALESCE(max(id), 0) FROM postings")
            p0 = cur.fetchone()[0]
            cur.execute("SELECT count(*) FROM accounts WHERE kind IN (1, 2)")
            existing = cur.fetchone()[0]
            n_orgs = seed.settle_small + seed.settle_large
            n_members = max(0, seed.accounts - existing - n_orgs - 1)
            rebuild = _drop_secondary_indexes(cur, ("postings", "transactions"))
            # the organisation with the long history: line k is 100 x (k % 5 + 1) cents of type k % 5,
            # spread over 760 days that end 40 days ago (before every other line of `adjustments`)
            started = time.perf_counter()
            n = seed.summary_postings
            cur.execute(
                """
                INSERT INTO organisations (organisation_id, name, bsb, account_number, minimum_balance_cents,
                                           created_at, updated_at)
                VALUES (%(org)s, 'Congress of Many Entries', '062-000', '30000000', 0, now(), now());
                INSERT INTO accounts (id, kind, ext_id, name, balance_cents, last_movement_at, created_at)
                VALUES (%(acct)s, 2, %(org)s, 'Congress of Many Entries', 0, now(), now());
                INSERT INTO transactions (id, reference, type, description, principal, created_at)
                SELECT %(t0)s + k, 'SCALE-C' || k, (%(types)s::text[])[k %% 5 + 1], 'Entry ' || k, 'bench',
                       now() - interval '800 days' + k * (interval '760 days' / %(n)s)
                FROM generate_series(1, %(n)s) k;
                INSERT INTO postings (id, transaction_id, account_id, amount_cents, balance_after_cents,
                                      counterparty_account_id, reference, type, description, created_at)
                SELECT %(p0)s + 2 * k - 1 + side, %(t0)s + k,
                       CASE side WHEN 0 THEN %(acct)s ELSE %(adj_acct)s END,
                       (1 - 2 * side) * 100 * (k %% 5 + 1),
                       (1 - 2 * side) * {cum},
                       CASE side WHEN 0 THEN %(adj_acct)s ELSE %(acct)s END,
                       'SCALE-C' || k || '-' || (side + 1), (%(types)s::text[])[k %% 5 + 1], 'Entry ' || k,
                       now() - interval '800 days' + k * (interval '760 days' / %(n)s)
                FROM generate_series(1, %(n)s) k CROSS JOIN (VALUES (0), (1)) AS s(side);
                """.replace("{cum}", summary_cumulative_sql("k::bigint")),
                {"org": SUMMARY_ORGANISATION, "acct": seed.summary_account, "n": n, "t0": t0, "p0": p0,
                 "adj_acct": ADJUSTMENTS, "types": list(SUMMARY_TYPES)},
            )
            total = summary_cumulative(n)
            # the main seed's lines of `adjustments` now come after these
            cur.execute("UPDATE postings SET balance_after_cents = balance_after_cents - %s "
                        "WHERE account_id = %s AND id <= %s", (total, ADJUSTMENTS, p0))
            cur.execute("UPDATE accounts SET balance_cents = %s WHERE id = %s", (total, seed.summary_account))
            t0, p0, adj = t0 + n, p0 + 2 * n, adj - total
            timings["long_history_s"] = round(time.perf_counter() - started, 1)
            # members with an opening credit
            started = time.perf_counter()
            cur.execute(
                """
                INSERT INTO accounts (id, kind, ext_id, name, balance_cents, last_movement_at, created_at)
                SELECT (%(mb)s + g) * 4 + 1, 1, %(mb)s + g, 'Member ' || (%(mb)s + g), %(open)s, now(), now()
                FROM generate_series(1, %(n)s) g;
                INSERT INTO transactions (id, reference, type, description, principal, created_at)
                SELECT %(t0)s + g, 'SCALE-M' || g, 'MANUAL_ADJUSTMENT', 'Opening credit', 'bench',
                       now() - interval '27 hours' + g * interval '1 microsecond'
                FROM generate_series(1, %(n)s) g;
                INSERT INTO postings (id, transaction_id, account_id, amount_cents, balance_after_cents,
                                      counterparty_account_id, reference, type, description, created_at)
                SELECT %(p0)s + 2 * g - 1 + side, %(t0)s + g,
                       CASE side WHEN 0 THEN (%(mb)s + g) * 4 + 1 ELSE %(adj_acct)s END,
                       CASE side WHEN 0 THEN %(open)s ELSE -%(open)s END,
                       CASE side WHEN 0 THEN %(open)s ELSE %(adj)s - %(open)s::bigint * g END,
                       CASE side WHEN 0 THEN %(adj_acct)s ELSE (%(mb)s + g) * 4 + 1 END,
                       'SCALE-M' || g || '-' || (side + 1), 'MANUAL_ADJUSTMENT', 'Opening credit',
                       now() - interval '27 hours' + g * interval '1 microsecond'
                FROM generate_series(1, %(n)s) g CROSS JOIN (VALUES (0), (1)) AS s(side);
                """,
                {"mb": MEMBER_BASE, "n": n_members, "open": OPENING_CENTS, "t0": t0, "p0": p0, "adj": adj,
                 "adj_acct": ADJUSTMENTS},
            )
            t0, p0, adj = t0 + n_members, p0 + 2 * n_members, adj - OPENING_CENTS * n_members
            # organisations to settle: bank details, a minimum on some, a fee override on some, and a
            # balance of 100.00 to 1,099.00 from one opening credit each
            cur.execute(
                """
                INSERT INTO organisations (organisation_id, name, bsb, account_number, minimum_balance_cents,
                                           settlement_fee_bp, created_at, updated_at)
                SELECT %(sb)s + g, 'Bridge Club ' || (%(sb)s + g), '06' || (g %% 10) || '-' || lpad((g %% 1000)::text, 3, '0'),
                       lpad(g::text, 8, '0'), CASE WHEN g %% 4 = 0 THEN 5000 ELSE 0 END,
                       CASE WHEN g %% 7 = 0 THEN 150 END, now(), now()
                FROM generate_series(1, %(n)s) g;
                INSERT INTO accounts (id, kind, ext_id, name, balance_cents, last_movement_at, created_at)
                SELECT (%(sb)s + g) * 4 + 2, 2, %(sb)s + g, 'Bridge Club ' || (%(sb)s + g),
                       10000 + (g %% 1000) * 100, now(), now()
                FROM generate_series(1, %(n)s) g;
                INSERT INTO transactions (id, reference, type, description, principal, created_at)
                SELECT %(t0)s + g, 'SCALE-O' || g, 'MANUAL_ADJUSTMENT', 'Opening credit', 'bench',
                       now() - interval '26 hours' + g * interval '1 microsecond'
                FROM generate_series(1, %(n)s) g;
                INSERT INTO postings (id, transaction_id, account_id, amount_cents, balance_after_cents,
                                      counterparty_account_id, reference, type, description, created_at)
                SELECT %(p0)s + 2 * g - 1 + side, %(t0)s + g,
                       CASE side WHEN 0 THEN (%(sb)s + g) * 4 + 2 ELSE %(adj_acct)s END,
                       CASE side WHEN 0 THEN 10000 + (g %% 1000) * 100 ELSE -(10000 + (g %% 1000) * 100) END,
                       CASE side WHEN 0 THEN 10000 + (g %% 1000) * 100
                                 ELSE %(adj)s - (10000 * g + 100 * (499500 * (g / 1000)
                                                  + ((g %% 1000) * (g %% 1000 + 1)) / 2)) END,
                       CASE side WHEN 0 THEN %(adj_acct)s ELSE (%(sb)s + g) * 4 + 2 END,
                       'SCALE-O' || g || '-' || (side + 1), 'MANUAL_ADJUSTMENT', 'Opening credit',
                       now() - interval '26 hours' + g * interval '1 microsecond'
                FROM generate_series(1, %(n)s) g CROSS JOIN (VALUES (0), (1)) AS s(side);
                """,
                {"sb": SETTLE_BASE, "n": n_orgs, "t0": t0, "p0": p0, "adj": adj, "adj_acct": ADJUSTMENTS},
            )
            org_total = sum(10000 + (g % 1000) * 100 for g in range(1, n_orgs + 1))
            t0, p0, adj = t0 + n_orgs, p0 + 2 * n_orgs, adj - org_total
            timings["members_and_organisations_s"] = round(time.perf_counter() - started, 1)
            cur.execute("UPDATE accounts SET balance_cents = %s, last_movement_at = now() WHERE id = %s",
                        (adj, ADJUSTMENTS))
            started = time.perf_counter()
            for ddl in rebuild:
                cur.execute(ddl)
            cur.execute("SELECT setval(pg_get_serial_sequence('transactions', 'id'), %s)", (t0,))
            cur.execute("SELECT setval(pg_get_serial_sequence('postings', 'id'), %s)", (p0,))
            # the seed bypassed the write path: its day totals are computed from the postings
            cur.execute("SELECT account_day_totals_rebuild()")
            # and, with triggers off (replica), its balance totals from the accounts
            cur.execute("SELECT balance_totals_rebuild()")
            timings["indexes_s"] = round(time.perf_counter() - started, 1)
        started = time.perf_counter()
        conn.autocommit = True
        with conn.cursor() as cur:
            for table in ("accounts", "transactions", "postings", "organisations", "account_day_totals"):
                cur.execute(f"VACUUM ANALYZE {table}")  # the visibility map: index-only scans
        timings["vacuum_s"] = round(time.perf_counter() - started, 1)
    finally:
        conn.close()
    timings["members"] = n_members
    timings["organisations"] = n_orgs + 1
    return timings
