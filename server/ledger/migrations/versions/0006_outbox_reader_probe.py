"""outbox reader probe: a horizon that a crash or a promotion cannot make the database forget

Revision ID: 0006_outbox_reader_probe
Revises: 0005_account_day_totals

PostgreSQL WAL-logs a sequence ahead of what it hands out, and only a commit (or a full WAL page)
makes that log durable. Numbers drawn by transactions that never committed can therefore be drawn
again after crash recovery or after a standby is promoted. `outbox_reader_probe()` answers what
`outbox_writers_probe()` does plus what the stream's reader needs to stay below every number that
could be drawn again (server/events/horizon.py):
- `committed_sequence`, the highest committed event. Its commit made the WAL durable (and, with a
  synchronous standby, replicated) up to a sequence record that covers it, so no node will ever draw
  a number at or below it again.
- `new_session`, true on the first probe of a database session. A crash or a promotion ends every
  session, so in-flight writers seen on an earlier session may belong to another server's history.
"""

from alembic import op

revision = '0006_outbox_reader_probe'
down_revision = '0005_account_day_totals'
branch_labels = None
depends_on = None

WRITERS_LOCK_KEY = 774412  # migration 0002; server/events/horizon.py
SESSION_SETTING = 'payments.outbox_reader'


def upgrade() -> None:
    bind = op.get_bind()
    seq = bind.exec_driver_sql("SELECT pg_get_serial_sequence('outbox_events', 'sequence')").scalar()
    op.execute(
        "CREATE OR REPLACE FUNCTION outbox_reader_probe(OUT last_sequence bigint, OUT writers text[],\n"
        "                                               OUT committed_sequence bigint, OUT new_session boolean)\n"
        "LANGUAGE plpgsql VOLATILE AS $$\n"
        "BEGIN\n"
        f"  new_session := current_setting('{SESSION_SETTING}', true) IS DISTINCT FROM 'on';\n"
        "  IF new_session THEN\n"
        f"    PERFORM set_config('{SESSION_SETTING}', 'on', false);\n"
        "  END IF;\n"
        f"  SELECT CASE WHEN is_called THEN last_value ELSE 0 END INTO last_sequence FROM {seq};\n"
        "  SELECT coalesce(array_agg(virtualtransaction), '{}') INTO writers FROM pg_locks\n"
        "   WHERE locktype = 'advisory' AND classid = 0 AND objsubid = 1\n"
        f"     AND objid = {WRITERS_LOCK_KEY}\n"
        "     AND database = (SELECT oid FROM pg_database WHERE datname = current_database());\n"
        "  SELECT coalesce(max(sequence), 0) INTO committed_sequence FROM outbox_events;\n"
        "END\n"
        "$$"
    )


def downgrade() -> None:
    op.execute("DROP FUNCTION IF EXISTS outbox_reader_probe()")
