"""The ABA (Cemtext Direct Entry) writer, read back field by field (server/domain/aba.py)."""

from __future__ import annotations

from datetime import date

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.domain import aba

FEDERATION = aba.Originator(user_id="301500", bank="CBA", user_name="Australian Bridge Federation Incorporated",
                            bsb="062-000", account_number="10203040", account_name="ABF Settlements Account",
                            description="CLUB PAYOUTS AND MORE", remitter="Australian Bridge Federation")


def test_a_settlement_file_record_by_record():
    payments = [
        aba.Payment("123-456", "87654321", "North Shore Bridge Club Incorporated Sydney", 123_456, "SET-7KQ3-M9ZT-2WXA"),
        aba.Payment("111-111", "1", "Café Bridge Club", 5, "SET-AAAA-BBBB-CCCC-TOO-LONG"),
    ]
    data = aba.settlement_file(FEDERATION, payments, date(2026, 11, 27), "STL 0123456789ABCD")
    lines = data.split(b"\r\n")
    assert lines[-1] == b"" and len(lines) == 6  # every record ends with CR LF
    assert all(len(line) == 120 for line in lines[:-1])
    head, first, second, debit, tail = (line.decode() for line in lines[:-1])
    assert head == ("0" + " " * 17 + "01" + "CBA" + " " * 7 + "Australian Bridge Federati" + "301500"
                    + "CLUB PAYOUTS" + "271126" + " " * 40)
    assert first == ("1" + "123-456" + " 87654321" + " " + "50" + "0000123456" + "North Shore Bridge Club Incorpora"[:32]
                     + "SET-7KQ3-M9ZT-2WXA" + "062-000" + " 10203040" + "Australian Bridg" + "00000000")
    assert second[1:30] == "111-111        1 500000000005"
    assert second[30:62] == "Cafe Bridge Club".ljust(32)  # accents dropped: the bank's character set
    assert second[62:80] == "SET-AAAA-BBBB-CCCC"  # cut to 18
    assert debit[:30] == "1062-000 10203040 130000123461"
    assert debit[30:80] == "ABF Settlements Account".ljust(32) + "STL 0123456789ABCD"
    assert tail == "7999-999" + " " * 12 + "0000000000" + "0000123461" * 2 + " " * 24 + "000003" + " " * 40


def test_parse_reads_back_what_was_written():
    payments = [aba.Payment("062-001", f"{n:08d}", f"Club {n}", n * 1_000, f"SET-7KQ3-M9ZT-{n:04d}") for n in range(1, 8)]
    parsed = aba.parse(aba.settlement_file(FEDERATION, payments, date(2027, 1, 5), "STL ABC"))
    d = parsed.descriptive
    assert (d.reel, d.bank, d.user_name, d.user_id, d.description, d.process_date) == (
        "01", "CBA", "Australian Bridge Federati", "301500", "CLUB PAYOUTS", date(2027, 1, 5))
    credits = [r for r in parsed.details if r.code == aba.CREDIT_CODE]
    assert [(r.bsb, r.account_number, r.amount_cents, r.title, r.lodgement_reference) for r in credits] == [
        (p.bsb, p.account_number, p.amount_cents, p.account_name, p.lodgement_reference) for p in payments]
    assert {(r.trace_bsb, r.trace_account_number, r.remitter, r.indicator, r.withholding_tax_cents)
            for r in parsed.details} == {("062-000", "10203040", "Australian Bridg", " ", 0)}
    (debit,) = [r for r in parsed.details if r.code == aba.DEBIT_CODE]
    assert (debit.bsb, debit.account_number, debit.amount_cents, debit.lodgement_reference) == (
        "062-000", "10203040", 28_000, "STL ABC")
    assert parsed.total == aba.FileTotal(net_cents=0, credit_cents=28_000, debit_cents=28_000, detail_count=8)


def test_zero_amounts_are_left_out():
    payments = [aba.Payment("062-001", "1234", "Paid", 100, "R1"), aba.Payment("062-001", "5678", "Nothing", 0, "R2")]
    parsed = aba.parse(aba.settlement_file(FEDERATION, payments, date(2027, 1, 5), "STL"))
    assert [r.title for r in parsed.details] == ["Paid", "ABF Settlements Account"]


@pytest.mark.parametrize(("bsb", "account", "problem"), [
    ("", "1234", "no BSB"),
    ("062000", "1234", "is not ddd-ddd"),
    ("06-2000", "1234", "is not ddd-ddd"),
    ("062-000", "", "no account number"),
    ("062-000", "1234567890", "not 1 to 9 digits"),
    ("062-000", "12a4", "not 1 to 9 digits"),
    ("062-000", "- -", "not 1 to 9 digits"),
    ("٠٦٢-٠٠٠", "1234", "is not ddd-ddd"),  # digits of another script
    ("062-000\n", "1234", "is not ddd-ddd"),
    ("062-000", "١٢٣", "not 1 to 9 digits"),
])
def test_bank_details_problems(bsb, account, problem):
    assert problem in aba.bank_details_problem(bsb, account)
    with pytest.raises(aba.AbaError):
        aba.detail_record(bsb, account, aba.CREDIT_CODE, 1, "x", "y", FEDERATION)


@pytest.mark.parametrize("account", ["1", "123456789", "12-345 67"])
def test_good_account_numbers(account):
    assert aba.bank_details_problem("062-000", account) == ""


def test_amounts_must_fit_ten_digits():
    big = aba.Payment("062-001", "1234", "Big", aba.MAX_AMOUNT_CENTS, "R")
    aba.settlement_file(FEDERATION, [big], date(2027, 1, 5), "STL")
    with pytest.raises(aba.AbaError, match="ten digits"):
        aba.settlement_file(FEDERATION, [big, aba.Payment("062-001", "1234", "One more", 1, "R")], date(2027, 1, 5), "S")
    assert "smaller batches" in aba.check_totals(aba.MAX_AMOUNT_CENTS + 1, 0)


def test_originator_problems():
    bad = aba.Originator(user_id="12345", bank="cb", user_name=" ", bsb="062000", account_number="1",
                         account_name="", description="")
    text = "; ".join(bad.problems())
    for part in ("six digits", "mnemonic", "user name", "ddd-ddd", "account name", "description"):
        assert part in text
    with pytest.raises(aba.AbaError):
        aba.settlement_file(bad, [], date(2027, 1, 5), "STL")


def test_parse_refuses_a_file_whose_totals_do_not_add_up():
    data = aba.settlement_file(FEDERATION, [aba.Payment("062-001", "1234", "A", 100, "R")], date(2027, 1, 5), "STL")
    lines = data.decode().split("\r\n")
    lines[1] = lines[1][:20] + "0000000101" + lines[1][30:]
    with pytest.raises(aba.AbaError, match="add up"):
        aba.parse("\r\n".join(lines).encode())
    lines = data.decode().split("\r\n")
    lines[-2] = lines[-2][:74] + "000009" + lines[-2][80:]
    with pytest.raises(aba.AbaError, match="counts 9"):
        aba.parse("\r\n".join(lines).encode())
    with pytest.raises(aba.AbaError, match="120"):
        aba.parse(data.replace(b"\r\n", b" \r\n", 1))
    with pytest.raises(aba.AbaError, match="CR LF"):
        aba.parse(data[:-2])


_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=60)
_payment = st.builds(
    aba.Payment,
    bsb=st.from_regex(r"\A[0-9]{3}-[0-9]{3}\Z"),
    account_number=st.from_regex(r"\A[0-9]{1,9}\Z"),
    account_name=_text,
    amount_cents=st.integers(0, 10_000_000_00),
    lodgement_reference=_text,
)


@settings(max_examples=100, deadline=None)
@given(payments=st.lists(_payment, max_size=40), reference=_text)
def test_any_payments_make_a_balanced_file(payments, reference):
    data = aba.settlement_file(FEDERATION, payments, date(2026, 2, 28), reference)
    assert all(len(line) == 120 for line in data.split(b"\r\n")[:-1])
    parsed = aba.parse(data)
    paid = [p for p in payments if p.amount_cents > 0]
    total = sum(p.amount_cents for p in paid)
    assert parsed.total == aba.FileTotal(0, total, total, len(paid) + 1)
    credits = [r for r in parsed.details if r.code == aba.CREDIT_CODE]
    assert [(r.bsb, r.account_number, r.amount_cents) for r in credits] == [
        (p.bsb, p.account_number, p.amount_cents) for p in paid]
    for record, payment in zip(credits, paid, strict=True):
        assert record.title == aba.clean_text(payment.account_name)[:32].rstrip()
        assert record.lodgement_reference == aba.clean_text(payment.lodgement_reference)[:18].rstrip()
