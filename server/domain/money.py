"""Money maths and limits: integer cents and basis points only."""

from __future__ import annotations

from dataclasses import dataclass

# ---- limits (every quantity has one) ----
MAX_AMOUNT_CENTS = 100_000_000_00  # $100,000,000.00: no single movement is larger
TRANSFER_LIMIT_CENTS = 2_000_00  # member -> member transfer limit
MIN_TOP_UP_CENTS = 50_00
MAX_TOP_UP_CENTS = 2_000_00  # manual top-up ceiling (amount <= this - balance) and max one charge
AUTO_TOP_UP_MIN_CENTS = 50_00
AUTO_TOP_UP_MAX_CENTS = 2_000_00
AUTO_TOP_UP_DEFAULT_CENTS = 100_00
LOW_BALANCE_LIMIT_CENTS = 20_00
DEFAULT_SETTLEMENT_FEE_BP = 200
DEFAULT_REFUND_FEE_BP = 300
REFUND_WINDOW_DAYS = 12 * 7
MAX_DESCRIPTION_CHARS = 80
MAX_ROUTE_CODE_CHARS = 16
MAX_ROUTE_PAYLOAD_CHARS = 1024
MAX_IDEMPOTENCY_KEY_CHARS = 255
MAX_NAME_CHARS = 200
MAX_FEE_BP = 10_000
BP_PER_UNIT = 10_000


def fee_half_up(amount_cents: int, fee_bp: int) -> int:
    """amount × fee_bp / 10,000 rounded half-up to the cent (amount ≥ 0)."""
    if amount_cents < 0 or fee_bp < 0:
        raise ValueError("fee_half_up takes non-negative amounts and rates")
    return (amount_cents * fee_bp * 2 + BP_PER_UNIT) // (2 * BP_PER_UNIT)


def gst_inside(fee_cents: int) -> int:
    """The GST inside a GST-inclusive fee: fee / 11, half-up."""
    if fee_cents < 0:
        raise ValueError("gst_inside takes a non-negative fee")
    return (fee_cents * 2 + 11) // 22


@dataclass(frozen=True)
class Settlement:
    gross_cents: int
    fee_bp: int
    fee_cents: int
    gst_cents: int
    net_cents: int


def settlement_for(balance_cents: int, minimum_balance_cents: int, fee_bp: int) -> Settlement | None:
    """What settling an organisation pays out; None when nothing is due."""
    gross = balance_cents - minimum_balance_cents
    if gross <= 0:
        return None
    fee = fee_half_up(gross, fee_bp)
    settlement = Settlement(gross, fee_bp, fee, gst_inside(fee), gross - fee)
    assert settlement.fee_cents + settlement.net_cents == settlement.gross_cents
    assert 0 <= settlement.gst_cents <= settlement.fee_cents
    return settlement


def _smallest_multiple_at_least(step_cents: int, needed_cents: int) -> int:
    if needed_cents <= 0:
        return 0
    return -(-needed_cents // step_cents) * step_cents


def top_up_to_cover(balance_cents: int, amount_cents: int, auto_amount_cents: int,
                    low_limit_cents: int = LOW_BALANCE_LIMIT_CENTS) -> int:
    """Top-up for a payment the balance does not cover: the smallest multiple of the auto amount
    that covers the payment and leaves at least the low limit. 0 when the balance covers it."""
    if balance_cents >= amount_cents:
        return 0
    return _smallest_multiple_at_least(auto_amount_cents, amount_cents + low_limit_cents - balance_cents)


def top_up_after_payment(balance_cents: int, auto_amount_cents: int,
                         low_limit_cents: int = LOW_BALANCE_LIMIT_CENTS) -> int:
    """Top-up after a payment left the balance below the low limit: the smallest multiple of the
    auto amount that lifts it to the low limit or above. 0 when at or above the limit."""
    return _smallest_multiple_at_least(auto_amount_cents, low_limit_cents - balance_cents)


def shortfall(balance_cents: int, amount_cents: int) -> int:
    """What a card must pay when the balance does not cover a payment: amount − max(balance, 0)."""
    return amount_cents - max(balance_cents, 0)
