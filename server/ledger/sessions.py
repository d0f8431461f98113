"""The name of every database session the server opens, and the end of its database work at shutdown.

- `application_name`: the URL names this process's sessions, the pool's and those opened from the
  URL alone (the event loop's connection, the event stream's listener), so that at the end of the
  shutdown's grace the work still running in them can be ended (`end_database_work`).
"""

from __future__ import annotations

import contextlib
import os

import psycopg2
import structlog
from sqlalchemy import Engine, event
from sqlalchemy.engine import make_url

from server.domain.errors import Unavailable

log = structlog.get_logger("payments.server")

APPLICATION_NAME = "payments-server"


def process_application_name() -> str:
    """This process's sessions' name: the service and a tag of its own (unique across hosts and restarts)."""
    return f"{APPLICATION_NAME}/{os.urandom(6).hex()}"


def with_application_name(url: str, name: str) -> str:
    """`url` with `application_name` set to `name` (PostgreSQL URLs only; others unchanged)."""
    parsed = make_url(url)
    if not parsed.drivername.startswith("postgresql"):
        return url
    return parsed.update_query_dict({"application_name": name}).render_as_string(hide_password=False)


def close_to_new_work(engine: Engine) -> None:
    """From now on `engine` hands out no connection: work that has not begun never begins (a
    retry of work that was ended, say), so nothing can commit behind the shutdown's back."""
    if getattr(engine, "_closed_to_new_work", False):
        return
    engine._closed_to_new_work = True  # type: ignore[attr-defined]

    @event.listens_for(engine, "checkout")
    def _refuse(dbapi_conn, record, proxy) -> None:  # noqa: ANN001 - the pool is disposed of right after
        raise Unavailable("the server is shutting down; retry on another")


# Backends of this process that are doing work: a statement running, or a transaction open.
_BUSY_BACKENDS_SQL = """
SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity
WHERE application_name = %s AND pid <> pg_backend_pid()
  AND state IN ('active', 'idle in transaction', 'idle in transaction (aborted)')
"""


def end_database_work(engine: Engine, application_name: str, timeout_s: float = 1.0) -> int:
    """End the transactions still open in this process's sessions: their backends are terminated,
    so what they did is rolled back (nothing of a cut-off call is committed) and the threads
    waiting on them get an error at once. Answers how many were ended. Terminating rather than
    cancelling, because a cancel ends only a running statement: a transaction between two
    statements would go on to commit."""
    if engine.dialect.name != "postgresql":
        return 0
    args, kwargs = engine.dialect.create_connect_args(engine.url)
    kwargs["connect_timeout"] = max(1, int(timeout_s))
    try:
        with contextlib.closing(psycopg2.connect(*args, **kwargs)) as conn:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(f"SET statement_timeout = {int(timeout_s * 1000)}")
                cur.execute(_BUSY_BACKENDS_SQL, (application_name,))
                ended = cur.fetchall()
    except psycopg2.Error as exc:  # the database is gone: so is the work that was running in it
        log.warning("could not end database work at shutdown", error=str(exc).splitlines()[0] if str(exc) else "")
        return 0
    return len(ended)
