"""The SPEC §5 top-up amounts, over hypothesis-generated balances, amounts and auto amounts."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from server.domain.money import (
    AUTO_TOP_UP_MAX_CENTS,
    AUTO_TOP_UP_MIN_CENTS,
    LOW_BALANCE_LIMIT_CENTS,
    shortfall,
    top_up_after_payment,
    top_up_to_cover,
)

balances = st.integers(min_value=-50_000_00, max_value=50_000_00)
amounts = st.integers(min_value=1, max_value=100_000_00)
auto_amounts = st.integers(min_value=AUTO_TOP_UP_MIN_CENTS, max_value=AUTO_TOP_UP_MAX_CENTS)
low_limits = st.one_of(st.just(LOW_BALANCE_LIMIT_CENTS), st.integers(min_value=0, max_value=2_000_00))


@given(balances, amounts, auto_amounts, low_limits)
def test_top_up_to_cover_is_the_smallest_multiple_that_covers_and_leaves_the_limit(
        balance: int, amount: int, auto: int, low: int) -> None:
    top_up = top_up_to_cover(balance, amount, auto, low)
    if balance >= amount:
        assert top_up == 0
        return
    assert top_up > 0 and top_up % auto == 0
    after = balance + top_up - amount
    assert after >= low and after >= 0  # covers the payment and leaves at least the low limit
    assert balance + (top_up - auto) - amount < low  # one auto amount less would not


@given(balances, auto_amounts, low_limits)
def test_top_up_after_payment_lifts_to_the_limit_with_the_fewest_auto_amounts(balance: int, auto: int,
                                                                               low: int) -> None:
    top_up = top_up_after_payment(balance, auto, low)
    if balance >= low:
        assert top_up == 0
        return
    assert top_up > 0 and top_up % auto == 0
    assert balance + top_up >= low
    assert balance + top_up - auto < low


@given(balances, amounts)
def test_card_pays_the_shortfall(balance: int, amount: int) -> None:
    card = shortfall(balance, amount)
    if balance <= 0:
        assert card == amount  # a negative balance is never paid off by the card part of a Pay
    else:
        assert card == amount - balance


def test_worked_examples() -> None:
    # $30 balance, $120 payment, $50 auto: 30 + 150 − 120 = 60 ≥ 20, and 30 + 100 − 120 = 10 < 20
    assert top_up_to_cover(30_00, 120_00, 50_00) == 150_00
    # $10 after a payment, $100 auto: one auto amount lifts it to $110
    assert top_up_after_payment(10_00, 100_00) == 100_00
    # exactly at the limit: nothing
    assert top_up_after_payment(20_00, 100_00) == 0
    assert top_up_to_cover(100_00, 100_00, 50_00) == 0
