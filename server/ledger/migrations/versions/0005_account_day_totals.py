"""organisation totals per day and type, kept by the write path

Revision ID: 0005_account_day_totals
Revises: 0004_account_listing_index

`account_day_totals` holds, for each organisation account, UTC day and posting type, the sum,
count, money in and money out of its postings. The write path adds to it in the statement that
writes the postings, while the organisation's row lock is held, so it is always exactly the sum of
the postings. GetOrganisationSummary reads whole days from it and only the part-days at the ends
of its range from the postings. `account_day_totals_rebuild()` computes it again from the postings
(the migration's backfill, and after a bulk load that bypassed the write path).
"""

from alembic import op

revision = '0005_account_day_totals'
down_revision = '0004_account_listing_index'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        "CREATE TABLE account_day_totals ("
        " account_id bigint NOT NULL REFERENCES accounts (id),"
        " day date NOT NULL,"
        " type varchar(24) NOT NULL,"
        " amount_cents bigint NOT NULL,"
        " count bigint NOT NULL CHECK (count > 0),"
        " in_cents bigint NOT NULL CHECK (in_cents >= 0),"
        " out_cents bigint NOT NULL CHECK (out_cents >= 0),"
        " CONSTRAINT pk_account_day_totals PRIMARY KEY (account_id, day, type),"
        " CONSTRAINT ck_account_day_totals_sum CHECK (amount_cents = in_cents - out_cents))"
    )
    op.execute(
        "CREATE FUNCTION account_day_totals_rebuild() RETURNS void LANGUAGE sql AS $$\n"
        "  DELETE FROM account_day_totals;\n"
        "  INSERT INTO account_day_totals (account_id, day, type, amount_cents, count, in_cents, out_cents)\n"
        "  SELECT account_id, (created_at AT TIME ZONE 'UTC')::date, type, sum(amount_cents), count(*),\n"
        "         sum(greatest(amount_cents, 0)), sum(greatest(-amount_cents, 0))\n"
        "  FROM postings WHERE account_id % 4 = 2 GROUP BY 1, 2, 3;\n"
        "$$"
    )
    op.execute("SELECT account_day_totals_rebuild()")


def downgrade() -> None:
    op.execute("DROP FUNCTION account_day_totals_rebuild()")
    op.execute("DROP TABLE account_day_totals")
