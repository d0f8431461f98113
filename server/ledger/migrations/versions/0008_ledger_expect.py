"""a write of money checks itself in the statement that makes it

Revision ID: 0008_ledger_expect
Revises: 0007_refund_stripe_key

The one write path sends its rows and the COMMIT in one round trip, so it cannot read the counts of
what it wrote back before committing. `ledger_expect(ok, what)` lets the statement check them itself:
when `ok` is not true it raises (SQLSTATE XX000) and the transaction writes nothing.
"""

from alembic import op

revision = '0008_ledger_expect'
down_revision = '0007_refund_stripe_key'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
        CREATE FUNCTION ledger_expect(ok boolean, what text) RETURNS boolean LANGUAGE plpgsql AS $$
        BEGIN
          IF ok IS NOT TRUE THEN
            RAISE EXCEPTION 'ledger write refused: %', what USING ERRCODE = 'XX000';
          END IF;
          RETURN true;
        END $$""")


def downgrade() -> None:
    op.execute("DROP FUNCTION ledger_expect(boolean, text)")
