"""refunds keep their Stripe key

Revision ID: 0007_refund_stripe_key
Revises: 0006_outbox_reader_probe

A refund is made at Stripe with a key derived from the caller's idempotency key. Until Stripe's
answer is known the refund's row holds it in `stripe_refund_id` (`pending_<key>`); once the refund
is done that column holds Stripe's refund id. `stripe_key` keeps the key for good, so a retry of the
request after the reconciler completed the refund finds it (instead of holding the money again).
"""

from alembic import op

revision = '0007_refund_stripe_key'
down_revision = '0006_outbox_reader_probe'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE refunds ADD COLUMN stripe_key varchar(64)")
    op.execute("UPDATE refunds SET stripe_key = substr(stripe_refund_id, 9) WHERE stripe_refund_id LIKE 'pending\\_%'")
    op.execute("CREATE UNIQUE INDEX uq_refunds_stripe_key ON refunds (stripe_key)")


def downgrade() -> None:
    op.execute("DROP INDEX uq_refunds_stripe_key")
    op.execute("ALTER TABLE refunds DROP COLUMN stripe_key")
