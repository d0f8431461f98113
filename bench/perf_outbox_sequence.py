"""What the commit-safe sequence costs writers on PostgreSQL: transactions per second of 8 writers that each
update an account row of their own and write one outbox event, with three ways of numbering the event:

- `nextval (naive)`: the plain sequence (fast, but a reader can skip events that commit out of order);
- `outbox_next_sequence()`: what the outbox uses (migration 0002: a shared advisory lock, then nextval);
- `counter row at commit`: the alternative design, one counter row updated by every writer (numbers in commit
  order, but writers queue behind each other until each commit is flushed).

    .venv/bin/python tests/perf_outbox_sequence.py [--seconds 4] [--writers 8] [--rounds 3]

Not a test: it only prints.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
import uuid
from pathlib import Path

import psycopg2
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from conftest import PG_URL  # noqa: E402

from server.ledger import migrate  # noqa: E402
from server.ledger.db import make_engine  # noqa: E402

VARIANTS = {
    "nextval (naive)": "INSERT INTO outbox_events (sequence, kind, created_at) "
                       "VALUES (nextval('outbox_events_sequence_seq'), 'X', now())",
    "outbox_next_sequence()": "INSERT INTO outbox_events (kind, created_at) VALUES ('X', now())",
    "counter row at commit": "WITH u AS (UPDATE perf_counter SET n = n + 1 WHERE id = 1 RETURNING n) "
                             "INSERT INTO outbox_events (sequence, kind, created_at) SELECT n, 'X', now() FROM u",
}


def measure(dsn: str, sql: str, writers: int, seconds: float) -> float:
    counts = [0] * writers
    stop_at = time.monotonic() + seconds

    def writer(i: int) -> None:
        conn = psycopg2.connect(dsn)
        cur = conn.cursor()
        while time.monotonic() < stop_at:
            cur.execute("UPDATE perf_accounts SET balance_cents = balance_cents + 1 WHERE id = %s", (i + 1,))
            cur.execute(sql)
            conn.commit()
            counts[i] += 1
        conn.close()

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4)
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    name = f"payments_perf_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        url = make_url(PG_URL).set(database=name)
        engine = make_engine(url.render_as_string(hide_password=False))
        migrate.upgrade(engine)
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE perf_counter (id int PRIMARY KEY, n bigint NOT NULL)"))
            conn.execute(text("INSERT INTO perf_counter VALUES (1, 1000000000)"))
            conn.execute(text("CREATE TABLE perf_accounts (id int PRIMARY KEY, balance_cents bigint NOT NULL)"))
            conn.execute(text("INSERT INTO perf_accounts SELECT g, 0 FROM generate_series(1, 256) g"))
        engine.dispose()
        dsn = " ".join(f"{k}={v}" for k, v in {
            "host": url.host, "port": url.port, "user": url.username, "password": url.password, "dbname": name,
        }.items() if v)
        for r in range(args.rounds):
            for label, sql in VARIANTS.items():
                rate = measure(dsn, sql, args.writers, args.seconds)
                print(f"round {r + 1}  {label:<24} {rate:8.0f} transactions/s ({args.writers} writers)", flush=True)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


if __name__ == "__main__":
    main()
