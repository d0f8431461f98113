"""payments-admin driven as a subprocess against a running server."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import TOKENS

from clients.admin_cli import format_cents, parse_dollars
from server.domain.types import SystemAccount

e2e = pytest.mark.e2e

_SCRIPT = Path(sys.executable).with_name("payments-admin")
COMMAND = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "clients.admin_cli"]


@pytest.fixture
def cli(server, tmp_path):  # noqa: ANN001, ANN201
    """Run payments-admin with the admin token in the environment; a clean HOME (no config file)."""
    home = tmp_path / "home"
    home.mkdir()

    def run(*args: str, token: str | None = TOKENS["admin"], stdin: str = "", target: str | None = None,
            cwd: Path = tmp_path) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k not in ("PAYMENTS_TOKEN", "COLUMNS", "XDG_CONFIG_HOME")}
        env.update(HOME=str(home), PAYMENTS_TARGET=target or server.target, PYTHONPATH=os.getcwd())
        if token is not None:
            env["PAYMENTS_TOKEN"] = token
        return subprocess.run([*COMMAND, *args], env=env, input=stdin, capture_output=True, text=True, timeout=60,
                              cwd=cwd)

    run.home = home  # type: ignore[attr-defined]
    return run


_SERVER_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \[\w+\s*\] ")


def _no_server_log(text: str) -> str:
    """The server in this process logs to whatever stdout is: leave its lines out."""
    return "".join(line for line in text.splitlines(keepends=True) if not _SERVER_LOG_LINE.match(line))


@pytest.fixture
def cli_here(server, monkeypatch):  # noqa: ANN001, ANN201
    """payments-admin's main() in this process (quicker than a process per call), same environment."""
    from clients.admin_cli import main

    monkeypatch.setenv("PAYMENTS_TOKEN", TOKENS["admin"])
    monkeypatch.setenv("PAYMENTS_TARGET", server.target)

    def run(*args: str) -> SimpleNamespace:
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = main(list(args))
        return SimpleNamespace(returncode=code, stdout=_no_server_log(stdout.getvalue()),
                               stderr=_no_server_log(stderr.getvalue()))

    return run


def fund(admin, app, org_id: int, cents: int, member_id: int) -> None:  # noqa: ANN001
    admin.adjust(cents, "credit", member_id=member_id)
    app.pay(member_id, cents, organisation_id=org_id, description="Entry")


def test_money_formats():
    assert [format_cents(c) for c in (0, 5, 12_345, -123_456, 100_000_000)] == [
        "$0.00", "$0.05", "$123.45", "-$1,234.56", "$1,000,000.00"]
    assert [parse_dollars(t) for t in ("12", "12.5", "$1,234.56", "-5.00", "0.07", "-$3")] == [
        1_200, 1_250, 123_456, -500, 7, -300]
    for bad in ("12.345", "1,23", "abc", "", "1e3", "12.", "--5"):
        with pytest.raises(ValueError):
            parse_dollars(bad)


@e2e
def test_settle_with_yes_writes_the_bank_file(server, app, admin, cli, tmp_path):
    admin.upsert_organisation(10, "North Shore BC", bsb="062-000", account_number="12345678")
    admin.upsert_organisation(11, "Harbour BC", bsb="123-456", account_number="87654321",
                              minimum_balance_cents=20_000, settlement_fee_bp=225)
    fund(admin, app, 10, 12_345, member_id=1)
    fund(admin, app, 11, 32_345, member_id=2)
    bank_before = admin.list_balances(3).rows
    res = cli("settle", "--yes", "--bank-csv", "bank.csv")
    assert res.returncode == 0, res.stderr
    assert "$123.45" in res.stdout and "$120.98" in res.stdout and "$120.67" in res.stdout
    assert "Settled: batch stl_" in res.stdout
    rows = list(csv.DictReader((tmp_path / "bank.csv").open()))
    assert [(r["Organisation ID"], r["BSB"], r["Account Number"], r["Amount"]) for r in rows] == [
        ("10", "062-000", "12345678", "120.98"), ("11", "123-456", "87654321", "120.67")]
    assert all(r["Reference"].startswith("SET-") and r["Batch"].startswith("stl_") for r in rows)
    # the bank account received exactly what the bank file pays out
    bank_now = {r.system_account: r.balance_cents for r in admin.list_balances(3).rows}
    before = {r.system_account: r.balance_cents for r in bank_before}
    assert bank_now["bank"] - before.get("bank", 0) == sum(parse_dollars(r["Amount"]) for r in rows) == 24_165
    assert admin.balance_cents(organisation_id=10) == 0 and admin.balance_cents(organisation_id=11) == 20_000
    again = cli("settle", "--yes")
    assert again.returncode == 0 and "Nothing to settle" in again.stdout


@e2e
def test_settle_asks_first(server, app, admin, cli):
    admin.upsert_organisation(10, "North Shore BC", bsb="062-000", account_number="12345678")
    fund(admin, app, 10, 5_000, member_id=1)
    declined = cli("settle", stdin="n\n")
    assert declined.returncode == 5 and "nothing was done" in declined.stderr
    assert "$50.00" in declined.stdout  # the dry-run table was shown
    assert admin.balance_cents(organisation_id=10) == 5_000
    no_answer = cli("settle")  # no terminal, no --yes: nothing happens
    assert no_answer.returncode == 5
    accepted = cli("settle", "10", stdin="y\n")
    assert accepted.returncode == 0, accepted.stderr
    assert admin.balance_cents(organisation_id=10) == 0
    fed = {r.system_account: r.balance_cents for r in admin.list_balances(3).rows}[SystemAccount.FEDERATION.code]
    assert fed == 100


@e2e
def test_statement_csv_parses_back_to_the_ledger(server, app, admin, cli, tmp_path):
    admin.upsert_organisation(7, "Club, with a comma", bsb="062-000", account_number="12345678")
    admin.upsert_member(1, "Ann O'Neil")
    admin.adjust(100_000, "credit", member_id=1)
    for cents in (1_234, 99_00, 5):
        app.pay(1, cents, organisation_id=7, description='Entry "pairs", 7pm')
    admin.transfer(2, 1_000, from_organisation_id=7, description="prize")
    admin.settle([7])
    res = cli("statement", "--org", "7", "--csv", "club.csv")
    assert res.returncode == 0, res.stderr
    with (tmp_path / "club.csv").open(newline="") as fh:
        parsed = list(csv.DictReader(fh))
    ledger = admin.get_statement(organisation_id=7, page_size=500)
    assert [r["Reference"] for r in parsed] == [line.reference for line in ledger.lines]
    assert [parse_dollars(r["Amount"]) for r in parsed] == [line.amount_cents for line in ledger.lines]
    assert [parse_dollars(r["Balance"]) for r in parsed] == [line.balance_after_cents for line in ledger.lines]
    assert [r["Type"] for r in parsed] == [line.type_name for line in ledger.lines]
    assert sum(parse_dollars(r["Amount"]) for r in parsed) == ledger.closing_balance_cents
    assert parsed[-1]["Counterparty"] == "Ann O'Neil (member 1)"
    assert parsed[-1]["Description"] == 'Entry "pairs", 7pm'
    old = cli("statement", "--org", "7", "--from", "2000-01-01", "--to", "2000-01-02T12:00+10:00", "--csv", "old.csv")
    assert old.returncode == 0 and (tmp_path / "old.csv").read_text().splitlines() == [
        "Date,Counterparty,Reference,Type,Description,Amount,Balance"]
    table = cli("statement", "--org", "7", "--limit", "3")
    assert table.returncode == 0 and "Settlement" in table.stdout and "more: --limit or --csv" in table.stdout
    to_stdout = cli("statement", "--member", "1", "--csv", "-")
    assert to_stdout.returncode == 0
    rows = list(csv.DictReader(io.StringIO(to_stdout.stdout)))
    assert parse_dollars(rows[0]["Balance"]) == admin.balance_cents(member_id=1)


@e2e
def test_bad_token_and_missing_token(server, cli, tmp_path):
    bad = cli("summary", token="not-the-token")
    assert bad.returncode == 3
    assert "did not accept the token" in bad.stderr and "Traceback" not in bad.stderr
    app_role = cli("summary", token=TOKENS["app"])
    assert app_role.returncode == 3 and "PERMISSION_DENIED" in app_role.stderr
    missing = cli("summary", token=None)
    assert missing.returncode == 3 and "PAYMENTS_TOKEN" in missing.stderr
    # the config file, and --token-file
    config = cli.home / ".config" / "cobalt-payments"
    config.mkdir(parents=True)
    (config / "token").write_text(TOKENS["admin"] + "\n")
    (config / "token").chmod(0o600)
    assert cli("summary", token=None).returncode == 0
    other = tmp_path / "tok"
    other.write_text("wrong\n")
    assert cli("--token-file", str(other), "summary").returncode == 3  # the flag wins over the environment


@e2e
def test_unknown_organisation_unreachable_and_usage(server, admin, cli, cli_here):
    for args in (["balance", "--org", "99"], ["settle", "99", "--yes"]):
        res = cli(*args)
        assert res.returncode == 1, (args, res.stderr)
        assert "organisation 99 is not registered" in res.stderr and "Traceback" not in res.stderr
    for args in (["organisations", "show", "99"], ["statement", "--org", "99"], ["statement", "--org", "99", "--csv",
                                                                                 "-"]):
        res = cli_here(*args)
        assert res.returncode == 1 and "organisation 99 is not registered" in res.stderr, args
    # members exist from their first use (SPEC §2): an unheard-of member has $0.00
    res = cli_here("balance", "--member", "4242")
    assert res.returncode == 0 and "$0.00" in res.stdout
    res = cli("adjust", "--member", "1", "12.5x", "-d", "oops", "--yes")
    assert res.returncode == 2 and "not an amount" in res.stderr
    res = cli("settle", "--frobnicate")
    assert res.returncode == 2 and "unrecognized arguments" in res.stderr
    res = cli_here("organisations", "upsert", "5", "--name", "X", "--bsb", "12")
    assert res.returncode == 1 and "bsb" in res.stderr
    res = cli("--timeout", "5", "summary", target="127.0.0.1:1")
    assert res.returncode == 4 and "cannot reach" in res.stderr
    assert list(admin.list_organisations().organisations) == []


def test_json_and_other_commands(server, app, admin, cli_here):
    admin.upsert_organisation(7, "Club", bsb="062-000", account_number="12345678")
    fund(admin, app, 7, 2_500, member_id=1)
    adj = cli_here("adjust", "--member", "3", "-7.25", "-d", "correction", "--yes")
    assert adj.returncode == 0 and "-$7.25" in adj.stdout and "below zero" in adj.stderr
    summary = json.loads(cli_here("--json", "summary").stdout)
    assert int(summary["organisation_balances_cents"]) == 2_500
    assert int(summary["member_balances_cents"]) == -725
    assert int(summary["ledger_sum_cents"]) == 0
    balances = json.loads(cli_here("--json", "balances").stdout)
    assert int(balances["total_cents"]) == 2_500 - 725 and int(balances["count"]) == 2
    assert "$25.00" in cli_here("balances", "--kind", "organisations").stdout
    up = cli_here("organisations", "upsert", "7", "--fee-bp", "150", "--minimum", "10")
    assert up.returncode == 0, up.stderr
    org = admin.list_organisations([7]).organisations[0]
    assert (org.name, org.bsb, org.settlement_fee_bp, org.minimum_balance_cents) == ("Club", "062-000", 150, 1_000)
    assert "1.50%" in cli_here("organisations", "list").stdout
    assert cli_here("organisations", "upsert", "7", "--default-fee").returncode == 0
    assert not admin.list_organisations([7]).organisations[0].HasField("settlement_fee_bp")
    fees = cli_here("fees", "set", "--settlement-bp", "225", "--low-balance", "25.00")
    assert fees.returncode == 0, fees.stderr
    current = admin.get_fee_settings().current
    assert (current.settlement_fee_bp, current.low_balance_limit_cents, current.refund_fee_bp) == (225, 2_500, 300)
    assert "2.25%" in cli_here("fees", "show").stdout
    dry = json.loads(cli_here("--json", "settle", "--dry-run").stdout)
    assert [int(r["gross_cents"]) for r in dry["rows"]] == [1_500] and dry["dry_run"] is True
    assert admin.balance_cents(organisation_id=7) == 2_500
    real = cli_here("--json", "settle", "--yes")
    assert real.returncode == 0, real.stderr
    done = json.loads(real.stdout)
    assert done["batch_id"].startswith("stl_") and [int(r["net_cents"]) for r in done["rows"]] == [1_500 - 34]
    assert admin.balance_cents(organisation_id=7) == 1_000


@e2e
def test_events_tail_shows_settlements(server, app, admin, cli):
    admin.upsert_organisation(7, "Club", bsb="062-000", account_number="12345678")
    fund(admin, app, 7, 1_000, member_id=1)
    batch = admin.settle([7]).batch_id
    env = {k: v for k, v in os.environ.items() if k not in ("PAYMENTS_TOKEN", "COLUMNS")}
    env.update(PAYMENTS_TOKEN=TOKENS["admin"], PAYMENTS_TARGET=server.target, PYTHONPATH=os.getcwd())
    proc = subprocess.Popen([*COMMAND, "--json", "events", "tail", "--kind", "settlement_made"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = json.loads(proc.stdout.readline())  # type: ignore[union-attr]
    finally:
        proc.kill()
        proc.wait(10)
    assert first["kind"] == "SETTLEMENT_MADE" and first["payment_id"] == batch
    assert int(first["organisation_id"]) == 7 and int(first["amount_cents"]) == 1_000


BUF = Path(__file__).resolve().parent.parent / "node_modules" / ".bin" / "buf"


@e2e
def test_readme_buf_curl_settlement(server, app, admin):
    """The README's `buf curl` settlement: a dry run, then the real run with its balances."""
    if not BUF.exists():
        pytest.skip("node_modules/.bin/buf is missing: `make test` installs it (npm ci)")
    admin.upsert_organisation(7, "Club", bsb="062-000", account_number="12345678")
    fund(admin, app, 7, 12_345, member_id=1)
    url = f"http://{server.target}/cobalt.payments.v1.PaymentsService/Settle"

    def curl(body: dict) -> dict:
        res = subprocess.run([str(BUF), "curl", "--protocol", "grpc", "--http2-prior-knowledge", "--timeout", "20s",
                              "-H", f"authorization: Bearer {TOKENS['admin']}", "-d", json.dumps(body), url],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout)

    dry = curl({"dry_run": True})
    assert dry["dryRun"] is True and dry["rows"][0]["grossCents"] == "12345" and dry["rows"][0]["feeCents"] == "247"
    real = curl({"idempotency_key": "settle-2026-11", "organisation_ids": [7],
                 "expected_balances": [{"organisation_id": 7, "balance_cents": 12_345}]})
    assert real["batchId"].startswith("stl_") and real["totalNetCents"] == "12098"
    assert "balanceChanged" not in real["rows"][0]
    assert admin.balance_cents(organisation_id=7) == 0


# ---------------------------------------------------------------- polish: widths, events tail, options

def _run_admin(target: str, *args: str, columns: int | None = None, timeout_s: float = 60,
               **env_extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PAYMENTS_TOKEN", "COLUMNS", "PAYMENTS_TARGET")}
    env.update(PAYMENTS_TOKEN=TOKENS["admin"], PAYMENTS_TARGET=target, **env_extra)
    if columns is not None:
        env["COLUMNS"] = str(columns)
    return subprocess.run([*COMMAND, *args], env=env, capture_output=True, text=True, timeout=timeout_s)


@e2e
def test_money_never_folds_mid_number_at_80_columns(server, app, admin):
    for org_id in (21, 22, 23):
        admin.upsert_organisation(org_id, f"The Very Long Named Bridge Club of District {org_id} Incorporated",
                                  bsb="062-000", account_number="123456789", minimum_balance_cents=1_000_000_00)
    admin.adjust(9_876_543_21, "credit", member_id=5)
    app.pay(5, 4_321_987_65, organisation_id=21, description="A long description of a large payment")
    admin.adjust(7_654_321_09, "credit", organisation_id=22)
    amounts = {format_cents(c) for c in (4_321_987_65 - 1_000_000_00, 7_654_321_09 - 1_000_000_00,
                                         4_321_987_65 + 7_654_321_09 - 2_000_000_00)}
    for args in (["settle", "--dry-run"], ["balances"], ["organisations", "list"], ["statement", "--member", "5"]):
        res = _run_admin(server.target, *args, columns=80)
        assert res.returncode == 0, (args, res.stderr)
        assert max(len(line) for line in res.stdout.splitlines()) <= 80, args
        if args[0] == "settle":
            for amount in amounts:
                assert amount in res.stdout, (amount, res.stdout)
        money = re.findall(r"-?\$[\d,]+\.\d\d", res.stdout)
        assert money, args
        for text_ in money:
            assert parse_dollars(text_) is not None
        # an amount cut over two lines would leave a piece like "$4,321,9" at the end of a cell
        assert not re.search(r"\$[\d,]*\d(?=\s*│)(?<!\.\d\d)", res.stdout), res.stdout


@e2e
def test_events_tail_shows_dollars_and_local_time(server, admin):
    env = {k: v for k, v in os.environ.items() if k not in ("PAYMENTS_TOKEN", "COLUMNS", "PAYMENTS_TARGET")}
    env.update(PAYMENTS_TOKEN=TOKENS["admin"], PAYMENTS_TARGET=server.target, PAYMENTS_TIMEZONE="Asia/Kolkata")
    admin.adjust(12_34, "credit", member_id=8)
    proc = subprocess.Popen([*COMMAND, "events", "tail", "--kind", "adjusted"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
    finally:
        proc.kill()
        proc.wait(10)
    assert "ADJUSTED" in line and "amount $12.34" in line and "balance $12.34" in line and "member 8" in line
    from datetime import datetime
    from zoneinfo import ZoneInfo

    stamp = re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", line)
    assert stamp, line
    shown = datetime.strptime(stamp.group(0), "%Y-%m-%d %H:%M:%S").replace(tzinfo=ZoneInfo("Asia/Kolkata"))
    assert abs((datetime.now(ZoneInfo("UTC")) - shown).total_seconds()) < 120, "the time is Kolkata's, not UTC"


@e2e
@pytest.mark.postgres
def test_events_tail_says_when_it_reconnects_and_misses_nothing(postgres_url):
    """Connections age out (PAYMENTS_GRPC_MAX_CONNECTION_AGE_S, as behind a load balancer): the stream is
    resumed after the last event shown, with a line on stderr, and no event is lost or shown twice."""
    import time

    from conftest import start_server

    srv = start_server(postgres_url, "postgresql", grpc_max_connection_age_s=1, grpc_max_connection_age_grace_s=1)
    env = {k: v for k, v in os.environ.items() if k not in ("PAYMENTS_TOKEN", "COLUMNS", "PAYMENTS_TARGET")}
    env.update(PAYMENTS_TOKEN=TOKENS["admin"], PAYMENTS_TARGET=srv.target)
    route = "AGE" + uuid.uuid4().hex[:6].upper()
    proc = subprocess.Popen([*COMMAND, "--json", "events", "tail", "--after", "-1", "--route", route], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with srv.client("admin") as admin, srv.client("app") as app:
            admin.upsert_organisation(31, "Age Club")
            admin.adjust(100_00, "credit", member_id=31)
            time.sleep(1.0)  # the stream is open
            for i in range(8):  # across several connection ages
                app.pay(31, 1_00 + i, organisation_id=31, description=f"p{i}", route_code=route)
                time.sleep(0.5)
        seen = [json.loads(proc.stdout.readline()) for _ in range(8)]  # type: ignore[union-attr]
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=20)
        srv.stop()
    assert [int(e["amount_cents"]) for e in seen] == [1_00 + i for i in range(8)]
    assert len({e["sequence"] for e in seen}) == 8
    assert "reconnecting" in stderr and "UNAVAILABLE" in stderr


@e2e
def test_events_tail_exits_4_when_the_server_is_unreachable():
    res = _run_admin("127.0.0.1:1", "events", "tail", timeout_s=120)
    assert res.returncode == 4, res.stderr
    assert "cannot reach the payments server at 127.0.0.1:1" in res.stderr and "Traceback" not in res.stderr


def test_json_works_after_the_command_too(server, admin, cli_here):
    admin.upsert_organisation(9, "Json Club")
    for args in (["summary", "--json"], ["balances", "--json"], ["organisations", "list", "--json"],
                 ["fees", "show", "--json"], ["balance", "--org", "9", "--json"], ["--json", "summary"]):
        res = cli_here(*args)
        assert res.returncode == 0, (args, res.stderr)
        assert isinstance(json.loads(res.stdout), dict), args
    table = cli_here("summary")
    assert table.returncode == 0 and "Ledger sum" in table.stdout


def test_every_option_has_help():
    import argparse

    from clients.admin_cli import build_parser

    missing = []

    def walk(parser: argparse.ArgumentParser, path: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, f"{path} {name}")
            elif not isinstance(action, argparse._HelpAction) and not (action.help or "").strip():
                missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")

    walk(build_parser(), "payments-admin")
    assert missing == []


@pytest.mark.parametrize("args", [
    ["adjust", "--member", "1", "99999999999999999999", "-d", "too much", "--yes"],
    ["adjust", "--member", "1", "-99999999999999999999.00", "-d", "too little", "--yes"],
    ["balance", "--member", "99999999999999999999"],
    ["organisations", "upsert", "7", "--fee-bp", "99999999999999999999999"],
    ["organisations", "upsert", "7", "--minimum", "1e9"],
    ["fees", "set", "--stripe-cents", "3000000000"],
    ["fees", "set", "--low-balance", "92233720368547758.08"],
    ["events", "tail", "--after", "-2"],
    ["--timeout", "-1", "summary"],
], ids=lambda a: " ".join(a)[:40])
def test_out_of_range_values_are_usage_errors(args):
    res = _run_admin("127.0.0.1:1", *args)
    assert res.returncode == 2, res.stderr
    assert "usage:" in res.stderr and "Traceback" not in res.stderr
