"""event stream: commit-safe sequence numbers, consumers scoped by principal, stream state

Revision ID: 0002_event_stream
Revises: 0001

- PostgreSQL: an outbox row takes its sequence number from `outbox_next_sequence()`, which makes sure
  the writing transaction holds a transaction id *before* it draws the number (the stream's reader
  relies on that to know which in-flight writers may still commit lower numbers), with a sequence
  cache of 1 so that the sequence's `last_value` is exact.
- SQLite: the outbox becomes AUTOINCREMENT so that a number is never handed out twice, even after
  every row was pruned.
- `event_consumers` is keyed by (principal, consumer): two callers may use the same consumer name.
- `event_stream_state` holds `pruned_through`, the highest sequence retention may have deleted.
"""

from alembic import op
import sqlalchemy as sa


revision = '0002_event_stream'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == 'postgresql':
        seq = bind.exec_driver_sql("SELECT pg_get_serial_sequence('outbox_events', 'sequence')").scalar()
        op.execute(f"ALTER SEQUENCE {seq} CACHE 1")
        op.execute(
            "CREATE OR REPLACE FUNCTION outbox_next_sequence() RETURNS bigint LANGUAGE plpgsql VOLATILE AS $$\n"
            "BEGIN\n"
            "  PERFORM pg_current_xact_id();\n"
            f"  RETURN nextval('{seq}'::regclass);\n"
            "END\n"
            "$$"
        )
        op.execute("ALTER TABLE outbox_events ALTER COLUMN sequence SET DEFAULT outbox_next_sequence()")
    else:
        with op.batch_alter_table('outbox_events', recreate='always',
                                  table_kwargs={'sqlite_autoincrement': True}) as batch_op:
            batch_op.alter_column('sequence', existing_type=sa.Integer(), autoincrement=True)

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
    if bind.dialect.name == 'postgresql':
        seq = bind.exec_driver_sql("SELECT pg_get_serial_sequence('outbox_events', 'sequence')").scalar()
        op.execute(f"ALTER TABLE outbox_events ALTER COLUMN sequence SET DEFAULT nextval('{seq}'::regclass)")
        op.execute("DROP FUNCTION IF EXISTS outbox_next_sequence()")
