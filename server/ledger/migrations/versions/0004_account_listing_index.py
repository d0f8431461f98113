"""accounts listed by kind: an index on (kind, id)

Revision ID: 0004_account_listing_index
Revises: 0003_one_write_path

ListBalances pages through accounts in (kind, id) order with a keyset; the primary key (id) alone
makes every page sort the whole table. This index lets a page seek to where the last one ended.
"""

from alembic import op

revision = '0004_account_listing_index'
down_revision = '0003_one_write_path'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_accounts_kind_id", "accounts", ["kind", "id"])


def downgrade() -> None:
    op.drop_index("ix_accounts_kind_id", table_name="accounts")
