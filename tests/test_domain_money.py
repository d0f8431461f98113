"""Unit and property tests for the pure domain: money maths, limits, account ids and validation."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.domain import money, validation
from server.domain.errors import InsufficientFunds, InvalidArgument, format_cents
from server.domain.types import (
    AccountKind,
    PostingType,
    SystemAccount,
    lock_rank,
    member_account,
    organisation_account,
    split_account_id,
    system_account,
)

cents = st.integers(min_value=0, max_value=money.MAX_AMOUNT_CENTS)
bps = st.integers(min_value=0, max_value=money.MAX_FEE_BP)


def exact_half_up(value: Fraction) -> int:
    floor = value.numerator // value.denominator
    return floor + (1 if value - floor >= Fraction(1, 2) else 0)


@given(cents, bps)
def test_fee_is_exact_half_up(amount, fee_bp):
    assert money.fee_half_up(amount, fee_bp) == exact_half_up(Fraction(amount * fee_bp, 10_000))


@pytest.mark.parametrize(("amount", "fee_bp", "fee"), [
    (10_000, 200, 200), (25, 200, 1), (24, 200, 0), (75, 200, 2), (12_345, 250, 309), (1, 5_000, 1), (0, 300, 0),
])
def test_fee_examples(amount, fee_bp, fee):
    assert money.fee_half_up(amount, fee_bp) == fee


@given(st.integers(min_value=0, max_value=10**12))
def test_gst_inside_is_a_half_up_eleventh(fee):
    assert money.gst_inside(fee) == exact_half_up(Fraction(fee, 11))
    assert 0 <= money.gst_inside(fee) <= fee


def test_negative_inputs_are_refused():
    with pytest.raises(ValueError):
        money.fee_half_up(-1, 200)
    with pytest.raises(ValueError):
        money.gst_inside(-1)


@given(st.integers(-10**9, 10**10), st.integers(0, 10**9), bps)
def test_settlement_adds_up(balance, minimum, fee_bp):
    s = money.settlement_for(balance, minimum, fee_bp)
    if balance - minimum <= 0:
        assert s is None
        return
    assert s is not None
    assert s.gross_cents == balance - minimum
    assert s.fee_cents + s.net_cents == s.gross_cents
    assert s.fee_cents == money.fee_half_up(s.gross_cents, fee_bp)
    assert s.gst_cents == money.gst_inside(s.fee_cents)


auto = st.integers(min_value=money.AUTO_TOP_UP_MIN_CENTS, max_value=money.AUTO_TOP_UP_MAX_CENTS)


@given(st.integers(-10**6, 10**6), st.integers(1, 10**6), auto, st.integers(0, 10_000))
def test_top_up_to_cover_is_the_smallest_multiple(balance, amount, auto_cents, low):
    top = money.top_up_to_cover(balance, amount, auto_cents, low)
    if balance >= amount:
        assert top == 0
        return
    assert top % auto_cents == 0 and top > 0
    assert balance + top - amount >= low, "covers the payment and leaves the low limit"
    assert balance + top - auto_cents - amount < low, "one multiple less would not"


@given(st.integers(-10**6, 10**6), auto, st.integers(0, 10_000))
def test_top_up_after_payment_lifts_to_the_low_limit(balance, auto_cents, low):
    top = money.top_up_after_payment(balance, auto_cents, low)
    assert top % auto_cents == 0 and top >= 0
    assert balance + top >= low
    if top:
        assert balance + top - auto_cents < low


@given(st.integers(-10**6, 10**6), st.integers(1, 10**6))
def test_shortfall(balance, amount):
    short = money.shortfall(balance, amount)
    assert short == amount - max(balance, 0)
    assert 0 < short <= amount or balance >= amount


def test_spec_top_up_example():
    # $30.00 balance, $75.00 payment, $100.00 auto amount, $20.00 low limit: one $100 charge leaves $55
    assert money.top_up_to_cover(3_000, 7_500, 10_000) == 10_000
    assert money.top_up_to_cover(3_000, 17_500, 10_000) == 20_000
    assert money.top_up_after_payment(1_500, 5_000) == 5_000


ids = st.integers(min_value=1, max_value=validation.MAX_ID)


@given(ids)
def test_account_ids_round_trip_and_fit_in_int64(ext):
    for kind, acct in ((AccountKind.MEMBER, member_account(ext)), (AccountKind.ORGANISATION, organisation_account(ext))):
        assert split_account_id(acct) == (kind, ext)
        assert 0 < acct < 2**63


@given(ids, ids)
def test_lock_order_is_total_and_members_first(a, b):
    assert lock_rank(member_account(a)) < lock_rank(organisation_account(b))
    assert lock_rank(organisation_account(b)) < lock_rank(system_account(SystemAccount.STRIPE))
    assert (lock_rank(member_account(a)) < lock_rank(member_account(b))) == (a < b)


def test_account_ids_are_distinct_across_kinds():
    seen = {member_account(5), organisation_account(5), *(system_account(s) for s in SystemAccount)}
    assert len(seen) == 2 + len(SystemAccount)
    with pytest.raises(ValueError):
        member_account(0)


def test_every_posting_type_has_its_display_name():
    names = {t.display_name for t in PostingType}
    assert len(names) == len(PostingType)
    assert PostingType.ENTRY_TO_EVENT.display_name == "Entry to an event"
    assert PostingType.MANUAL_ADJUSTMENT.display_name == "Manual Adjustment"


@pytest.mark.parametrize(("value", "ok"), [(1, True), (validation.MAX_ID, True), (0, False), (-3, False),
                                           (validation.MAX_ID + 1, False), (2**63 - 1, False)])
def test_positive_id(value, ok):
    if ok:
        assert validation.positive_id("member_id", value) == value
    else:
        with pytest.raises(InvalidArgument) as err:
            validation.positive_id("member_id", value)
        assert err.value.field_violations[0][0] == "member_id"


def test_amount_and_text_limits():
    assert validation.positive_amount("amount_cents", money.TRANSFER_LIMIT_CENTS, money.TRANSFER_LIMIT_CENTS)
    for bad in (0, -1, money.TRANSFER_LIMIT_CENTS + 1):
        with pytest.raises(InvalidArgument):
            validation.positive_amount("amount_cents", bad, money.TRANSFER_LIMIT_CENTS)
    assert validation.description(" " + "a" * 80 + " ") == "a" * 80
    with pytest.raises(InvalidArgument):
        validation.description("a" * 81)
    with pytest.raises(InvalidArgument):
        validation.description("tab\there")
    with pytest.raises(InvalidArgument):
        validation.description("  ", required=True)


def test_money_in_messages():
    assert format_cents(123_456_78) == "$123,456.78"
    assert format_cents(-5) == "-$0.05"
    err = InsufficientFunds(1_000, 2_550)
    assert err.code == "FAILED_PRECONDITION" and "$10.00" in err.message and "$25.50" in err.message
