"""The tables. SQLAlchemy Core: the hot path issues plain statements, no ORM identity map.

Postings are append-only; balances live on `accounts` and every posting stores the balance after
it, written while the account row is locked, so a statement never has to add up history.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Date,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Numeric,
    SmallInteger,
    String,
    Table,
    Text,
)
from sqlalchemy.dialects.postgresql import JSONB

BigId = BigInteger()

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

accounts = Table(
    "accounts",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=False),  # types.account_id(kind, ext_id)
    Column("kind", SmallInteger, nullable=False),
    Column("ext_id", BigInteger, nullable=False),
    Column("name", String(200), nullable=False, server_default=""),
    Column("balance_cents", BigInteger, nullable=False, server_default="0"),
    Column("last_movement_at", DateTime(timezone=True)),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Index("ix_accounts_kind_id", "kind", "id"),  # ListBalances' keyset (migration 0004)
)

organisations = Table(
    "organisations",
    metadata,
    Column("organisation_id", BigInteger, primary_key=True, autoincrement=False),
    Column("name", String(200), nullable=False),
    Column("bsb", String(7), nullable=False, server_default=""),
    Column("account_number", String(20), nullable=False, server_default=""),
    Column("minimum_balance_cents", BigInteger, nullable=False, server_default="0"),
    Column("settlement_fee_bp", Integer),  # NULL: the default settlement fee applies
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

transactions = Table(
    "transactions",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("reference", String(32), nullable=False, unique=True),
    Column("type", String(24), nullable=False),
    Column("description", String(80), nullable=False),
    Column("principal", String(100), nullable=False),
    Column("payment_id", String(40), index=True),
    Column("batch_id", String(40), index=True),
    Column("event_id", BigInteger),
    Column("session_id", BigInteger),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

postings = Table(
    "postings",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    # transaction_id, account_id and counterparty_account_id refer to transactions and accounts: checked
    # once per INSERT statement by the trigger postings_valid() (migration 0009), not by foreign keys
    Column("transaction_id", BigInteger, nullable=False, index=True),
    Column("account_id", BigInteger, nullable=False),
    Column("amount_cents", BigInteger, nullable=False),
    Column("balance_after_cents", BigInteger, nullable=False),
    Column("counterparty_account_id", BigInteger),
    Column("reference", String(40), nullable=False, unique=True),
    Column("type", String(24), nullable=False),
    Column("description", String(80), nullable=False),
    Column("payment_id", String(40)),
    Column("event_id", BigInteger),
    Column("session_id", BigInteger),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Index("ix_postings_account_time", "account_id", "created_at", "id"),
)

idempotency_keys = Table(
    "idempotency_keys",
    metadata,
    Column("principal", String(100), primary_key=True),
    Column("key", String(255), primary_key=True),
    Column("method", String(64), nullable=False),
    Column("request_hash", String(64), nullable=False),
    Column("result", JSONB, nullable=False),  # {"type": result class, "data": its fields} (idempotency.py)
    Column("created_at", DateTime(timezone=True), nullable=False),
)

# The transactional outbox: one row per event, written in the transaction of the money it reports.
outbox_events = Table(
    "outbox_events",
    metadata,
    Column("sequence", BigId, primary_key=True, autoincrement=True),
    Column("kind", String(24), nullable=False),
    Column("route_code", String(16), nullable=False, server_default=""),
    Column("route_payload", Text, nullable=False, server_default=""),
    Column("payment_id", String(40), nullable=False, server_default=""),
    Column("member_id", BigInteger, nullable=False, server_default="0"),
    Column("organisation_id", BigInteger, nullable=False, server_default="0"),
    Column("other_member_id", BigInteger, nullable=False, server_default="0"),
    Column("amount_cents", BigInteger, nullable=False, server_default="0"),
    Column("balance_cents", BigInteger, nullable=False, server_default="0"),
    Column("reference", String(40), nullable=False, server_default=""),
    Column("reason", String(200), nullable=False, server_default=""),
    Column("event_id", BigInteger, nullable=False, server_default="0"),
    Column("session_id", BigInteger, nullable=False, server_default="0"),
    Column("created_at", DateTime(timezone=True), nullable=False),
    # the default is outbox_next_sequence() (migration 0002), which takes a transaction id before the number
)

# A durable consumer's progress; names are scoped by the calling principal.
event_consumers = Table(
    "event_consumers",
    metadata,
    Column("principal", String(100), primary_key=True),
    Column("consumer", String(100), primary_key=True),
    Column("acked_sequence", BigInteger, nullable=False, server_default="0"),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

# Small named counters of the event stream, e.g. `pruned_through` (highest sequence retention may have deleted).
event_stream_state = Table(
    "event_stream_state",
    metadata,
    Column("name", String(40), primary_key=True),
    Column("value", BigInteger, nullable=False, server_default="0"),
)

# Stripe events applied, recorded in the same transaction as their effect.
stripe_events = Table(
    "stripe_events",
    metadata,
    Column("event_id", String(100), primary_key=True),
    Column("type", String(100), nullable=False),
    Column("received_at", DateTime(timezone=True), nullable=False),
)

# A member's Stripe customer, saved card and auto top-up setting.
member_cards = Table(
    "member_cards",
    metadata,
    Column("member_id", BigInteger, primary_key=True, autoincrement=False),
    Column("stripe_customer_id", String(100)),
    Column("payment_method_id", String(100)),
    Column("setup_intent_id", String(100)),
    Column("auto_top_up_status", SmallInteger, nullable=False, server_default="1"),
    Column("auto_top_up_amount_cents", BigInteger, nullable=False, server_default="10000"),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

# Card money: one row per Stripe PaymentIntent we created (manual top-up, auto top-up, or the
# card part of a Pay); `pending_request` holds the Pay to book when the card succeeds.
card_payments = Table(
    "card_payments",
    metadata,
    Column("payment_intent_id", String(100), primary_key=True),
    Column("member_id", BigInteger, nullable=False, index=True),
    Column("purpose", String(24), nullable=False),  # manual_top_up | auto_top_up | pay
    Column("amount_cents", BigInteger, nullable=False),
    Column("status", String(16), nullable=False),  # pending | succeeded | failed
    Column("payment_id", String(40)),
    Column("pending_request", Text),
    Column("principal", String(100), nullable=False, server_default=""),
    Column("refunded_cents", BigInteger, nullable=False, server_default="0"),
    Column("failure_reason", String(200)),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("applied_at", DateTime(timezone=True)),
)

refunds = Table(
    "refunds",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("payment_intent_id", String(100), ForeignKey("card_payments.payment_intent_id"), nullable=False, index=True),
    Column("stripe_refund_id", String(100)),  # pending_<stripe_key> until Stripe's outcome is known
    Column("amount_cents", BigInteger, nullable=False),
    Column("fee_cents", BigInteger, nullable=False),
    Column("card_amount_cents", BigInteger, nullable=False),
    Column("status", String(16), nullable=False),
    Column("transaction_id", BigInteger, ForeignKey("transactions.id")),
    Column("principal", String(100), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("stripe_key", String(64), unique=True),  # the refund's Stripe idempotency key (migration 0006)
)

fee_settings = Table(
    "fee_settings",
    metadata,
    Column("version", BigId, primary_key=True, autoincrement=True),
    Column("settlement_fee_bp", Integer, nullable=False),
    Column("refund_fee_bp", Integer, nullable=False),
    Column("stripe_cost_per_transaction_cents", BigInteger, nullable=False),
    Column("stripe_cost_bp", Integer, nullable=False),
    Column("low_balance_limit_cents", BigInteger, nullable=False),
    Column("effective_from", DateTime(timezone=True), nullable=False),
    Column("set_by", String(100), nullable=False),
)

settlements = Table(
    "settlements",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("batch_id", String(40), nullable=False, index=True),
    Column("organisation_id", BigInteger, nullable=False, index=True),
    Column("transaction_id", BigInteger, ForeignKey("transactions.id"), nullable=False),
    Column("balance_cents", BigInteger, nullable=False),
    Column("minimum_balance_cents", BigInteger, nullable=False),
    Column("gross_cents", BigInteger, nullable=False),
    Column("fee_bp", Integer, nullable=False),
    Column("fee_cents", BigInteger, nullable=False),
    Column("gst_cents", BigInteger, nullable=False),
    Column("net_cents", BigInteger, nullable=False),
    Column("fee_settings_version", BigInteger),
    Column("bsb", String(7), nullable=False),
    Column("account_number", String(20), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)


# Each organisation account's totals per UTC day and posting type, kept by the write path in the
# statement that writes the postings (migration 0005); GetOrganisationSummary reads whole days here.
account_day_totals = Table(
    "account_day_totals",
    metadata,
    Column("account_id", BigInteger, ForeignKey("accounts.id"), primary_key=True),
    Column("day", Date, primary_key=True),
    Column("type", String(24), primary_key=True),
    Column("amount_cents", BigInteger, nullable=False),
    Column("count", BigInteger, nullable=False),
    Column("in_cents", BigInteger, nullable=False),
    Column("out_cents", BigInteger, nullable=False),
)


# The count and the sum of the balances per kind of account (migration 0010): statement triggers on
# accounts add a row for each statement's change; `balance_totals_fold()` sums them up now and then.
balance_totals = Table(
    "balance_totals",
    metadata,
    Column("id", BigInteger, primary_key=True),
    Column("kind", SmallInteger, nullable=False),
    Column("accounts", BigInteger, nullable=False),
    Column("nonzero", BigInteger, nullable=False),
    Column("total_cents", Numeric, nullable=False),
)
