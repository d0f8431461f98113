"""Fee settings: a history of versions; the newest applies."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, insert, select

from server.domain import money
from server.domain.errors import InvalidArgument
from server.ledger.db import as_utc, utcnow
from server.ledger.schema import fee_settings


@dataclass(frozen=True)
class FeeSettings:
    version: int
    settlement_fee_bp: int
    refund_fee_bp: int
    stripe_cost_per_transaction_cents: int
    stripe_cost_bp: int
    low_balance_limit_cents: int
    effective_from: datetime | None
    set_by: str


# No low-balance limit may be set above this, so a balance at or above it is never low (the
# payment path then skips reading the settings).
MAX_LOW_BALANCE_LIMIT_CENTS = money.MAX_TOP_UP_CENTS

DEFAULTS = FeeSettings(
    version=0,
    settlement_fee_bp=money.DEFAULT_SETTLEMENT_FEE_BP,
    refund_fee_bp=money.DEFAULT_REFUND_FEE_BP,
    stripe_cost_per_transaction_cents=30,
    stripe_cost_bp=175,
    low_balance_limit_cents=money.LOW_BALANCE_LIMIT_CENTS,
    effective_from=None,
    set_by="default",
)


def _row_to_settings(row) -> FeeSettings:  # noqa: ANN001
    return FeeSettings(
        version=row.version,
        settlement_fee_bp=row.settlement_fee_bp,
        refund_fee_bp=row.refund_fee_bp,
        stripe_cost_per_transaction_cents=row.stripe_cost_per_transaction_cents,
        stripe_cost_bp=row.stripe_cost_bp,
        low_balance_limit_cents=row.low_balance_limit_cents,
        effective_from=as_utc(row.effective_from),
        set_by=row.set_by,
    )


def current_fee_settings(conn: Connection) -> FeeSettings:
    row = conn.execute(select(fee_settings).order_by(fee_settings.c.version.desc()).limit(1)).first()
    return DEFAULTS if row is None else _row_to_settings(row)


def fee_settings_history(conn: Connection, limit: int = 100) -> list[FeeSettings]:
    rows = conn.execute(select(fee_settings).order_by(fee_settings.c.version.desc()).limit(limit))
    return [_row_to_settings(r) for r in rows]


def set_fee_settings(conn: Connection, new: FeeSettings, principal: str) -> FeeSettings:
    for name in ("settlement_fee_bp", "refund_fee_bp", "stripe_cost_bp"):
        value = getattr(new, name)
        if not 0 <= value <= money.MAX_FEE_BP:
            raise InvalidArgument.field(name, f"must be between 0 and {money.MAX_FEE_BP} basis points")
    if not 0 <= new.stripe_cost_per_transaction_cents <= 10_000:
        raise InvalidArgument.field("stripe_cost_per_transaction_cents", "must be between 0 and 10000")
    if not 0 <= new.low_balance_limit_cents <= MAX_LOW_BALANCE_LIMIT_CENTS:
        raise InvalidArgument.field("low_balance_limit_cents", f"must be between 0 and {MAX_LOW_BALANCE_LIMIT_CENTS}")
    now = utcnow()
    version = conn.execute(
        insert(fee_settings)
        .values(
            settlement_fee_bp=new.settlement_fee_bp,
            refund_fee_bp=new.refund_fee_bp,
            stripe_cost_per_transaction_cents=new.stripe_cost_per_transaction_cents,
            stripe_cost_bp=new.stripe_cost_bp,
            low_balance_limit_cents=new.low_balance_limit_cents,
            effective_from=now,
            set_by=principal,
        )
        .returning(fee_settings.c.version)
    ).scalar_one()
    return FeeSettings(version, new.settlement_fee_bp, new.refund_fee_bp, new.stripe_cost_per_transaction_cents,
                       new.stripe_cost_bp, new.low_balance_limit_cents, now, principal)
