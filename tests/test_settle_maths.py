"""Settlement maths (server/domain/money.settlement_for) against hand-computed cases, and properties."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.domain.money import MAX_AMOUNT_CENTS, MAX_FEE_BP, fee_half_up, gst_inside, settlement_for


@pytest.mark.parametrize(
    ("balance", "minimum", "fee_bp", "gross", "fee", "gst", "net"),
    [
        # $123.45 at 2.00 %: 246.90 c -> 247 c; GST 247/11 = 22.45 -> 22; net 12345 - 247
        (12_345, 0, 200, 12_345, 247, 22, 12_098),
        # $123.45 at 2.25 %: 277.7625 c -> 278 c; GST 278/11 = 25.27 -> 25
        (12_345, 0, 225, 12_345, 278, 25, 12_067),
        # exactly half a cent rounds up: $1.25 at 2 % = 2.5 c -> 3 c; GST 3/11 = 0.27 -> 0
        (125, 0, 200, 125, 3, 0, 122),
        # just under half rounds down: $1.24 at 2 % = 2.48 c -> 2 c
        (124, 0, 200, 124, 2, 0, 122),
        # minimum balance kept: $500.00 with $200.00 minimum -> gross $300.00, fee $6.00, GST 54.5 -> 55
        (50_000, 20_000, 200, 30_000, 600, 55, 29_400),
        # an override of 3.5 % on $1,000.01: 3500.035 c -> 3500 c; GST 318.18 -> 318
        (100_001, 0, 350, 100_001, 3_500, 318, 96_501),
        # fee of zero basis points
        (9_999, 1, 0, 9_998, 0, 0, 9_998),
        # GST rounds up: fee 17 c on gross $8.50 at 2 %, 17/11 = 1.55 -> 2
        (850, 0, 200, 850, 17, 2, 833),
    ],
)
def test_hand_computed(balance, minimum, fee_bp, gross, fee, gst, net):
    s = settlement_for(balance, minimum, fee_bp)
    assert s is not None
    assert (s.gross_cents, s.fee_bp, s.fee_cents, s.gst_cents, s.net_cents) == (gross, fee_bp, fee, gst, net)


@pytest.mark.parametrize(("balance", "minimum"), [(0, 0), (-500, 0), (20_000, 20_000), (19_999, 20_000), (-1, -1)])
def test_nothing_due_at_or_below_the_minimum(balance, minimum):
    assert settlement_for(balance, minimum, 200) is None


@given(
    gross=st.integers(min_value=1, max_value=MAX_AMOUNT_CENTS),
    minimum=st.integers(min_value=0, max_value=MAX_AMOUNT_CENTS),
    fee_bp=st.integers(min_value=0, max_value=MAX_FEE_BP),
)
def test_fee_plus_net_is_gross(gross, minimum, fee_bp):
    s = settlement_for(minimum + gross, minimum, fee_bp)
    assert s is not None
    for value in (s.gross_cents, s.fee_cents, s.gst_cents, s.net_cents):
        assert isinstance(value, int)
    assert s.gross_cents == gross
    assert s.fee_cents + s.net_cents == gross
    assert 0 <= s.gst_cents <= s.fee_cents
    assert 0 <= s.fee_cents <= gross
    # the fee is the exact product rounded half-up: within half a cent of gross*bp/10000
    assert abs(s.fee_cents * 10_000 - gross * fee_bp) * 2 <= 10_000
    assert abs(s.gst_cents * 11 - s.fee_cents) * 2 <= 11


@given(st.integers(min_value=0, max_value=10**12), st.integers(min_value=0, max_value=MAX_FEE_BP))
def test_half_up_against_an_independent_formula(amount, fee_bp):
    from fractions import Fraction

    exact = Fraction(amount * fee_bp, 10_000)
    expected = int(exact) + (1 if exact - int(exact) >= Fraction(1, 2) else 0)
    assert fee_half_up(amount, fee_bp) == expected
    exact_gst = Fraction(expected, 11)
    assert gst_inside(expected) == int(exact_gst) + (1 if exact_gst - int(exact_gst) >= Fraction(1, 2) else 0)
