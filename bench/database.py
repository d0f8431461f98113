"""The benchmark's own PostgreSQL database: create, seed with bulk SQL, check the ledger invariants, drop."""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass

import psycopg2
import psycopg2.errors
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from bench.stats import percentile_ms
from server.domain.types import SystemAccount, member_account, organisation_account, system_account
from server.ledger import migrate

ADJUSTMENTS = system_account(SystemAccount.ADJUSTMENTS)
OPENING_CENTS = 1_000_000  # every member starts with $10,000.00


@dataclass(frozen=True)
class Seed:
    members: int
    organisations: int
    statement_postings: int

    @property
    def statement_member_id(self) -> int:
        """A member outside the paying range whose account carries the long statement."""
        return self.members + 1_000_000


class BenchDatabase:
    def __init__(self, base_url: str):
        self.name = f"payments_bench_{uuid.uuid4().hex[:10]}"
        self.base_url = base_url
        self.url = make_url(base_url).set(database=self.name).render_as_string(hide_password=False)
        self._admin = create_engine(base_url, isolation_level="AUTOCOMMIT")
        self.watermark_posting_id = 0
        self.watermark_transaction_id = 0

    @property
    def dsn(self) -> str:
        """The libpq form of the URL, for bare psycopg2."""
        url = make_url(self.url)
        parts = [f"dbname={url.database}"]
        for key, value in (("host", url.host), ("port", url.port), ("user", url.username), ("password", url.password)):
            if value:
                parts.append(f"{key}={value}")
        return " ".join(parts)

    @property
    def is_local(self) -> bool:
        """The database runs on this host (so its processes' CPU can be read here)."""
        host = make_url(self.url).host
        return not host or host.startswith("/") or host in ("localhost", "127.0.0.1", "::1")

    def create(self) -> None:
        with self._admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{self.name}"'))
        engine = create_engine(self.url)
        try:
            migrate.upgrade(engine)
        finally:
            engine.dispose()

    def drop(self) -> None:
        with self._admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)'))
        self._admin.dispose()

    def connect(self):  # noqa: ANN201
        return psycopg2.connect(self.dsn)

    # ------------------------------------------------------------------ seeding
    def seed(self, seed: Seed) -> float:
        """Members with an opening credit (a posting against `adjustments`), organisations, and one
        member with a long statement: all in bulk SQL, with consistent balances after."""
        started = time.perf_counter()
        stmt_acct = member_account(seed.statement_member_id)
        n_stmt = seed.statement_postings
        params = {
            "members": seed.members, "orgs": seed.organisations, "opening": OPENING_CENTS, "adj": ADJUSTMENTS,
            "stmt_acct": stmt_acct, "stmt_member": seed.statement_member_id, "n_stmt": n_stmt,
        }
        conn = self.connect()
        try:
            with conn, conn.cursor() as cur:
                cur.execute("SET synchronous_commit = off")
                # bulk rows whose references are right by construction: skip the per-row FK triggers
                cur.execute("SET session_replication_role = replica")
                cur.execute("SET maintenance_work_mem = '256MB'")
                cur.execute(
                    """
                    INSERT INTO organisations (organisation_id, name, bsb, account_number, minimum_balance_cents,
                                               created_at, updated_at)
                    SELECT g, 'Bridge Club ' || g, '062-000', lpad(g::text, 8, '0'), 0, now(), now()
                    FROM generate_series(1, %(orgs)s) g;
                    INSERT INTO accounts (id, kind, ext_id, name, balance_cents, created_at)
                    SELECT g * 4 + 2, 2, g, 'Bridge Club ' || g, 0, now() FROM generate_series(1, %(orgs)s) g;
                    INSERT INTO accounts (id, kind, ext_id, name, balance_cents, last_movement_at, created_at)
                    SELECT g * 4 + 1, 1, g, 'Member ' || g, %(opening)s, now(), now()
                    FROM generate_series(1, %(members)s) g;
                    -- the opening credits: transaction g, postings 2g-1 (member) and 2g (adjustments)
                    INSERT INTO transactions (id, reference, type, description, principal, created_at)
                    SELECT g, 'SEED-' || g, 'MANUAL_ADJUSTMENT', 'Opening credit', 'bench',
                           now() - interval '3 days' + g * interval '1 microsecond'
                    FROM generate_series(1, %(members)s) g;
                    INSERT INTO postings (id, transaction_id, account_id, amount_cents, balance_after_cents,
                                          counterparty_account_id, reference, type, description, created_at)
                    SELECT 2 * g - 1 + side, g,
                           CASE side WHEN 0 THEN g * 4 + 1 ELSE %(adj)s END,
                           CASE side WHEN 0 THEN %(opening)s ELSE -%(opening)s END,
                           CASE side WHEN 0 THEN %(opening)s ELSE -%(opening)s::bigint * g END,
                           CASE side WHEN 0 THEN %(adj)s ELSE g * 4 + 1 END,
                           'SEED-' || g || '-' || (side + 1), 'MANUAL_ADJUSTMENT', 'Opening credit',
                           now() - interval '3 days' + g * interval '1 microsecond'
                    FROM generate_series(1, %(members)s) g CROSS JOIN (VALUES (0), (1)) AS s(side);
                    """,
                    params,
                )
                rebuild = _drop_secondary_indexes(cur, ("postings", "transactions"))
                # The long statement: +100 on odd, -50 on even lines (never below zero), each
                # against `adjustments`, one millisecond apart.
                cur.execute(
                    """
                    INSERT INTO accounts (id, kind, ext_id, name, balance_cents, last_movement_at, created_at)
                    VALUES (%(stmt_acct)s, 1, %(stmt_member)s, 'Long Statement', 0, now(), now());
                    INSERT INTO transactions (id, reference, type, description, principal, created_at)
                    SELECT %(members)s + k, 'SEED-S' || k, 'MANUAL_ADJUSTMENT', 'Line ' || k, 'bench',
                           now() - interval '2 days' + k * interval '1 millisecond'
                    FROM generate_series(1, %(n_stmt)s) k;
                    INSERT INTO postings (id, transaction_id, account_id, amount_cents, balance_after_cents,
                                          counterparty_account_id, reference, type, description, created_at)
                    SELECT 2 * %(members)s + 2 * k - 1 + side, %(members)s + k,
                           CASE side WHEN 0 THEN %(stmt_acct)s ELSE %(adj)s END,
                           (1 - 2 * side) * (CASE WHEN k %% 2 = 1 THEN 100 ELSE -50 END),
                           CASE side
                             WHEN 0 THEN ((k + 1) / 2) * 100 - (k / 2) * 50
                             ELSE -%(opening)s::bigint * %(members)s - (((k + 1) / 2) * 100 - (k / 2) * 50)
                           END,
                           CASE side WHEN 0 THEN %(adj)s ELSE %(stmt_acct)s END,
                           'SEED-S' || k || '-' || (side + 1), 'MANUAL_ADJUSTMENT', 'Line ' || k,
                           now() - interval '2 days' + k * interval '1 millisecond'
                    FROM generate_series(1, %(n_stmt)s) k CROSS JOIN (VALUES (0), (1)) AS s(side);
                    """,
                    params,
                )
                for ddl in rebuild:
                    cur.execute(ddl)
                final_stmt = ((n_stmt + 1) // 2) * 100 - (n_stmt // 2) * 50
                cur.execute(
                    "UPDATE accounts SET balance_cents = %s WHERE id = %s",
                    (final_stmt, stmt_acct),
                )
                cur.execute(
                    "UPDATE accounts SET balance_cents = %s, last_movement_at = now() WHERE id = %s",
                    (-OPENING_CENTS * seed.members - final_stmt, ADJUSTMENTS),
                )
                cur.execute("SELECT setval(pg_get_serial_sequence('transactions', 'id'), (SELECT max(id) FROM transactions))")
                cur.execute("SELECT setval(pg_get_serial_sequence('postings', 'id'), (SELECT max(id) FROM postings))")
                # the seed bypassed the write path: its day totals are computed from the postings
                cur.execute("SELECT account_day_totals_rebuild()")
                # and, with triggers off (replica), its balance totals from the accounts
                cur.execute("SELECT balance_totals_rebuild()")
            conn.autocommit = True
            with conn.cursor() as cur:
                for table in ("accounts", "transactions", "postings", "organisations"):
                    cur.execute(f"VACUUM ANALYZE {table}")
        finally:
            conn.close()
        self.check_invariants("seed", full=True)
        return time.perf_counter() - started

    def statement_deep_token_key(self, acct_id: int, depth: int):  # noqa: ANN201
        """(created_at, id) of the posting `depth` lines into the account's statement, newest first."""
        conn = self.connect()
        try:
            with conn.cursor() as cur:
                cur.execute(
                    "SELECT created_at, id FROM postings WHERE account_id = %s "
                    "ORDER BY created_at DESC, id DESC OFFSET %s LIMIT 1",
                    (acct_id, depth),
                )
                return cur.fetchone()
        finally:
            conn.close()

    # ------------------------------------------------------------------ the disk under the commits
    def checkpoint(self) -> bool:
        """`CHECKPOINT`, so a scenario does not pay for writing out what the one before it (or the
        seed) left dirty. False where this role may not (it needs superuser or `pg_checkpoint`)."""
        conn = self.connect()
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("CHECKPOINT")
            return True
        except psycopg2.errors.InsufficientPrivilege:
            return False
        finally:
            conn.close()

    def commit_probe(self, duration_s: float) -> dict:
        """Commits of one row, back to back, for `duration_s` with nothing else running: what a commit
        (its WAL flush) costs on this database's disk, and how often one stalls."""
        probe = CommitProbe(self, interval_s=0.0)
        probe.start()
        time.sleep(duration_s)
        return probe.stop()

    # ------------------------------------------------------------------ invariants
    def check_invariants(self, scenario: str, *, full: bool = False) -> dict:
        """Sum of balances zero, no member below zero, postings add up to balances, each new
        transaction sums to zero, and every new posting's balance-after follows from the one
        before it on its account's statement. Raises AssertionError, loudly, when one breaks."""
        started = time.perf_counter()
        conn = self.connect()
        problems: list[str] = []
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT COALESCE(SUM(balance_cents), 0) FROM accounts")
                total = cur.fetchone()[0]
                if total != 0:
                    problems.append(f"balances sum to {total}, not 0")
                cur.execute("SELECT count(*) FROM accounts WHERE kind = 1 AND balance_cents < 0")
                negative = cur.fetchone()[0]
                if negative:
                    problems.append(f"{negative} member balances below zero")
                cur.execute(
                    """
                    SELECT count(*) FROM accounts a
                    LEFT JOIN (SELECT account_id, SUM(amount_cents) AS s FROM postings GROUP BY account_id) p
                      ON p.account_id = a.id
                    WHERE a.balance_cents <> COALESCE(p.s, 0)
                    """
                )
                mismatched = cur.fetchone()[0]
                if mismatched:
                    problems.append(f"{mismatched} accounts whose postings do not add up to the balance")
                tw = 0 if full else self.watermark_transaction_id
                cur.execute(
                    "SELECT count(*) FROM (SELECT transaction_id FROM postings WHERE transaction_id > %s "
                    "GROUP BY transaction_id HAVING SUM(amount_cents) <> 0 OR count(*) < 2) t",
                    (tw,),
                )
                unbalanced = cur.fetchone()[0]
                if unbalanced:
                    problems.append(f"{unbalanced} transactions whose postings do not sum to zero")
                pw = 0 if full else self.watermark_posting_id
                cur.execute(
                    """
                    WITH touched AS (SELECT DISTINCT account_id FROM postings WHERE id > %(pw)s),
                    chain AS (
                      SELECT p.id, p.amount_cents, p.balance_after_cents,
                             lag(p.balance_after_cents) OVER (PARTITION BY p.account_id
                                                              ORDER BY p.created_at, p.id) AS before
                      FROM postings p JOIN touched t ON t.account_id = p.account_id
                    )
                    SELECT count(*) FROM chain
                    WHERE id > %(pw)s AND balance_after_cents <> COALESCE(before, 0) + amount_cents
                    """,
                    {"pw": pw},
                )
                broken = cur.fetchone()[0]
                if broken:
                    problems.append(f"{broken} postings whose balance-after does not follow from the line before")
                cur.execute("SELECT COALESCE(max(id), 0) FROM postings")
                self.watermark_posting_id = cur.fetchone()[0]
                cur.execute("SELECT COALESCE(max(id), 0) FROM transactions")
                self.watermark_transaction_id = cur.fetchone()[0]
        finally:
            conn.close()
        if problems:
            raise AssertionError(f"LEDGER INVARIANTS BROKEN after {scenario}: " + "; ".join(problems))
        return {"ok": True, "check_s": round(time.perf_counter() - started, 2)}


def _drop_secondary_indexes(cur, tables: tuple[str, ...]) -> list[str]:  # noqa: ANN001
    """Drop the unique constraints and plain indexes (not primary keys) of `tables`; return the
    statements that put them back. Building an index once is far cheaper than 2M inserts into it."""
    rebuild: list[str] = []
    for table in tables:
        cur.execute(
            "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = %s::regclass "
            "AND contype = 'u'",
            (table,),
        )
        constraints = cur.fetchall()
        cur.execute(
            "SELECT i.indexrelid::regclass::text, pg_get_indexdef(i.indexrelid) FROM pg_index i "
            "WHERE i.indrelid = %s::regclass AND NOT i.indisprimary "
            "AND i.indexrelid NOT IN (SELECT conindid FROM pg_constraint WHERE conrelid = %s::regclass)",
            (table, table),
        )
        indexes = cur.fetchall()
        for name, definition in constraints:
            cur.execute(f'ALTER TABLE {table} DROP CONSTRAINT "{name}"')
            rebuild.append(f'ALTER TABLE {table} ADD CONSTRAINT "{name}" {definition}')
        for name, definition in indexes:
            cur.execute(f"DROP INDEX {name}")
            rebuild.append(definition)
    return rebuild


def organisation_accounts(n: int) -> list[int]:
    return [organisation_account(i) for i in range(1, n + 1)]


class CommitProbe:
    """A thread on its own connection committing a one-row update every `interval_s` (back to back
    with 0) until stopped: the commit latency of this database's disk, alone or under a scenario's
    load. With 64 requests in flight a commit that stalls holds all of them, so stalls show in p99."""

    def __init__(self, db: BenchDatabase, interval_s: float):
        self.db = db
        self.interval_s = interval_s
        self.latencies: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._elapsed = 0.0

    def start(self) -> None:
        conn = self.db.connect()
        conn.autocommit = True
        with conn.cursor() as cur:  # its own row: no lock is shared with the load
            cur.execute("CREATE TABLE IF NOT EXISTS bench_commit_probe (id int PRIMARY KEY, n bigint NOT NULL)")
            cur.execute("INSERT INTO bench_commit_probe VALUES (1, 0) ON CONFLICT (id) DO NOTHING")
        self._thread = threading.Thread(target=self._run, args=(conn,), name="commit-probe", daemon=True)
        self._thread.start()

    def _run(self, conn) -> None:  # noqa: ANN001
        started = time.perf_counter()
        try:
            with conn.cursor() as cur:
                while not self._stop.is_set():
                    t0 = time.perf_counter()
                    cur.execute("UPDATE bench_commit_probe SET n = n + 1 WHERE id = 1")
                    took = time.perf_counter() - t0
                    self.latencies.append(took)
                    if self.interval_s:
                        self._stop.wait(max(0.0, self.interval_s - took))
        except BaseException as exc:  # reported by stop()
            self._error = exc
        finally:
            self._elapsed = time.perf_counter() - started
            conn.close()

    def stop(self) -> dict:
        assert self._thread is not None, "not started"
        self._stop.set()
        self._thread.join(30)
        if self._error is not None:
            raise RuntimeError(f"commit probe failed: {self._error!r}")
        values = sorted(self.latencies)
        return {
            "commits": len(values),
            "duration_s": round(self._elapsed, 2),
            "interval_ms": round(self.interval_s * 1000),
            "p50_ms": percentile_ms(values, 50),
            "p99_ms": percentile_ms(values, 99),
            "max_ms": round(values[-1] * 1000, 2) if values else None,
            "over_20ms": sum(1 for x in values if x > 0.020),
            "over_50ms": sum(1 for x in values if x > 0.050),
        }
