"""Apply Alembic migrations at start (SPEC §1)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine

MIGRATIONS = Path(__file__).parent / "migrations"


def alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


def upgrade(engine: Engine) -> None:
    cfg = alembic_config()
    with engine.begin() as conn:
        # several servers may start at once on one database: one migrates, the others wait
        conn.exec_driver_sql("SELECT pg_advisory_xact_lock(774411)")
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
