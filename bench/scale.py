"""The data-scale scenarios: administrators' work as the books grow, each beside the same work in
bare SQL where that makes sense (`vs_sql`: the service's time over bare SQL's).

- Settle of 1,000 and 10,000 organisations, dry run and real;
- ExportStatement of an account with a long statement: lines/s and the server's RSS growth;
- GetOrganisationSummary over a range holding the long history; GetAdminSummary over every account;
- ListBalances paging through every account: each page's p50 at every depth.

One caller at a time: the figures are each request's own latency, not a queue's.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import grpc

from bench.database import BenchDatabase
from bench.load import ADMIN_TOKEN, ServerProcess
from bench.scale_seed import SUMMARY_ORGANISATION, ScaleSeed
from bench.stats import Samples
from cobalt.payments.v1 import payments_pb2 as pb
from cobalt.payments.v1 import payments_pb2_grpc as pb_grpc
from server.domain.types import member_account

ADMIN_METADATA = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
CALL_TIMEOUT_S = 600
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def _timed(fn: Callable[[], object], repeat: int) -> tuple[Samples, object]:
    samples = Samples()
    samples.started()
    last = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        last = fn()
        samples.extend([time.perf_counter() - t0])
    samples.stopped()
    return samples, last


def _sql_p50_ms(db: BenchDatabase, sql: str, params: dict | tuple, repeat: int) -> float:
    conn = db.connect()
    try:
        with conn.cursor() as cur:
            times = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                cur.execute(sql, params)
                cur.fetchall()
                times.append(time.perf_counter() - t0)
            conn.rollback()
    finally:
        conn.close()
    times.sort()
    return round(times[len(times) // 2] * 1000, 2)


class RssSampler:
    """The server process's resident set, sampled every 10 ms from /proc while a call runs."""

    def __init__(self, pid: int):
        self.pid = pid
        self.before_kb = self._rss_kb()
        self.peak_kb = self.before_kb
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="rss")
        self._thread.start()

    def _rss_kb(self) -> int:
        try:
            with open(f"/proc/{self.pid}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1])
        except OSError:
            pass
        return 0

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak_kb = max(self.peak_kb, self._rss_kb())

    def stop(self) -> float:
        """The growth in MB over the RSS before."""
        self._stop.set()
        self._thread.join()
        self.peak_kb = max(self.peak_kb, self._rss_kb())
        return round((self.peak_kb - self.before_kb) / 1024, 1)


# ---------------------------------------------------------------- settle in bare SQL
# The same bookings as Settle, set-based in one statement, rolled back: what the database needs
# for the work (locks, transactions, postings with balance after, balances), with no service.
_SETTLE_SQL = """
WITH locked AS (
    SELECT id, balance_cents FROM accounts WHERE id = ANY(%(accts)s) ORDER BY id FOR UPDATE
), org AS (
    SELECT o.organisation_id, l.id AS acct, l.balance_cents - o.minimum_balance_cents AS gross,
           COALESCE(o.settlement_fee_bp, 200) AS fee_bp, o.minimum_balance_cents,
           row_number() OVER (ORDER BY l.id) AS n
    FROM locked l JOIN organisations o ON l.id = o.organisation_id * 4 + 2
    WHERE l.balance_cents > o.minimum_balance_cents
), due AS (
    SELECT org.*, (gross * fee_bp + 5000) / 10000 AS fee FROM org
), txn AS (
    INSERT INTO transactions (reference, type, description, principal, batch_id, created_at)
    SELECT 'SQL-' || %(batch)s || '-' || n, 'SETTLEMENT', 'Settlement', 'bench', %(batch)s, clock_timestamp()
    FROM due ORDER BY n RETURNING id, reference
), txn_n AS (
    SELECT id, split_part(reference, '-', 3)::bigint AS n FROM txn
), sys AS (
    SELECT id, balance_cents FROM accounts WHERE id IN (%(federation)s, %(bank)s) ORDER BY id FOR UPDATE
), legs AS (
    SELECT t.id AS txn_id, d.n, d.acct AS account_id, -d.gross AS amount, d.minimum_balance_cents AS after,
           %(bank)s AS cp, 1 AS leg
    FROM due d JOIN txn_n t USING (n)
    UNION ALL
    SELECT t.id, d.n, %(federation)s, d.fee,
           (SELECT balance_cents FROM sys WHERE id = %(federation)s) + sum(d.fee) OVER (ORDER BY d.n), d.acct, 2
    FROM due d JOIN txn_n t USING (n)
    UNION ALL
    SELECT t.id, d.n, %(bank)s, d.gross - d.fee,
           (SELECT balance_cents FROM sys WHERE id = %(bank)s) + sum(d.gross - d.fee) OVER (ORDER BY d.n), d.acct, 3
    FROM due d JOIN txn_n t USING (n)
), posted AS (
    INSERT INTO postings (transaction_id, account_id, amount_cents, balance_after_cents, counterparty_account_id,
                          reference, type, description, created_at)
    SELECT txn_id, account_id, amount, after, cp, 'SQL-' || %(batch)s || '-' || n || '-' || leg, 'SETTLEMENT',
           'Settlement', clock_timestamp()
    FROM legs RETURNING account_id, amount_cents
), orgs_done AS (
    UPDATE accounts a SET balance_cents = d.minimum_balance_cents, last_movement_at = clock_timestamp()
    FROM due d WHERE a.id = d.acct RETURNING a.id
), sys_done AS (
    UPDATE accounts a SET balance_cents = a.balance_cents + s.total
    FROM (SELECT account_id, sum(amount_cents) AS total FROM posted WHERE account_id IN (%(federation)s, %(bank)s)
          GROUP BY account_id) s
    WHERE a.id = s.account_id RETURNING a.id
)
SELECT (SELECT count(*) FROM orgs_done), (SELECT count(*) FROM sys_done)
"""


def settle_sql_s(db: BenchDatabase, ids: list[int]) -> float:
    from server.domain.types import SystemAccount, system_account

    conn = db.connect()
    try:
        with conn.cursor() as cur:
            t0 = time.perf_counter()
            cur.execute(_SETTLE_SQL, {"accts": [i * 4 + 2 for i in ids], "batch": uuid.uuid4().hex[:8],
                                      "federation": system_account(SystemAccount.FEDERATION),
                                      "bank": system_account(SystemAccount.BANK)})
            orgs, _ = cur.fetchone()
            elapsed = time.perf_counter() - t0
            assert orgs == len(ids), f"bare SQL settled {orgs} of {len(ids)}"
        conn.rollback()  # the service settles them for real next
    finally:
        conn.close()
    return elapsed


def _export_sql_lines_per_s(db: BenchDatabase, acct: int) -> tuple[float, int]:
    """COPY of the same lines as CSV: what PostgreSQL alone streams."""
    import io

    class Sink(io.RawIOBase):
        def __init__(self) -> None:
            self.lines = 0

        def writable(self) -> bool:
            return True

        def write(self, b) -> int:  # noqa: ANN001
            self.lines += bytes(b).count(b"\n")
            return len(b)

    conn = db.connect()
    try:
        with conn.cursor() as cur:
            sink = Sink()
            t0 = time.perf_counter()
            cur.copy_expert(
                f"COPY (SELECT to_char(p.created_at AT TIME ZONE 'Australia/Sydney', 'YYYY-MM-DD HH24:MI:SS'), "
                f"o.name, p.reference, p.type, p.description, p.amount_cents / 100.0, p.balance_after_cents / 100.0 "
                f"FROM postings p LEFT JOIN accounts o ON o.id = p.counterparty_account_id "
                f"WHERE p.account_id = {int(acct)} ORDER BY p.created_at DESC, p.id DESC) TO STDOUT WITH CSV",
                sink)
            elapsed = time.perf_counter() - t0
    finally:
        conn.close()
    return sink.lines / elapsed, sink.lines


# ---------------------------------------------------------------- the scenarios

def run(db: BenchDatabase, server: ServerProcess, seed: ScaleSeed, statement_member_id: int,
        statement_lines: int, record: Callable[..., None], wanted: Callable[[str], bool], repeat: int,
        list_walks: int) -> None:
    channel = grpc.insecure_channel(server.target, options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)])
    stub = pb_grpc.PaymentsServiceStub(channel)
    try:
        _settle(db, stub, seed, record, wanted, repeat)
        if wanted("data_export"):
            _export(db, stub, server, statement_member_id, statement_lines, record)
        if wanted("data_org_summary"):
            _org_summary(db, stub, seed, record, repeat)
        if wanted("data_admin_summary"):
            _admin_summary(db, stub, record, repeat)
        if wanted("data_list_balances"):
            _list_balances(db, stub, record, list_walks)
    finally:
        channel.close()


def _label(n: int) -> str:
    if n >= 1_000_000:
        return f"{n // 1_000_000}m"
    return f"{n // 1000}k" if n >= 1000 else str(n)


def _settle(db: BenchDatabase, stub, seed: ScaleSeed, record, wanted, repeat: int) -> None:  # noqa: ANN001
    for large in (False, True):
        ids = seed.settle_ids(large)
        size = _label(len(ids))
        dry_name, real_name = f"data_settle_{size}_dry", f"data_settle_{size}"
        if wanted(dry_name):
            def dry(ids: list[int] = ids) -> pb.SettleResponse:
                return stub.Settle(pb.SettleRequest(organisation_ids=ids, dry_run=True), metadata=ADMIN_METADATA,
                                   timeout=CALL_TIMEOUT_S)

            samples, res = _timed(dry, repeat)
            assert len(res.rows) == len(ids), f"dry run shows {len(res.rows)} of {len(ids)}"
            sql_ms = _sql_p50_ms(db, _SETTLE_CANDIDATES_SQL, {"ids": ids}, repeat)
            record(dry_name, samples, throughput=False, note=f"{len(ids):,} organisations, dry run",
                   extra={"sql_ms": sql_ms, "organisations": len(ids)})
        if wanted(real_name):
            sql_s = settle_sql_s(db, ids)

            def real(ids: list[int] = ids) -> pb.SettleResponse:
                return stub.Settle(pb.SettleRequest(idempotency_key=uuid.uuid4().hex, organisation_ids=ids),
                                   metadata=ADMIN_METADATA, timeout=CALL_TIMEOUT_S)

            samples, res = _timed(real, 1)
            assert len(res.rows) == len(ids), f"settled {len(res.rows)} of {len(ids)}"
            record(real_name, samples, throughput=False,
                   note=f"{len(ids):,} organisations, real: {len(ids) * 3:,} postings"
                        + (", ABA file" if res.aba_file else ""),
                   extra={"sql_ms": round(sql_s * 1000, 2), "organisations": len(ids),
                          "aba_file_bytes": len(res.aba_file)})


_SETTLE_CANDIDATES_SQL = (
    "SELECT o.organisation_id, o.name, o.bsb, o.account_number, o.minimum_balance_cents, o.settlement_fee_bp, "
    "a.balance_cents FROM organisations o JOIN accounts a ON a.id = o.organisation_id * 4 + 2 "
    "WHERE o.organisation_id = ANY(%(ids)s) ORDER BY a.id"
)


def _export(db: BenchDatabase, stub, server: ServerProcess, member_id: int, expected: int, record) -> None:  # noqa: ANN001
    sql_rate, sql_lines = _export_sql_lines_per_s(db, member_account(member_id))
    rss = RssSampler(server.pid)
    samples = Samples()
    samples.started()
    t0 = time.perf_counter()
    lines = 0
    data_bytes = 0
    for chunk in stub.ExportStatement(pb.ExportStatementRequest(account=pb.AccountRef(member_id=member_id)),
                                      metadata=ADMIN_METADATA, timeout=CALL_TIMEOUT_S):
        lines += chunk.data.count(b"\n")
        data_bytes += len(chunk.data)
    elapsed = time.perf_counter() - t0
    samples.extend([elapsed])
    samples.stopped()
    growth_mb = rss.stop()
    lines -= 1  # the header
    assert lines == expected == sql_lines, f"exported {lines} lines, COPY {sql_lines}, expected {expected}"
    rate = lines / elapsed
    record("data_export", samples, throughput=False,
           note=f"{lines:,} lines streamed, {rate:,.0f} lines/s, server RSS +{growth_mb} MB",
           extra={"lines": lines, "lines_per_s": round(rate), "bytes": data_bytes, "rss_growth_mb": growth_mb,
                  "sql_lines_per_s": round(sql_rate), "vs_sql": round(sql_rate / rate, 2)})


def _org_summary(db: BenchDatabase, stub, seed: ScaleSeed, record, repeat: int) -> None:  # noqa: ANN001
    start, end = datetime.now(UTC) - timedelta(days=1000), datetime.now(UTC)
    req = pb.GetOrganisationSummaryRequest(organisation_id=SUMMARY_ORGANISATION)
    getattr(req, "from").FromDatetime(start)
    req.to.FromDatetime(end)
    samples, res = _timed(lambda: stub.GetOrganisationSummary(req, metadata=ADMIN_METADATA, timeout=CALL_TIMEOUT_S),
                          repeat)
    counted = sum(t.count for t in res.totals)
    assert counted == seed.summary_postings, f"the summary counts {counted} lines, not {seed.summary_postings}"
    sql_ms = _sql_p50_ms(
        db,
        "SELECT type, sum(amount_cents), count(*), sum(CASE WHEN amount_cents > 0 THEN amount_cents ELSE 0 END), "
        "sum(CASE WHEN amount_cents < 0 THEN -amount_cents ELSE 0 END) FROM postings "
        "WHERE account_id = %(acct)s AND created_at >= %(start)s AND created_at < %(end)s GROUP BY type",
        {"acct": seed.summary_account, "start": start, "end": end}, repeat)
    record(f"data_org_summary_{_label(seed.summary_postings)}", samples, throughput=False, note=f"{seed.summary_postings:,} postings in the range",
           extra={"sql_ms": sql_ms, "postings": seed.summary_postings})


def _admin_summary(db: BenchDatabase, stub, record, repeat: int) -> None:  # noqa: ANN001
    samples, _ = _timed(lambda: stub.GetAdminSummary(pb.GetAdminSummaryRequest(), metadata=ADMIN_METADATA,
                                                     timeout=CALL_TIMEOUT_S), repeat)
    conn = db.connect()
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM accounts")
        n_accounts = cur.fetchone()[0]
    conn.close()
    sql_ms = _sql_p50_ms(db, "SELECT kind, count(*) FILTER (WHERE balance_cents <> 0), sum(balance_cents) "
                             "FROM accounts GROUP BY kind", {}, repeat)
    record(f"data_admin_summary_{_label(n_accounts)}", samples, throughput=False, note=f"{n_accounts:,} accounts",
           extra={"sql_ms": sql_ms, "accounts": n_accounts})


def _list_balances(db: BenchDatabase, stub, record, walks: int) -> None:  # noqa: ANN001
    """Walk every page `walks` times; each page's p50 over the walks, the worst of them reported."""
    per_page: list[list[float]] = []
    samples = Samples()
    samples.started()
    count = 0
    for _ in range(walks):
        token, page = "", 0
        while True:
            t0 = time.perf_counter()
            res = stub.ListBalances(pb.ListBalancesRequest(page_size=100, page_token=token), metadata=ADMIN_METADATA,
                                    timeout=CALL_TIMEOUT_S)
            took = time.perf_counter() - t0
            samples.extend([took])
            if page == len(per_page):
                per_page.append([])
            per_page[page].append(took)
            page += 1
            count = res.count
            token = res.next_page_token
            if not token:
                break
    samples.stopped()
    conn = db.connect()
    try:
        with conn.cursor() as cur:  # what the pages said over all pages is what the accounts hold
            cur.execute("SELECT count(*), coalesce(sum(balance_cents), 0) FROM accounts WHERE kind IN (1, 2) "
                        "AND balance_cents <> 0")
            counted, total = cur.fetchone()
    finally:
        conn.close()
    assert (count, res.total_cents) == (counted, total), \
        f"ListBalances said {count} accounts holding {res.total_cents}; they are {counted} holding {total}"
    p50s = [sorted(times)[len(times) // 2] * 1000 for times in per_page]
    worst = max(range(len(p50s)), key=lambda i: p50s[i])
    sql_ms = _sql_p50_ms(
        db, "SELECT id, kind, ext_id, name, balance_cents FROM accounts WHERE kind IN (1, 2) AND balance_cents <> 0 "
            "AND (kind, id) > (2, 0) ORDER BY kind, id LIMIT 101", {}, 20)
    record(f"data_list_balances_{_label(count)}", samples, throughput=False,
           note=f"{len(per_page)} pages of 100, walked {walks}x; worst page p50 {p50s[worst]:.2f} ms at page {worst + 1}",
           extra={"pages": len(per_page), "page_p50_ms": [round(v, 2) for v in p50s], "worst_page_p50_ms":
                  round(p50s[worst], 2), "worst_page": worst + 1, "sql_ms": sql_ms, "accounts": count})
