"""Settlement bank files: a real Settle answers the ABA file paying every club, and a club the bank
cannot pay is refused by name before anything is booked. Through gRPC and payments-admin, on a
server with the federation's Direct Entry settings."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import grpc
import pytest
from conftest import TOKENS, RunningServer, _truncate_all, start_server
from sqlalchemy import func, select, update

from server.domain import aba
from server.ledger.schema import accounts, organisations, settlements, transactions

pytestmark = pytest.mark.postgres

FEDERATION = aba.Originator(user_id="301500", bank="WBC", user_name="Australian Bridge Federation",
                            bsb="032-001", account_number="987654", account_name="ABF Club Settlements",
                            description="ABF PAYOUT", remitter="ABF")
TZ = "Australia/Sydney"

_SCRIPT = Path(sys.executable).with_name("payments-admin")
COMMAND = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "clients.admin_cli"]


@pytest.fixture(scope="module")
def aba_server(postgres_url) -> Iterator[RunningServer]:  # noqa: ANN001
    srv = start_server(postgres_url, "postgresql", aba=FEDERATION, timezone=TZ)
    yield srv
    srv.stop()


@pytest.fixture
def server(aba_server) -> RunningServer:  # noqa: ANN001
    _truncate_all(aba_server.db)
    return aba_server


@pytest.fixture
def admin(server):  # noqa: ANN001, ANN201
    with server.client("admin") as c:
        yield c


@pytest.fixture
def app(server):  # noqa: ANN001, ANN201
    with server.client("app") as c:
        yield c


def fund(admin, app, org_id: int, cents: int) -> None:  # noqa: ANN001
    admin.adjust(cents, "credit", member_id=1)
    app.pay(1, cents, organisation_id=org_id, description="Entry")


def clubs(admin, app) -> None:  # noqa: ANN001
    admin.upsert_organisation(10, "North Shore Bridge Club Incorporated of Sydney", bsb="062-000",
                              account_number="12345678")
    admin.upsert_organisation(11, "Café Bridge", bsb="123456", account_number="87654321", minimum_balance_cents=1_000,
                              settlement_fee_bp=150)
    admin.upsert_organisation(12, "Quiet BC", bsb="111-111", account_number="1111")  # nothing to settle
    fund(admin, app, 10, 123_45)
    fund(admin, app, 11, 50_000_00)


def test_a_real_settlement_answers_its_aba_file(server, admin, app):
    clubs(admin, app)
    dry = admin.settle(dry_run=True)
    assert dry.aba_available and dry.aba_file == b""
    assert [r.bank_details_problem for r in dry.rows] == ["", ""]
    res = admin.settle(idempotency_key="settle-aba-1")
    assert len(res.rows) == 2
    parsed = aba.parse(res.aba_file)
    d = parsed.descriptive
    assert (d.bank, d.user_id, d.user_name, d.description) == ("WBC", "301500", "Australian Bridge Federati",
                                                               "ABF PAYOUT")
    assert d.process_date == datetime.now(ZoneInfo(TZ)).date()
    credits = [r for r in parsed.details if r.code == aba.CREDIT_CODE]
    assert [(c.bsb, c.account_number, c.amount_cents, c.title, c.lodgement_reference) for c in credits] == [
        (r.bsb, r.account_number, r.net_cents, aba.clean_text(r.name)[:32], r.reference) for r in res.rows]
    assert credits[1].title == "Cafe Bridge"
    assert {(c.trace_bsb, c.trace_account_number, c.remitter) for c in parsed.details} == {("032-001", "987654", "ABF")}
    (debit,) = [r for r in parsed.details if r.code == aba.DEBIT_CODE]
    assert (debit.bsb, debit.account_number, debit.amount_cents, debit.title) == (
        "032-001", "987654", res.total_net_cents, "ABF Club Settlements")
    assert debit.lodgement_reference == "STL " + res.batch_id.removeprefix("stl_")[:14].upper()
    assert parsed.total == aba.FileTotal(0, res.total_net_cents, res.total_net_cents, 3)
    assert res.total_net_cents == sum(r.net_cents for r in res.rows) > 0
    # the same request again: the same file, nothing booked twice
    again = admin.settle(idempotency_key="settle-aba-1")
    assert again.aba_file == res.aba_file
    with server.db.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(settlements)).scalar_one() == 2


def _problem_clubs(server, admin, app) -> None:  # noqa: ANN001
    clubs(admin, app)
    admin.upsert_organisation(20, "No Details BC")
    fund(admin, app, 20, 5_000)
    admin.upsert_organisation(21, "Legacy BC", bsb="222-222", account_number="22222222")
    fund(admin, app, 21, 7_000)
    with server.db.engine.begin() as conn:  # details from before today's checks
        conn.execute(update(organisations).where(organisations.c.organisation_id == 21)
                     .values(bsb="222222", account_number="1234567890"))


def _ledger_state(server) -> tuple:  # noqa: ANN001
    with server.db.engine.connect() as conn:
        return (sorted(conn.execute(select(accounts.c.id, accounts.c.balance_cents)).all()),
                conn.execute(select(func.count()).select_from(transactions)).scalar_one(),
                conn.execute(select(func.count()).select_from(settlements)).scalar_one())


def test_clubs_the_bank_cannot_pay_are_refused_by_name(server, admin, app):
    _problem_clubs(server, admin, app)
    dry = admin.settle(dry_run=True)
    problems = {r.organisation_id: r.bank_details_problem for r in dry.rows}
    assert problems[10] == problems[11] == ""
    assert problems[20] == "no BSB"
    assert "ddd-ddd" in problems[21]
    before = _ledger_state(server)
    with pytest.raises(grpc.RpcError) as refused:
        admin.settle()
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = refused.value.details()
    assert "organisation 20 (No Details BC): no BSB" in details
    assert "organisation 21 (Legacy BC)" in details and "organisation 10" not in details
    assert _ledger_state(server) == before  # nothing booked
    # leaving them out settles the others
    res = admin.settle([10, 11])
    assert len(res.rows) == 2 and aba.parse(res.aba_file).total.detail_count == 3


def test_a_server_without_direct_entry_settings_makes_no_file(postgresql_server, admin, app):  # noqa: ANN001
    _truncate_all(postgresql_server.db)
    with postgresql_server.client("admin") as plain_admin, postgresql_server.client("app") as plain_app:
        plain_admin.upsert_organisation(10, "Club", bsb="062-000", account_number="12345678")
        fund(plain_admin, plain_app, 10, 5_000)
        assert not plain_admin.settle(dry_run=True).aba_available
        res = plain_admin.settle()
        assert len(res.rows) == 1 and res.aba_file == b"" and not res.aba_available


def _cli(server, tmp_path, *args: str) -> subprocess.CompletedProcess:  # noqa: ANN001
    env = {k: v for k, v in os.environ.items() if k not in ("PAYMENTS_TOKEN", "COLUMNS", "XDG_CONFIG_HOME")}
    env.update(HOME=str(tmp_path), PAYMENTS_TARGET=server.target, PAYMENTS_TOKEN=TOKENS["admin"],
               PYTHONPATH=os.getcwd())
    return subprocess.run([*COMMAND, *args], env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)


@pytest.mark.e2e
def test_payments_admin_writes_the_aba_file(server, admin, app, tmp_path):
    _problem_clubs(server, admin, app)
    before = _ledger_state(server)
    refused = _cli(server, tmp_path, "settle", "--yes", "--aba", "out.aba")
    assert refused.returncode == 1
    assert "No Details BC" in refused.stderr and "Legacy BC" in refused.stderr and "nothing was settled" in refused.stderr
    assert not (tmp_path / "out.aba").exists() and _ledger_state(server) == before
    res = _cli(server, tmp_path, "settle", "10", "11", "--yes", "--aba", "out.aba", "--bank-csv", "out.csv")
    assert res.returncode == 0, res.stderr
    assert "wrote the ABA file out.aba: 2 credits" in res.stderr
    parsed = aba.parse((tmp_path / "out.aba").read_bytes())
    credits = {d.account_number: d.amount_cents for d in parsed.details if d.code == aba.CREDIT_CODE}
    assert credits == {"12345678": 12_098, "87654321": 4_924_015}  # net of the 2.00 % and 1.50 % fees
    assert parsed.total.debit_cents == parsed.total.credit_cents == sum(credits.values())
    assert (tmp_path / "out.csv").exists()
    usage = _cli(server, tmp_path, "settle", "--dry-run", "--aba", "x.aba")
    assert usage.returncode == 2 and "drop --dry-run" in usage.stderr
