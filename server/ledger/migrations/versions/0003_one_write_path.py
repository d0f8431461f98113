"""one write path: idempotency records hold data; the schema refuses broken ledger rows

Revision ID: 0003_one_write_path
Revises: 0002_event_stream

- `idempotency_keys.result` (JSONB: the result's type and fields) replaces the stored response bytes.
  Records kept from before hold no result that can be rebuilt, so they are removed; a retry of such
  an old request then runs as a first request would.
- CHECK constraints: no empty posting; known posting types, account kinds and card purposes;
  positive card amounts; settlement figures that add up.
- A posting is never updated or deleted (a correction is a new transaction).
- The postings of one INSERT statement sum to zero per transaction (a statement-level trigger over
  the inserted rows: the write path inserts every posting of a transaction in one statement).
"""

from alembic import op

revision = '0003_one_write_path'
down_revision = '0002_event_stream'
branch_labels = None
depends_on = None

POSTING_TYPES = ("ENTRY_TO_EVENT", "CLUB_PAYMENT", "CLUB_MEMBERSHIP", "MEMBER_TRANSFER", "ORG_TRANSFER",
                 "MANUAL_TOP_UP", "AUTO_TOP_UP", "CC_PAYMENT", "SETTLEMENT", "MANUAL_ADJUSTMENT", "REFUND",
                 "CARD_REFUND", "MISCELLANEOUS")


def upgrade() -> None:
    op.execute("DELETE FROM idempotency_keys")
    op.execute("ALTER TABLE idempotency_keys DROP COLUMN response, ADD COLUMN result jsonb NOT NULL")
    types = ", ".join(f"'{t}'" for t in POSTING_TYPES)
    op.execute("ALTER TABLE postings ADD CONSTRAINT ck_postings_amount_not_zero CHECK (amount_cents <> 0)")
    op.execute(f"ALTER TABLE postings ADD CONSTRAINT ck_postings_type CHECK (type IN ({types}))")
    op.execute(f"ALTER TABLE transactions ADD CONSTRAINT ck_transactions_type CHECK (type IN ({types}))")
    op.execute("ALTER TABLE accounts ADD CONSTRAINT ck_accounts_kind CHECK (kind IN (1, 2, 3) AND id = ext_id * 4 + kind)")
    op.execute("ALTER TABLE card_payments ADD CONSTRAINT ck_card_payments_amount CHECK (amount_cents > 0 "
               "AND refunded_cents >= 0 AND refunded_cents <= amount_cents)")
    op.execute("ALTER TABLE settlements ADD CONSTRAINT ck_settlements_figures CHECK (gross_cents > 0 "
               "AND fee_cents >= 0 AND net_cents >= 0 AND fee_cents + net_cents = gross_cents "
               "AND gst_cents >= 0 AND gst_cents <= fee_cents)")
    op.execute(
        "CREATE FUNCTION postings_append_only() RETURNS trigger LANGUAGE plpgsql AS $$\n"
        "BEGIN\n"
        "  RAISE EXCEPTION 'postings are never updated or deleted; book a correcting transaction'\n"
        "    USING ERRCODE = 'integrity_constraint_violation';\n"
        "END $$"
    )
    op.execute("CREATE TRIGGER postings_append_only BEFORE UPDATE OR DELETE ON postings "
               "FOR EACH ROW EXECUTE FUNCTION postings_append_only()")
    op.execute(
        "CREATE FUNCTION postings_balanced() RETURNS trigger LANGUAGE plpgsql AS $$\n"
        "DECLARE unbalanced bigint;\n"
        "BEGIN\n"
        "  SELECT transaction_id INTO unbalanced FROM new_postings GROUP BY transaction_id\n"
        "   HAVING sum(amount_cents) <> 0 OR count(*) < 2 LIMIT 1;\n"
        "  IF FOUND THEN\n"
        "    RAISE EXCEPTION 'the postings of transaction % do not sum to zero', unbalanced\n"
        "      USING ERRCODE = 'check_violation';\n"
        "  END IF;\n"
        "  RETURN NULL;\n"
        "END $$"
    )
    op.execute("CREATE TRIGGER postings_balanced AFTER INSERT ON postings REFERENCING NEW TABLE AS new_postings "
               "FOR EACH STATEMENT EXECUTE FUNCTION postings_balanced()")


def downgrade() -> None:
    op.execute("DROP TRIGGER postings_balanced ON postings")
    op.execute("DROP FUNCTION postings_balanced()")
    op.execute("DROP TRIGGER postings_append_only ON postings")
    op.execute("DROP FUNCTION postings_append_only()")
    for table, name in (("settlements", "ck_settlements_figures"), ("card_payments", "ck_card_payments_amount"),
                        ("accounts", "ck_accounts_kind"), ("transactions", "ck_transactions_type"),
                        ("postings", "ck_postings_type"), ("postings", "ck_postings_amount_not_zero")):
        op.execute(f"ALTER TABLE {table} DROP CONSTRAINT {name}")
    op.execute("DELETE FROM idempotency_keys")
    op.execute("ALTER TABLE idempotency_keys DROP COLUMN result, ADD COLUMN response bytea NOT NULL")
