"""postings' references checked once per statement, not once per row

Revision ID: 0009_posting_refs_per_statement
Revises: 0008_ledger_expect

A posting refers to its transaction, its account and its counterparty. Three foreign keys checked
those references row by row: three lookups and row locks per posting, about half a second of the
write that books a settlement of 10,000 clubs (30,000 postings), and as much as the rest of the
statement's indexes together. The same rule now holds once per statement, set-based:
- `postings_valid()`, the statement-level trigger after rows are added to postings (it replaces
  `postings_balanced()` of 0003 and keeps its check: each transaction's postings sum to zero, with
  two or more of them), refuses postings whose transaction or account or counterparty does not
  exist (`foreign_key_violation`). The lookups go through the primary keys, one per distinct id
  (a scalar subquery is never turned into a join, so a plan cached on a large insert stays an index
  lookup for the one-payment inserts after it).
- An account or a transaction that postings refer to cannot be deleted (`postings_referenced()`
  after a DELETE, per statement), and their ids never change (before an UPDATE of `id`; a balance
  update sets no `id`, so the hot path does not run it).
What the row locks of the foreign keys added: a posting's accounts are locked `FOR UPDATE` by the
write path before it writes (ledger.post), and its transaction is written in the same statement,
so nothing can delete them before it commits; nothing in the service deletes accounts or
transactions at all. TRUNCATE, as before for the append-only rule, is an operator's act that no
row trigger sees.
"""

from alembic import op

revision = '0009_posting_refs_per_statement'
down_revision = '0008_ledger_expect'
branch_labels = None
depends_on = None

_FOREIGN_KEYS = (
    ("fk_postings_transaction_id_transactions", "transaction_id", "transactions"),
    ("fk_postings_account_id_accounts", "account_id", "accounts"),
    ("fk_postings_counterparty_account_id_accounts", "counterparty_account_id", "accounts"),
)


def upgrade() -> None:
    op.execute(
        "CREATE FUNCTION postings_valid() RETURNS trigger LANGUAGE plpgsql AS $$\n"
        "DECLARE bad bigint;\n"
        "BEGIN\n"
        "  SELECT transaction_id INTO bad FROM new_postings GROUP BY transaction_id\n"
        "   HAVING sum(amount_cents) <> 0 OR count(*) < 2 LIMIT 1;\n"
        "  IF FOUND THEN\n"
        "    RAISE EXCEPTION 'the postings of transaction % do not sum to zero', bad\n"
        "      USING ERRCODE = 'check_violation';\n"
        "  END IF;\n"
        "  SELECT n.id INTO bad FROM (SELECT DISTINCT transaction_id FROM new_postings) n(id)\n"
        "   WHERE (SELECT true FROM transactions t WHERE t.id = n.id) IS NULL LIMIT 1;\n"
        "  IF FOUND THEN\n"
        "    RAISE EXCEPTION 'postings refer to transaction %, which does not exist', bad\n"
        "      USING ERRCODE = 'foreign_key_violation';\n"
        "  END IF;\n"
        "  SELECT n.id INTO bad FROM (SELECT account_id FROM new_postings\n"
        "                             UNION SELECT counterparty_account_id FROM new_postings) n(id)\n"
        "   WHERE n.id IS NOT NULL AND (SELECT true FROM accounts a WHERE a.id = n.id) IS NULL LIMIT 1;\n"
        "  IF FOUND THEN\n"
        "    RAISE EXCEPTION 'postings refer to account %, which does not exist', bad\n"
        "      USING ERRCODE = 'foreign_key_violation';\n"
        "  END IF;\n"
        "  RETURN NULL;\n"
        "END $$"
    )
    op.execute("DROP TRIGGER postings_balanced ON postings")
    op.execute("DROP FUNCTION postings_balanced()")
    op.execute("CREATE TRIGGER postings_valid AFTER INSERT ON postings REFERENCING NEW TABLE AS new_postings "
               "FOR EACH STATEMENT EXECUTE FUNCTION postings_valid()")
    for name, _, _ in _FOREIGN_KEYS:
        op.execute(f"ALTER TABLE postings DROP CONSTRAINT {name}")
    # the referenced side: no deleting what postings refer to, no changing its id
    op.execute(
        "CREATE FUNCTION postings_referenced() RETURNS trigger LANGUAGE plpgsql AS $$\n"
        "DECLARE bad bigint;\n"
        "BEGIN\n"
        "  IF TG_TABLE_NAME = 'accounts' THEN\n"
        "    SELECT g.id INTO bad FROM gone g WHERE EXISTS (SELECT 1 FROM postings p WHERE p.account_id = g.id)\n"
        "      OR EXISTS (SELECT 1 FROM postings p WHERE p.counterparty_account_id = g.id) LIMIT 1;\n"
        "  ELSE\n"
        "    SELECT g.id INTO bad FROM gone g\n"
        "     WHERE EXISTS (SELECT 1 FROM postings p WHERE p.transaction_id = g.id) LIMIT 1;\n"
        "  END IF;\n"
        "  IF FOUND THEN\n"
        "    RAISE EXCEPTION 'postings refer to % %: it stays', rtrim(TG_TABLE_NAME, 's'), bad\n"
        "      USING ERRCODE = 'foreign_key_violation';\n"
        "  END IF;\n"
        "  RETURN NULL;\n"
        "END $$"
    )
    op.execute(
        "CREATE FUNCTION ledger_id_fixed() RETURNS trigger LANGUAGE plpgsql AS $$\n"
        "BEGIN\n"
        "  RAISE EXCEPTION 'the id of % % never changes', rtrim(TG_TABLE_NAME, 's'), OLD.id\n"
        "    USING ERRCODE = 'foreign_key_violation';\n"
        "END $$"
    )
    for table in ("accounts", "transactions"):
        op.execute(f"CREATE TRIGGER {table}_referenced AFTER DELETE ON {table} REFERENCING OLD TABLE AS gone "
                   "FOR EACH STATEMENT EXECUTE FUNCTION postings_referenced()")
        op.execute(f"CREATE TRIGGER {table}_id_fixed BEFORE UPDATE OF id ON {table} FOR EACH ROW "
                   "WHEN (OLD.id IS DISTINCT FROM NEW.id) EXECUTE FUNCTION ledger_id_fixed()")


def downgrade() -> None:
    for table in ("accounts", "transactions"):
        op.execute(f"DROP TRIGGER {table}_id_fixed ON {table}")
        op.execute(f"DROP TRIGGER {table}_referenced ON {table}")
    op.execute("DROP FUNCTION ledger_id_fixed()")
    op.execute("DROP FUNCTION postings_referenced()")
    for name, column, table in _FOREIGN_KEYS:
        op.execute(f"ALTER TABLE postings ADD CONSTRAINT {name} FOREIGN KEY ({column}) REFERENCES {table} (id)")
    op.execute("DROP TRIGGER postings_valid ON postings")
    op.execute("DROP FUNCTION postings_valid()")
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
