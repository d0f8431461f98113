"""event stream: commit-safe sequence numbers, consumers scoped by principal, stream state

Revision ID: 0002_event_stream
Revises: 0001

- An outbox row takes its sequence number from `outbox_next_sequence()`, which first takes
  a shared transaction-level advisory lock (key 774412, never taken exclusively) and then draws the
  number, with a sequence cache of 1 so that the sequence's `last_value` is exact. Until it ends, a
  transaction that drew a number is listed in pg_locks under that key; `outbox_writers_probe()` reads
  the last number drawn and then those in-flight writers, which is what the stream's reader needs to
  know up to which number every event is final (see server/events/horizon.py).
- `event_consumers` is keyed by (principal, consumer): two callers may use the same consumer name.
- `event_stream_state` holds `pruned_through`, the highest sequence retention may have deleted.
"""

import sqlalchemy as sa
from alembic import op

revision = '0002_event_stream'
down_revision = '0001'
branch_labels = None
depends_on = None

WRITERS_LOCK_KEY = 774412  # server/events/horizon.py reads the same key


def upgrade() -> None:
    bind = op.get_bind()
    seq = bind.exec_driver_sql("SELECT pg_get_serial_sequence('outbox_events', 'sequence')").scalar()
    op.execute(f"ALTER SEQUENCE {seq} CACHE 1")
    op.execute(
        "CREATE OR REPLACE FUNCTION outbox_next_sequence() RETURNS bigint LANGUAGE plpgsql VOLATILE AS $$\n"
        "BEGIN\n"
        f"  PERFORM pg_advisory_xact_lock_shared({WRITERS_LOCK_KEY});\n"
        f"  RETURN nextval('{seq}'::regclass);\n"
        "END\n"
        "$$"
    )
    op.execute(
        "CREATE OR REPLACE FUNCTION outbox_writers_probe(OUT last_sequence bigint, OUT writers text[])\n"
        "LANGUAGE plpgsql VOLATILE AS $$\n"
        "BEGIN\n"
        f"  SELECT CASE WHEN is_called THEN last_value ELSE 0 END INTO last_sequence FROM {seq};\n"
        "  SELECT coalesce(array_agg(virtualtransaction), '{}') INTO writers FROM pg_locks\n"
        "   WHERE locktype = 'advisory' AND classid = 0 AND objsubid = 1\n"
        f"     AND objid = {WRITERS_LOCK_KEY}\n"
        "     AND database = (SELECT oid FROM pg_database WHERE datname = current_database());\n"
        "END\n"
        "$$"
    )
    op.execute("ALTER TABLE outbox_events ALTER COLUMN sequence SET DEFAULT outbox_next_sequence()")

    with op.batch_alter_table('event_consumers', schema=None) as batch_op:
        batch_op.drop_constraint('pk_event_consumers', type_='primary')
        batch_op.create_primary_key('pk_event_consumers', ['principal', 'consumer'])

    op.create_table('event_stream_state',
    sa.Column('name', sa.String(length=40), nullable=False),
    sa.Column('value', sa.BigInteger(), server_default='0', nullable=False),
    sa.PrimaryKeyConstraint('name', name=op.f('pk_event_stream_state'))
    )


def downgrade() -> None:
    op.drop_table('event_stream_state')
    with op.batch_alter_table('event_consumers', schema=None) as batch_op:
        batch_op.drop_constraint('pk_event_consumers', type_='primary')
        batch_op.create_primary_key('pk_event_consumers', ['consumer'])
    bind = op.get_bind()
    seq = bind.exec_driver_sql("SELECT pg_get_serial_sequence('outbox_events', 'sequence')").scalar()
    op.execute(f"ALTER TABLE outbox_events ALTER COLUMN sequence SET DEFAULT nextval('{seq}'::regclass)")
    op.execute("DROP FUNCTION IF EXISTS outbox_next_sequence()")
    op.execute("DROP FUNCTION IF EXISTS outbox_writers_probe()")
