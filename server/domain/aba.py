"""ABA (Cemtext / BECS Direct Entry) files: the file a bank takes to pay many accounts at once.

Pure: text in, bytes out, no I/O. The format, as the Australian banks publish it for Direct Entry
(APCA BECS procedures), is fixed-width: every record is 120 characters and ends with CR LF.

- descriptive record (type 0): who sends the file, to which bank, what for, when to process it;
- detail records (type 1): one per payment — BSB, account number, transaction code (50: a credit
  to the account; 13: a debit of it), amount in cents, account title, lodgement reference, the
  trace account (where a returned payment goes) and the remitter's name;
- file total record (type 7): net, credit and debit totals and the count of detail records.

A settlement file credits each club (code 50) and carries the balancing debit of the federation's
own account (code 13) for the credits' sum, so the file's net total is zero.

No library on PyPI keeps this format up to date (the one package, `aba`, was last released in
2015), so it is written here; `parse` reads a file back field by field for the tests and for
anyone checking a file before it goes to the bank.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date

RECORD_CHARS = 120
LINE_END = "\r\n"
CREDIT_CODE = "50"  # general credit
DEBIT_CODE = "13"  # externally initiated debit
MAX_AMOUNT_CENTS = 9_999_999_999  # ten digits: per record and per file total
MAX_DETAIL_RECORDS = 999_999  # six digits in the file total record
TOTAL_BSB = "999-999"  # the file total record's BSB filler

# widths of the text fields
USER_NAME_CHARS = 26
ACCOUNT_TITLE_CHARS = 32
LODGEMENT_REFERENCE_CHARS = 18
REMITTER_CHARS = 16
DESCRIPTION_CHARS = 12
ACCOUNT_NUMBER_CHARS = 9

# fullmatch and [0-9]: `\d` takes any script's digits and `$` a trailing newline
_BSB = re.compile(r"[0-9]{3}-[0-9]{3}")
_ACCOUNT_NUMBER = re.compile(r"[0-9 -]{1,9}")
_USER_ID = re.compile(r"[0-9]{6}")
_BANK = re.compile(r"[A-Z]{3}")
# The characters every bank's Direct Entry system takes in text fields (a cautious subset of the
# BECS set): anything else is transliterated to ASCII where it can be, else becomes a space.
_ALLOWED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 &'()*+,-./:;?")


class AbaError(ValueError):
    """A value that cannot go into an ABA file, or a file that is not one."""


def bank_details_problem(bsb: str, account_number: str) -> str:
    """Why a BSB and account number cannot be paid through an ABA file ("" when they can)."""
    if not bsb:
        return "no BSB"
    if not _BSB.fullmatch(bsb):
        return f"BSB {bsb!r} is not ddd-ddd"
    if not account_number:
        return "no account number"
    if not _ACCOUNT_NUMBER.fullmatch(account_number) or not any(ch in "0123456789" for ch in account_number):
        return f"account number {account_number!r} is not 1 to 9 digits (spaces and hyphens allowed)"
    return ""


def clean_text(value: str) -> str:
    """`value` in the characters a Direct Entry system takes: accents dropped, others a space."""
    ascii_text = unicodedata.normalize("NFKD", value).encode("ascii", "ignore").decode("ascii")
    return "".join(ch if ch in _ALLOWED else " " for ch in ascii_text).strip()


def _text(value: str, width: int) -> str:
    """Left-justified, blank-filled, cut to `width`."""
    return clean_text(value)[:width].ljust(width)


def _amount(cents: int, width: int = 10) -> str:
    if not 0 <= cents <= MAX_AMOUNT_CENTS:
        raise AbaError(f"amount {cents} cents does not fit the ten digits of an ABA amount")
    return str(cents).rjust(width, "0")


@dataclass(frozen=True)
class Originator:
    """The federation as the file's sender: its Direct Entry user and the account it pays from."""

    user_id: str  # APCA Direct Entry user id, six digits
    bank: str  # the user's financial institution, a three-letter mnemonic (CBA, WBC, NAB, ANZ, …)
    user_name: str  # the user's name as the bank knows it (26 characters are kept)
    bsb: str  # the federation's account, debited for the file's total
    account_number: str
    account_name: str  # its title (32 characters are kept)
    description: str = "SETTLEMENT"  # the entries' description (12 characters are kept)
    remitter: str = ""  # shown on the clubs' statements (16 characters are kept; empty: the user name)

    def problems(self) -> list[str]:
        """What is wrong with these settings, one line each."""
        found = []
        if not _USER_ID.fullmatch(self.user_id):
            found.append(f"user id {self.user_id!r} is not six digits")
        if not _BANK.fullmatch(self.bank):
            found.append(f"bank {self.bank!r} is not a three-letter mnemonic such as CBA")
        if not clean_text(self.user_name):
            found.append("the user name is empty")
        problem = bank_details_problem(self.bsb, self.account_number)
        if problem:
            found.append(f"the federation's account: {problem}")
        if not clean_text(self.account_name):
            found.append("the account name is empty")
        if not clean_text(self.description):
            found.append("the description is empty")
        return found

    @property
    def remitter_name(self) -> str:
        return self.remitter or self.user_name


@dataclass(frozen=True)
class Payment:
    """One credit to a club's account."""

    bsb: str
    account_number: str
    account_name: str
    amount_cents: int
    lodgement_reference: str


def descriptive_record(originator: Originator, process_date: date) -> str:
    record = (
        "0"
        + " " * 17
        + "01"  # reel sequence number: one file, one reel
        + originator.bank
        + " " * 7
        + _text(originator.user_name, USER_NAME_CHARS)
        + originator.user_id
        + _text(originator.description, DESCRIPTION_CHARS)
        + process_date.strftime("%d%m%y")
        + " " * 40
    )
    assert len(record) == RECORD_CHARS, "a descriptive record is 120 characters"
    return record


def detail_record(bsb: str, account_number: str, code: str, amount_cents: int, title: str, reference: str,
                  originator: Originator) -> str:
    problem = bank_details_problem(bsb, account_number)
    if problem:
        raise AbaError(problem)
    record = (
        "1"
        + bsb
        + account_number.rjust(ACCOUNT_NUMBER_CHARS)
        + " "  # indicator: a plain entry
        + code
        + _amount(amount_cents)
        + _text(title, ACCOUNT_TITLE_CHARS)
        + _text(reference, LODGEMENT_REFERENCE_CHARS)
        + originator.bsb
        + originator.account_number.rjust(ACCOUNT_NUMBER_CHARS)
        + _text(originator.remitter_name, REMITTER_CHARS)
        + "0" * 8  # no withholding tax
    )
    assert len(record) == RECORD_CHARS, "a detail record is 120 characters"
    return record


def file_total_record(credit_cents: int, debit_cents: int, detail_count: int) -> str:
    if detail_count > MAX_DETAIL_RECORDS:
        raise AbaError(f"{detail_count} detail records: an ABA file holds at most {MAX_DETAIL_RECORDS}")
    record = (
        "7"
        + TOTAL_BSB
        + " " * 12
        + _amount(abs(credit_cents - debit_cents))
        + _amount(credit_cents)
        + _amount(debit_cents)
        + " " * 24
        + str(detail_count).rjust(6, "0")
        + " " * 40
    )
    assert len(record) == RECORD_CHARS, "a file total record is 120 characters"
    return record


def settlement_file(originator: Originator, payments: Sequence[Payment], process_date: date,
                    debit_reference: str) -> bytes:
    """The file paying every payment (amounts above zero) from the originator's account, balanced
    by one debit of that account for their sum."""
    problems = originator.problems()
    if problems:
        raise AbaError("; ".join(problems))
    paid = [p for p in payments if p.amount_cents > 0]
    total_cents = sum(p.amount_cents for p in paid)
    records = [descriptive_record(originator, process_date)]
    records.extend(
        detail_record(p.bsb, p.account_number, CREDIT_CODE, p.amount_cents, p.account_name, p.lodgement_reference,
                      originator)
        for p in paid
    )
    records.append(detail_record(originator.bsb, originator.account_number, DEBIT_CODE, total_cents,
                                 originator.account_name, debit_reference, originator))
    records.append(file_total_record(total_cents, total_cents, len(records) - 1))
    return "".join(record + LINE_END for record in records).encode("ascii")


def check_totals(credit_cents: int, debit_cents: int) -> str:
    """Why a file with these totals cannot be written ("" when it can)."""
    if max(credit_cents, debit_cents) > MAX_AMOUNT_CENTS:
        return (f"the file's total of {credit_cents} cents does not fit the ten digits of an ABA total: "
                "settle in smaller batches")
    return ""


# ---------------------------------------------------------------- reading a file back

@dataclass(frozen=True)
class Descriptive:
    reel: str
    bank: str
    user_name: str
    user_id: str
    description: str
    process_date: date


@dataclass(frozen=True)
class Detail:
    bsb: str
    account_number: str
    indicator: str
    code: str
    amount_cents: int
    title: str
    lodgement_reference: str
    trace_bsb: str
    trace_account_number: str
    remitter: str
    withholding_tax_cents: int


@dataclass(frozen=True)
class FileTotal:
    net_cents: int
    credit_cents: int
    debit_cents: int
    detail_count: int


@dataclass(frozen=True)
class AbaFile:
    descriptive: Descriptive
    details: list[Detail]
    total: FileTotal


def _digits(field: str, text: str, line: int) -> int:
    if not (text.isascii() and text.isdigit()):
        raise AbaError(f"record {line}: {field} {text!r} is not digits")
    return int(text)


def _blank(text: str, what: str, line: int) -> None:
    if text.strip():
        raise AbaError(f"record {line}: {what} must be blank, has {text!r}")


def parse(data: bytes) -> AbaFile:
    """Read an ABA file field by field, checking the record layout and that the totals add up."""
    text = data.decode("ascii")
    if not text.endswith(LINE_END):
        raise AbaError("the file does not end with CR LF")
    lines = text[: -len(LINE_END)].split(LINE_END)
    for n, line in enumerate(lines, start=1):
        if len(line) != RECORD_CHARS:
            raise AbaError(f"record {n} is {len(line)} characters, not {RECORD_CHARS}")
        if "\r" in line or "\n" in line:
            raise AbaError(f"record {n} has a line break inside it")
    if len(lines) < 2 or lines[0][0] != "0" or lines[-1][0] != "7":
        raise AbaError("a file is a descriptive record (0), detail records (1) and a file total record (7)")
    head = lines[0]
    _blank(head[1:18], "positions 2-18", 1)
    _blank(head[23:30], "positions 24-30", 1)
    _blank(head[80:120], "positions 81-120", 1)
    day, month, year = _digits("day", head[74:76], 1), _digits("month", head[76:78], 1), _digits("year", head[78:80], 1)
    descriptive = Descriptive(
        reel=head[18:20], bank=head[20:23], user_name=head[30:56].rstrip(),
        user_id=str(_digits("user id", head[56:62], 1)).rjust(6, "0"), description=head[62:74].rstrip(),
        process_date=date(2000 + year, month, day),
    )
    details = []
    for n, line in enumerate(lines[1:-1], start=2):
        if line[0] != "1":
            raise AbaError(f"record {n} is type {line[0]!r}, not a detail record (1)")
        if not _BSB.fullmatch(line[1:8]) or not _BSB.fullmatch(line[80:87]):
            raise AbaError(f"record {n}: a BSB is not ddd-ddd")
        details.append(Detail(
            bsb=line[1:8], account_number=line[8:17].strip(), indicator=line[17], code=line[18:20],
            amount_cents=_digits("amount", line[20:30], n), title=line[30:62].rstrip(),
            lodgement_reference=line[62:80].rstrip(), trace_bsb=line[80:87], trace_account_number=line[87:96].strip(),
            remitter=line[96:112].rstrip(), withholding_tax_cents=_digits("withholding tax", line[112:120], n),
        ))
    tail = lines[-1]
    n = len(lines)
    if tail[1:8] != TOTAL_BSB:
        raise AbaError(f"record {n}: the file total's BSB filler is {tail[1:8]!r}, not {TOTAL_BSB}")
    _blank(tail[8:20], "positions 9-20", n)
    _blank(tail[50:74], "positions 51-74", n)
    _blank(tail[80:120], "positions 81-120", n)
    total = FileTotal(net_cents=_digits("net total", tail[20:30], n), credit_cents=_digits("credit total", tail[30:40], n),
                      debit_cents=_digits("debit total", tail[40:50], n), detail_count=_digits("count", tail[74:80], n))
    credits = sum(d.amount_cents for d in details if d.code != DEBIT_CODE)
    debits = sum(d.amount_cents for d in details if d.code == DEBIT_CODE)
    if (total.credit_cents, total.debit_cents) != (credits, debits):
        raise AbaError(f"the file total says credits {total.credit_cents} and debits {total.debit_cents} cents; "
                       f"the detail records add up to {credits} and {debits}")
    if total.net_cents != abs(credits - debits):
        raise AbaError(f"the net total {total.net_cents} is not |credits - debits| = {abs(credits - debits)}")
    if total.detail_count != len(details):
        raise AbaError(f"the file total counts {total.detail_count} detail records; the file has {len(details)}")
    return AbaFile(descriptive, details, total)
