"""payments-admin: the administrators' command line over the client library.

    payments-admin balance --org 7
    payments-admin statement --org 7 --from 2026-11-01 --csv club7-november.csv
    payments-admin adjust --member 42 -12.50 --description "duplicate entry fee"
    payments-admin settle --bank-csv settlement.csv --aba settlement.aba
    payments-admin summary | balances | organisations list | fees show

The token comes from --token-file, else PAYMENTS_TOKEN, else ~/.config/cobalt-payments/token
(never from a command-line value, which would land in the shell history). The server is
PAYMENTS_TARGET (default 127.0.0.1:50051) or --target.

Exit codes: 0 done; 1 the server refused (not found, invalid, insufficient funds, conflict, …);
2 usage (bad arguments); 3 no token, bad token or not allowed; 4 server unreachable;
5 cancelled at a confirmation prompt; 130 interrupted.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import re
import stat
import sys
import time
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.prompt import Confirm
from rich.table import Table
from rich.text import Text

from clients import events
from clients.payments_client import PaymentsClient, account, new_idempotency_key
from cobalt.payments.v1 import payments_pb2 as pb
from server.domain.csv_cells import text_cells

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_AUTH, EXIT_UNAVAILABLE, EXIT_CANCELLED = 0, 1, 2, 3, 4, 5

DEFAULT_TARGET = "127.0.0.1:50051"
TOKEN_PATH = Path("cobalt-payments") / "token"
MAX_STATEMENT_LINES = 10_000
SETTLE_TIMEOUT_S = 600.0  # a batch of many clubs takes a while: the real run gets this long
MAX_CENTS = 2**63 - 1  # what an int64 amount holds; anything larger is a usage error, not a traceback
MAX_ID = 2**63 - 1
EVENTS_GIVE_UP_S = 60.0  # `events tail` stops trying to reconnect (exit 4) after this long without a stream


def _console(stderr: bool) -> Console:
    """Tables at the terminal's width; piped or redirected output gets room for every column.
    The console writes to whatever sys.stdout / sys.stderr is when it prints."""
    stream = sys.stderr if stderr else sys.stdout
    wide = None if stream.isatty() or os.environ.get("COLUMNS") else 160
    return Console(stderr=stderr, highlight=False, soft_wrap=True, width=wide)


out = _console(stderr=False)
err = _console(stderr=True)


class CliError(Exception):
    def __init__(self, message: str, exit_code: int = EXIT_REFUSED):
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


# ---------------------------------------------------------------- money, dates, tokens

_DOLLARS = re.compile(r"^(-)?\$?(\d{1,3}(?:,\d{3})+|\d+)(?:\.(\d{1,2}))?$")


def format_cents(cents: int) -> str:
    """12345 → $123.45; -123456 → -$1,234.56."""
    sign = "-" if cents < 0 else ""
    dollars, rest = divmod(abs(cents), 100)
    return f"{sign}${dollars:,}.{rest:02d}"


def plain_dollars(cents: int) -> str:
    """For files other programs read: -1234.56 (no $, no thousands separator)."""
    sign = "-" if cents < 0 else ""
    return f"{sign}{abs(cents) // 100}.{abs(cents) % 100:02d}"


def parse_dollars(text: str) -> int:
    """'12', '12.5', '$1,234.56', '-5.00' → cents. No floats on the way."""
    m = _DOLLARS.match(text.strip())
    if not m:
        raise ValueError(f"{text!r} is not an amount in dollars (like 12.50 or $1,234.56)")
    sign, whole, frac = m.groups()
    cents = int(whole.replace(",", "")) * 100 + int((frac or "0").ljust(2, "0"))
    if cents > MAX_CENTS:
        raise ValueError(f"{text!r} is out of range (at most {format_cents(MAX_CENTS)})")
    return -cents if sign else cents


def format_bp(bp: int) -> str:
    return f"{bp // 100}.{bp % 100:02d}%"


def local_zone() -> ZoneInfo:
    name = os.environ.get("PAYMENTS_TIMEZONE") or "Australia/Sydney"
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise CliError(f"PAYMENTS_TIMEZONE={name!r} is not a time zone", EXIT_USAGE) from exc


def parse_when(text: str) -> datetime:
    """A date (midnight in PAYMENTS_TIMEZONE) or an ISO date-time (with or without offset)."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError as exc:
        raise CliError(f"{text!r} is not a date (2026-11-01) or date-time (2026-11-01T09:30)", EXIT_USAGE) from exc
    return value if value.tzinfo else value.replace(tzinfo=local_zone())


def show_time(ts) -> str:  # noqa: ANN001
    if not ts.seconds and not ts.nanos:
        return ""
    return ts.ToDatetime(tzinfo=ZoneInfo("UTC")).astimezone(local_zone()).strftime("%Y-%m-%d %H:%M:%S")


def config_token_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / TOKEN_PATH


def _read_token_file(path: Path) -> str:
    try:
        mode = path.stat().st_mode
        text = path.read_text().strip()
    except OSError as exc:
        raise CliError(f"cannot read the token file {path}: {exc.strerror}", EXIT_AUTH) from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        err.print(f"[yellow]warning:[/] {path} can be read by others; chmod 600 it")
    if not text:
        raise CliError(f"the token file {path} is empty", EXIT_AUTH)
    return text


def load_token(token_file: str | None) -> str:
    """--token-file, else PAYMENTS_TOKEN, else the config file."""
    if token_file:
        return _read_token_file(Path(token_file).expanduser())
    env = os.environ.get("PAYMENTS_TOKEN", "").strip()
    if env:
        return env
    path = config_token_path()
    if path.exists():
        return _read_token_file(path)
    raise CliError(
        f"no token: set PAYMENTS_TOKEN, write the token to {path} (chmod 600), or pass --token-file FILE",
        EXIT_AUTH,
    )


# ---------------------------------------------------------------- errors from the server

def _violations(exc: grpc.RpcError) -> list[str]:
    try:
        from google.rpc import error_details_pb2
        from grpc_status import rpc_status

        status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    except Exception:  # noqa: BLE001 - details are a nicety; the message is enough
        return []
    found = []
    for detail in status.details if status else []:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            found.extend(f"{v.field}: {v.description}" for v in bad.field_violations)
    return found


def rpc_failure(exc: grpc.RpcError, target: str) -> CliError:
    code = exc.code()
    details = exc.details() or code.name
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return CliError("the server did not accept the token (UNAUTHENTICATED): check PAYMENTS_TOKEN or the token "
                        "file", EXIT_AUTH)
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return CliError(f"not allowed (PERMISSION_DENIED): {details}; payments-admin needs an admin token", EXIT_AUTH)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return CliError(f"cannot reach the payments server at {target} ({code.name}): {details}", EXIT_UNAVAILABLE)
    lines = [f"{code.name}: {details}"]
    lines += [f"  - {v}" for v in _violations(exc) if v not in details]
    return CliError("\n".join(lines), EXIT_REFUSED)


# ---------------------------------------------------------------- output helpers

def as_json(message: Message) -> str:
    return json_format.MessageToJson(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


MONEY = {"justify": "right", "no_wrap": True}  # an amount is never folded or cut: other columns give way


def money_column(table: Table, title: str, **extra: object) -> None:
    table.add_column(title, **MONEY, **extra)  # type: ignore[arg-type]


NARROWEST_TEXT_COLUMN = 6  # a text column may be squeezed to this and fold; an amount never is


def _needed_width(table: Table) -> int:
    """The narrowest the table can be with every no-wrap cell (amounts, ids) whole."""
    total = 1  # the right-hand border
    for column in table.columns:
        if column.no_wrap:
            texts = [column.header, column.footer, *column.cells]
            width = max((Text.from_markup(t).cell_len if isinstance(t, str) else 0 for t in texts), default=0)
        else:
            width = max(NARROWEST_TEXT_COLUMN, column.min_width or 0)
        total += width + 3  # padding on both sides and a border
    return total


def show(table: Table, console: Console | None = None) -> None:
    """Print `table` as it is when every amount fits whole at the console's width (text columns fold
    instead); otherwise (a narrow terminal, many columns) as one small two-column table per row, so
    that no amount is ever folded or cut."""
    console = console or out
    if _needed_width(table) <= console.width:
        console.print(table)
        return
    if table.title:
        console.print(table.title, style="italic")
    headers = [str(column.header) for column in table.columns]
    for row in range(table.row_count):
        card = Table(show_header=False, box=box.SIMPLE, padding=(0, 1))
        card.add_column(style="bold", overflow="fold")
        card.add_column(overflow="fold")
        for header, column in zip(headers, table.columns, strict=True):
            cell = list(column.cells)[row]
            if header or cell:
                card.add_row(header, cell)
        console.print(card)
    totals = [(str(column.header), column.footer) for column in table.columns if column.footer]
    if table.show_footer and totals:
        card = Table(show_header=False, box=box.SIMPLE, padding=(0, 1), title="Total")
        card.add_column(style="bold", overflow="fold")
        card.add_column(overflow="fold")
        for header, footer in totals[1:]:  # the first footer is the word "Total"
            card.add_row(header, footer)
        console.print(card)
    if table.caption:
        console.print(table.caption, style="dim")


def confirm(question: str, assume_yes: bool) -> None:
    if assume_yes:
        return
    try:
        ok = Confirm.ask(question, console=err, default=False)
    except (EOFError, KeyboardInterrupt):
        ok = False
    if not ok:
        raise CliError("cancelled: nothing was done", EXIT_CANCELLED)


def account_of(args: argparse.Namespace) -> tuple[dict, str]:
    if args.member is not None:
        return {"member_id": args.member}, f"member {args.member}"
    return {"organisation_id": args.org}, f"organisation {args.org}"


def progress() -> Progress:
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=err, transient=True)


# ---------------------------------------------------------------- commands

def cmd_balance(client: PaymentsClient, args: argparse.Namespace) -> int:
    which, label = account_of(args)
    bal = client.get_balance(**which)
    if args.json:
        out.print_json(as_json(bal))
        return EXIT_OK
    table = Table(title=f"{label} {bal.name}".strip(), show_header=False)
    table.add_column(style="bold")
    table.add_column(**MONEY)  # type: ignore[arg-type]
    table.add_row("Balance", format_cents(bal.balance_cents))
    if args.member is not None:
        status = pb.AutoTopUpStatus.Name(bal.auto_top_up_status).removeprefix("AUTO_TOP_UP_STATUS_")
        table.add_row("Auto top-up", status if status != "UNSPECIFIED" else "OFF")
        if bal.auto_top_up_amount_cents:
            table.add_row("Auto top-up amount", format_cents(bal.auto_top_up_amount_cents))
    table.add_row("Last movement", show_time(bal.last_movement_at) or "never")
    show(table)
    return EXIT_OK


def _export_csv(client: PaymentsClient, which: dict, start: datetime | None, end: datetime | None,
                dest: str) -> int:
    req = pb.ExportStatementRequest(account=account(**which))
    if start is not None:
        getattr(req, "from").FromDatetime(start)
    if end is not None:
        req.to.FromDatetime(end)
    chunks = client.stream("ExportStatement", req, timeout_s=max(client.timeout_s, 600))
    if dest == "-":
        lines = 0
        for chunk in chunks:
            sys.stdout.buffer.write(chunk.data)
            lines += chunk.data.count(b"\n")
        sys.stdout.flush()
        return lines
    path = Path(dest)
    tmp = path.with_name(f".{path.name}.part")
    lines = 0
    try:
        with progress() as bar, open(tmp, "wb") as fh:
            task = bar.add_task("exporting statement", total=None)
            for chunk in chunks:
                fh.write(chunk.data)
                lines += chunk.data.count(b"\n")
                bar.update(task, completed=max(lines - 1, 0))
        os.replace(tmp, path)  # the file appears whole or not at all
    finally:
        tmp.unlink(missing_ok=True)
    return lines


def cmd_statement(client: PaymentsClient, args: argparse.Namespace) -> int:
    which, label = account_of(args)
    start = parse_when(args.start) if args.start else None
    end = parse_when(args.end) if args.end else None
    if args.csv:
        lines = _export_csv(client, which, start, end, args.csv)
        if args.csv != "-":
            err.print(f"wrote {max(lines - 1, 0)} statement lines of {label} to {args.csv}")
        return EXIT_OK
    collected: list[pb.StatementLine] = []
    token = ""
    first: pb.GetStatementResponse | None = None
    while len(collected) < args.limit:
        page = client.get_statement(**which, page_size=min(500, args.limit - len(collected)), page_token=token,
                                    start=start, end=end)
        first = first or page
        collected.extend(page.lines)
        token = page.next_page_token
        if not token:
            break
    assert first is not None
    if args.json:
        out.print_json(as_json(pb.GetStatementResponse(
            lines=collected, opening_balance_cents=first.opening_balance_cents,
            closing_balance_cents=first.closing_balance_cents, next_page_token=token, name=first.name)))
        return EXIT_OK
    table = Table(title=f"Statement of {label} {first.name}".strip(),
                  caption=(f"opening {format_cents(first.opening_balance_cents)} · closing "
                           f"{format_cents(first.closing_balance_cents)}"
                           + (f" · first {len(collected)} lines (more: --limit or --csv)" if token else "")))
    table.add_column("Date", overflow="fold", min_width=10)  # the date whole, the time below it
    table.add_column("Reference", overflow="fold")
    table.add_column("Type", overflow="fold")
    table.add_column("Description", overflow="fold")
    table.add_column("Counterparty", overflow="fold")
    money_column(table, "Amount")
    money_column(table, "Balance")
    for line in collected:
        cp = line.counterparty
        kind = cp.WhichOneof("account")
        who = cp.name or ("" if kind is None else f"{kind.removesuffix('_id')} {getattr(cp, kind)}")
        amount = format_cents(line.amount_cents)
        table.add_row(show_time(line.time), line.reference, line.type_name, line.description, who,
                      f"[red]{amount}[/]" if line.amount_cents < 0 else amount, format_cents(line.balance_after_cents))
    show(table)
    return EXIT_OK


def cmd_adjust(client: PaymentsClient, args: argparse.Namespace) -> int:
    which, label = account_of(args)
    cents = args.amount
    if cents == 0:
        raise CliError("the amount must not be zero", EXIT_USAGE)
    confirm(f"Adjust {label} by {format_cents(cents)} ({args.description!r})?", args.yes)
    res = client.adjust(cents, args.description, idempotency_key=args.key or new_idempotency_key(), **which)
    if args.json:
        out.print_json(as_json(res))
        return EXIT_OK
    out.print(f"adjusted {label} by {format_cents(cents)}: balance now {format_cents(res.balance_cents)} "
              f"(reference {res.reference})")
    if res.balance_negative:
        err.print(f"[yellow]warning:[/] {label} is now below zero")
    return EXIT_OK


def settlement_table(res: pb.SettleResponse, title: str) -> Table:
    table = Table(title=title, show_footer=True)
    table.add_column("Org", footer="Total", justify="right", no_wrap=True)
    table.add_column("Name", footer=f"{len(res.rows)} orgs", overflow="fold")
    table.add_column("BSB", overflow="fold")
    table.add_column("Account", overflow="fold")
    money_column(table, "Minimum")
    money_column(table, "Gross", footer=format_cents(res.total_gross_cents))
    table.add_column("Fee %", justify="right", no_wrap=True)
    money_column(table, "Fee", footer=format_cents(res.total_fee_cents))
    money_column(table, "GST", footer=format_cents(res.total_gst_cents))
    money_column(table, "Net", footer=format_cents(res.total_net_cents))
    problems = any(r.bank_details_problem for r in res.rows)
    if problems:
        table.add_column("Bank details", overflow="fold")
    for r in res.rows:
        gross = format_cents(r.gross_cents)
        if r.balance_changed:
            gross = f"[yellow]{gross}*[/]"
        cells = [str(r.organisation_id), r.name, r.bsb or "[red]none[/]", r.account_number or "[red]none[/]",
                 format_cents(r.minimum_balance_cents), gross, format_bp(r.fee_bp), format_cents(r.fee_cents),
                 format_cents(r.gst_cents), format_cents(r.net_cents)]
        if problems:
            cells.append(f"[red]{escape(r.bank_details_problem)}[/]" if r.bank_details_problem else "ok")
        table.add_row(*cells)
    return table


BANK_CSV_COLUMNS = ["BSB", "Account Number", "Account Name", "Amount", "Reference", "Organisation ID", "Batch"]


def write_bank_csv(res: pb.SettleResponse, dest: str) -> None:
    """The payments to make: one line per organisation, net amount in dollars. Text cells cannot run
    as spreadsheet formulas (an organisation's name is whatever an administrator typed)."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(BANK_CSV_COLUMNS)
    for r in res.rows:
        bsb, account_number, name, reference, batch = text_cells(r.bsb, r.account_number, r.name, r.reference,
                                                                  res.batch_id)
        writer.writerow([bsb, account_number, name, plain_dollars(r.net_cents), reference, r.organisation_id, batch])
    path = Path(dest)
    tmp = path.with_name(f".{path.name}.part")
    tmp.write_text(buf.getvalue())
    os.replace(tmp, path)


def write_file(dest: str, data: bytes) -> None:
    """`data` to `dest`, appearing whole or not at all."""
    path = Path(dest)
    tmp = path.with_name(f".{path.name}.part")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _settle_for_real(client: PaymentsClient, dry: pb.SettleResponse, key: str) -> pb.SettleResponse:
    """The real run, on the balances the dry run showed. A server that was unreachable is asked again
    by gRPC itself (the channel's retryPolicy) with the same key: it settles once however often the
    request arrives."""
    expected = {r.organisation_id: r.balance_cents for r in dry.rows}
    return client.settle(list(expected), expected_balances=expected, idempotency_key=key,
                         timeout_s=max(client.timeout_s, SETTLE_TIMEOUT_S))


def cmd_settle(client: PaymentsClient, args: argparse.Namespace) -> int:
    if (args.bank_csv or args.aba) and args.dry_run:
        raise CliError("--bank-csv and --aba write the payments of a real settlement; drop --dry-run", EXIT_USAGE)
    with err.status("working out the settlement…"):
        dry = client.settle(args.organisation_ids, dry_run=True, timeout_s=max(client.timeout_s, SETTLE_TIMEOUT_S))
    if dry.skipped_organisation_ids:
        err.print("not eligible (at or below their minimum balance): "
                  + ", ".join(str(i) for i in dry.skipped_organisation_ids))
    if not dry.rows:
        if args.json:
            out.print_json(as_json(dry))
        else:
            out.print("Nothing to settle.")
        return EXIT_OK
    if args.dry_run and args.json:
        out.print_json(as_json(dry))
        return EXIT_OK
    # with --json, stdout carries only JSON: the table to confirm goes to stderr
    show(settlement_table(dry, f"Settlement (dry run) at default fee {format_bp(dry.default_fee_bp)}"),
         err if args.json else out)
    unpayable = [r for r in dry.rows if r.bank_details_problem]
    for r in unpayable:
        err.print(f"[red]cannot be paid:[/] organisation {r.organisation_id} ({escape(r.name)}): "
                  f"{escape(r.bank_details_problem)}")
    if args.dry_run:
        return EXIT_OK
    if unpayable:
        raise CliError(f"{len(unpayable)} organisation(s) have missing or invalid bank details: correct them "
                       "(payments-admin organisations upsert ID --bsb ... --account-number ...) or leave them out; "
                       "nothing was settled")
    if args.aba and not dry.aba_available:
        raise CliError("the server makes no ABA file (its PAYMENTS_ABA_* settings are not set); nothing was settled")
    confirm(f"Settle {len(dry.rows)} organisation(s): {format_cents(dry.total_gross_cents)} gross, "
            f"{format_cents(dry.total_net_cents)} to pay out?", args.yes)
    key = args.key or new_idempotency_key()
    started = time.monotonic()
    with err.status(f"settling {len(dry.rows):,} organisation(s)…"):
        res = _settle_for_real(client, dry, key)
    err.print(f"settled {len(res.rows):,} organisation(s) in {time.monotonic() - started:.1f} s")
    if args.bank_csv and res.rows:
        write_bank_csv(res, args.bank_csv)
    if args.aba and res.rows:
        write_file(args.aba, res.aba_file)
    if args.json:
        out.print_json(as_json(res))
    else:
        show(settlement_table(res, f"Settled: batch {res.batch_id or '(nothing settled)'}"))
        for r in res.rows:
            out.print(f"  {r.organisation_id} {r.name}: {r.reference}")
    changed = [r for r in res.rows if r.balance_changed]
    for r in changed:
        err.print(f"[yellow]note:[/] organisation {r.organisation_id}'s balance changed since the dry run "
                  f"({format_cents(r.expected_balance_cents)} → {format_cents(r.balance_cents)}); settled on the "
                  "balance at booking (marked *)")
    if res.skipped_organisation_ids:
        err.print("[yellow]not settled[/] (no longer above their minimum): "
                  + ", ".join(str(i) for i in res.skipped_organisation_ids))
    if args.bank_csv and res.rows:
        err.print(f"wrote the bank file {args.bank_csv}: {len(res.rows)} payments, {format_cents(res.total_net_cents)}")
    if args.aba and res.rows:
        err.print(f"wrote the ABA file {args.aba}: {len(res.rows)} credits and the balancing debit, "
                  f"{format_cents(res.total_net_cents)}")
    return EXIT_OK


def cmd_summary(client: PaymentsClient, args: argparse.Namespace) -> int:
    s = client.admin_summary()
    if args.json:
        out.print_json(as_json(s))
        return EXIT_OK
    table = Table(title="Cobalt Payments", show_header=False)
    table.add_column(style="bold")
    table.add_column(**MONEY)  # type: ignore[arg-type]
    table.add_row("Members with a balance", f"{s.members_with_balance:,}")
    table.add_row("Members' balances", format_cents(s.member_balances_cents))
    table.add_row("Organisations with a balance", f"{s.organisations_with_balance:,}")
    table.add_row("Organisations' balances", format_cents(s.organisation_balances_cents))
    table.add_row("Net liability", format_cents(s.net_liability_cents))
    table.add_row("Members with auto top-up on", f"{s.members_with_auto_top_up:,}")
    table.add_row("Card money in, last 30 days", format_cents(s.card_money_in_30d_cents))
    table.add_row("Card refunds, last 30 days", format_cents(s.card_refunds_30d_cents))
    for b in s.system_balances:
        table.add_row(f"System account {b.account}", format_cents(b.balance_cents))
    table.add_row("Ledger sum", "[green]$0.00 (balanced)[/]" if s.ledger_sum_cents == 0
                  else f"[red]{format_cents(s.ledger_sum_cents)}[/]")
    show(table)
    return EXIT_OK


_KIND_ARGS = {"all": 0, "members": pb.MEMBER, "organisations": pb.ORGANISATION, "system": pb.SYSTEM}


def cmd_balances(client: PaymentsClient, args: argparse.Namespace) -> int:
    kind = _KIND_ARGS[args.kind]
    rows: list[pb.BalanceRow] = []
    token = ""
    total = count = 0
    with progress() as bar:
        task = bar.add_task("reading balances", total=None)
        while len(rows) < args.limit:
            page = client.list_balances(kind, page_size=min(1000, args.limit - len(rows)), page_token=token,
                                        include_zero=args.include_zero)
            total, count = page.total_cents, page.count
            rows.extend(page.rows)
            bar.update(task, total=min(count, args.limit), completed=len(rows))
            token = page.next_page_token
            if not token:
                break
    if args.json:
        out.print_json(as_json(pb.ListBalancesResponse(rows=rows, next_page_token=token, total_cents=total,
                                                       count=count)))
        return EXIT_OK
    caption = f"{count:,} accounts" + (f", first {len(rows):,} shown (--limit)" if len(rows) < count else "")
    table = Table(title="Balances", caption=caption, show_footer=True)
    table.add_column("Kind", footer="Total", overflow="fold")
    table.add_column("Id", justify="right", no_wrap=True)
    table.add_column("Name", overflow="fold")
    money_column(table, "Balance", footer=format_cents(total))
    for r in rows:
        kind_name = pb.AccountKind.Name(r.kind).lower()
        table.add_row(kind_name, r.system_account or str(r.id), r.name, format_cents(r.balance_cents))
    show(table)
    return EXIT_OK


def organisations_table(orgs: Iterable[pb.Organisation], default_fee_bp: int | None) -> Table:
    table = Table(title="Organisations")
    table.add_column("Id", justify="right", no_wrap=True)
    table.add_column("Name", overflow="fold")
    table.add_column("BSB", overflow="fold")
    table.add_column("Account", overflow="fold")
    money_column(table, "Minimum")
    table.add_column("Fee", justify="right", overflow="fold")
    money_column(table, "Balance")
    for o in orgs:
        if o.HasField("settlement_fee_bp"):
            fee = format_bp(o.settlement_fee_bp)
        else:
            fee = "default" + (f" ({format_bp(default_fee_bp)})" if default_fee_bp is not None else "")
        table.add_row(str(o.organisation_id), o.name, o.bsb, o.account_number, format_cents(o.minimum_balance_cents),
                      fee, format_cents(o.balance_cents))
    return table


def _find_organisation(client: PaymentsClient, org_id: int) -> pb.Organisation | None:
    found = client.list_organisations([org_id]).organisations
    return found[0] if found else None


def cmd_organisations(client: PaymentsClient, args: argparse.Namespace) -> int:
    if args.org_command == "list":
        orgs = list(client.iter_organisations(page_size=1000))
        if args.json:
            out.print_json(as_json(pb.ListOrganisationsResponse(organisations=orgs)))
            return EXIT_OK
        show(organisations_table(orgs, client.get_fee_settings().current.settlement_fee_bp))
        return EXIT_OK
    if args.org_command == "show":
        org = _find_organisation(client, args.organisation_id)
        if org is None:
            raise CliError(f"NOT_FOUND: organisation {args.organisation_id} is not registered")
        if args.json:
            out.print_json(as_json(org))
        else:
            show(organisations_table([org], client.get_fee_settings().current.settlement_fee_bp))
        return EXIT_OK
    # upsert: what is not given keeps its current value
    current = _find_organisation(client, args.organisation_id)
    name = args.name if args.name is not None else (current.name if current else None)
    if not name:
        raise CliError(f"organisation {args.organisation_id} is new: give --name", EXIT_USAGE)
    minimum = args.minimum if args.minimum is not None else (current.minimum_balance_cents if current else 0)
    if args.default_fee:
        fee_bp = None
    elif args.fee_bp is not None:
        fee_bp = args.fee_bp
    else:
        fee_bp = current.settlement_fee_bp if current is not None and current.HasField("settlement_fee_bp") else None
    org = client.upsert_organisation(
        args.organisation_id, name,
        bsb=args.bsb if args.bsb is not None else (current.bsb if current else ""),
        account_number=args.account_number if args.account_number is not None else (
            current.account_number if current else ""),
        minimum_balance_cents=minimum, settlement_fee_bp=fee_bp, idempotency_key=args.key or new_idempotency_key())
    if args.json:
        out.print_json(as_json(org))
    else:
        out.print(f"{'updated' if current else 'registered'} organisation {org.organisation_id}")
        show(organisations_table([org], None))
    return EXIT_OK


def fees_table(items: Iterable[pb.FeeSettings], title: str) -> Table:
    table = Table(title=title)
    table.add_column("Version", justify="right", no_wrap=True)
    table.add_column("Settlement fee", justify="right", no_wrap=True)
    table.add_column("Refund fee", justify="right", no_wrap=True)
    table.add_column("Stripe cost", justify="right", overflow="fold")
    money_column(table, "Low balance")
    table.add_column("From", overflow="fold")
    table.add_column("Set by", overflow="fold")
    for s in items:
        table.add_row(str(s.version), format_bp(s.settlement_fee_bp), format_bp(s.refund_fee_bp),
                      f"{format_cents(s.stripe_cost_per_transaction_cents)} + {format_bp(s.stripe_cost_bp)}",
                      format_cents(s.low_balance_limit_cents), show_time(s.effective_from) or "built in", s.set_by)
    return table


def cmd_fees(client: PaymentsClient, args: argparse.Namespace) -> int:
    if args.fees_command == "show":
        got = client.get_fee_settings()
        if args.json:
            out.print_json(as_json(got))
        else:
            show(fees_table([got.current], "Fee settings now"))
            if len(got.history) > 1:
                show(fees_table(got.history, "History (newest first)"))
        return EXIT_OK
    changes: dict[str, int] = {}
    for name in ("settlement_fee_bp", "refund_fee_bp", "stripe_cost_bp", "stripe_cost_per_transaction_cents"):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    if args.low_balance is not None:
        changes["low_balance_limit_cents"] = args.low_balance
    if not changes:
        raise CliError("give at least one setting to change (see payments-admin fees set --help)", EXIT_USAGE)
    new = client.set_fee_settings(idempotency_key=args.key or new_idempotency_key(), **changes)
    if args.json:
        out.print_json(as_json(new))
    else:
        show(fees_table([new], "New fee settings"))
    return EXIT_OK


def event_line(event: pb.Event) -> str:
    """One event as the other commands show things: dollars, and the time in PAYMENTS_TIMEZONE."""
    fields = {
        "route": event.route_code, "member": event.member_id, "organisation": event.organisation_id,
        "other member": event.other_member_id, "payment": event.payment_id, "ref": event.reference,
        "reason": event.reason, "event": event.event_id, "session": event.session_id,
    }
    parts = [f"{name} {value}" for name, value in fields.items() if value]
    if event.amount_cents:
        parts.append(f"amount {format_cents(event.amount_cents)}")
    if event.balance_cents:
        parts.append(f"balance {format_cents(event.balance_cents)}")
    if event.route_payload:
        parts.append(f"payload {event.route_payload!r}")
    kind = pb.EventKind.Name(event.kind)
    return f"{event.sequence:>10}  {show_time(event.time) or '-':<19}  {kind:<18} " + "  ".join(parts)


def cmd_events(client: PaymentsClient, args: argparse.Namespace) -> int:
    """Follow the event stream (clients/events.py), one line or one JSON object per event. A broken
    stream is resumed after the last event shown, saying so on stderr; a server that cannot be
    reached (at the start, or for EVENTS_GIVE_UP_S) ends it with exit code 4."""

    def reconnecting(exc: grpc.RpcError, delay_s: float, attempt: int) -> None:
        err.print(f"[yellow]the stream broke ({exc.code().name}: {escape(exc.details() or '')}); reconnecting in "
                  f"{delay_s:g} s (attempt {attempt})[/]")

    stream = events.tail(client, route_codes=args.route, kinds=args.kind, after_sequence=args.after,
                         consumer=args.consumer or "", give_up_after_s=EVENTS_GIVE_UP_S,
                         on_reconnect=reconnecting)
    try:
        events.print_events(stream, sys.stdout, as_json=args.json, line=event_line)
    except KeyboardInterrupt:
        pass
    except ValueError as exc:  # an unknown kind
        raise CliError(str(exc), EXIT_USAGE) from None
    return EXIT_OK


# ---------------------------------------------------------------- arguments

def _whole(text: str, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of {what}") from None
    if abs(value) > MAX_ID:
        raise argparse.ArgumentTypeError(f"{text} is out of range")
    return value


def _positive_int(text: str) -> int:
    value = _whole(text, "units")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not positive")
    return value


def _sequence(text: str) -> int:
    value = _whole(text, "events")
    if value < -1:
        raise argparse.ArgumentTypeError("a sequence is -1 (only new events), 0 (from the start) or positive")
    return value


def _bp(text: str) -> int:
    value = _whole(text, "basis points (225 = 2.25%)")
    if not 0 <= value <= 10_000:
        raise argparse.ArgumentTypeError("basis points are between 0 and 10000 (225 = 2.25%)")
    return value


def _cents(text: str) -> int:
    value = _whole(text, "cents")
    if not 0 <= value <= 2**31 - 1:
        raise argparse.ArgumentTypeError(f"{text} is out of range (0 to {2**31 - 1} cents)")
    return value


def _dollars(text: str) -> int:
    """An amount in dollars, as cents; a usage error (exit 2) when it is not one or is out of range."""
    try:
        return parse_dollars(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value <= 86_400:
        raise argparse.ArgumentTypeError("between 0 and 86400 seconds")
    return value


def _account_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--member", type=_positive_int, metavar="ID", help="a member's account")
    g.add_argument("--org", type=_positive_int, metavar="ID", help="an organisation's account")


def _output_options() -> argparse.ArgumentParser:
    """--json, accepted before the command and after it alike."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print the server's answer as JSON instead of tables")
    return parent


def build_parser() -> argparse.ArgumentParser:
    output = _output_options()
    parser = argparse.ArgumentParser(
        prog="payments-admin",
        description="Administer Cobalt Payments: balances, statements, adjustments, settlements, fees.",
        epilog="Token: --token-file, else PAYMENTS_TOKEN, else ~/.config/cobalt-payments/token. Server: "
               "PAYMENTS_TARGET (default 127.0.0.1:50051); TLS: PAYMENTS_TLS_CA_FILE, and for mutual TLS "
               "PAYMENTS_TLS_CLIENT_CERT_FILE and PAYMENTS_TLS_CLIENT_KEY_FILE. Times are in PAYMENTS_TIMEZONE. "
               "Exit codes: 0 ok, 1 refused by the server, 2 usage, 3 token or permission, 4 server unreachable, "
               "5 cancelled.",
    )
    parser.add_argument("--target", default=os.environ.get("PAYMENTS_TARGET") or DEFAULT_TARGET,
                        help="host:port of the payments server (env PAYMENTS_TARGET)")
    parser.add_argument("--token-file", metavar="FILE", help="read the bearer token from FILE")
    parser.add_argument("--timeout", type=_seconds, default=30.0, metavar="SECONDS", help="per call (default 30)")
    parser.add_argument("--json", action="store_true", default=False,
                        help="print the server's answer as JSON instead of tables (before or after the command)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_: str, parent: argparse._SubParsersAction = sub) -> argparse.ArgumentParser:
        return parent.add_parser(name, help=help_, description=help_, parents=[output])

    p = command("balance", "an account's balance")
    _account_args(p)
    p.set_defaults(run=cmd_balance)

    p = command("statement", "an account's statement (table, or --csv FILE)")
    _account_args(p)
    p.add_argument("--from", dest="start", metavar="WHEN", help="from this date or time (inclusive)")
    p.add_argument("--to", dest="end", metavar="WHEN", help="up to this date or time (exclusive)")
    p.add_argument("--limit", type=_positive_int, default=50, help="lines in the table (default 50)")
    p.add_argument("--csv", metavar="FILE", help="export the whole range as CSV to FILE ('-' for stdout)")
    p.set_defaults(run=cmd_statement)

    p = command("adjust", "a manual adjustment (asks to confirm)")
    _account_args(p)
    p.add_argument("amount", type=_dollars, metavar="DOLLARS", help="dollars, e.g. 25.00 or -12.50 (not zero)")
    p.add_argument("--description", "-d", required=True, help="why (shown on the statement)")
    p.add_argument("--key", help="idempotency key (to retry safely from a script)")
    p.add_argument("--yes", "-y", action="store_true", help="do not ask")
    p.set_defaults(run=cmd_adjust)

    p = command("settle", "settle organisations: dry run, confirm, settle")
    p.add_argument("organisation_ids", nargs="*", type=_positive_int, metavar="ORG_ID",
                   help="organisations to settle (none: every eligible one)")
    p.add_argument("--dry-run", action="store_true", help="show the table only")
    p.add_argument("--yes", "-y", action="store_true", help="do not ask (for scripts)")
    p.add_argument("--bank-csv", metavar="FILE", help="write the payments to make to FILE")
    p.add_argument("--aba", metavar="FILE", help="write the ABA (Direct Entry) file for the bank to FILE")
    p.add_argument("--key", help="idempotency key of the real run (to retry safely from a script)")
    p.set_defaults(run=cmd_settle)

    p = command("summary", "liabilities, card money, system accounts")
    p.set_defaults(run=cmd_summary)

    p = command("balances", "who holds what")
    p.add_argument("--kind", choices=sorted(_KIND_ARGS), default="all",
                   help="all (members and organisations), members, organisations or system")
    p.add_argument("--include-zero", action="store_true", help="list accounts whose balance is $0.00 too")
    p.add_argument("--limit", type=_positive_int, default=1000, help="rows to show (default 1000)")
    p.set_defaults(run=cmd_balances)

    p = command("organisations", "list, show or register organisations")
    osub = p.add_subparsers(dest="org_command", required=True, metavar="ACTION")
    command("list", "every organisation", osub)
    show = command("show", "one organisation", osub)
    show.add_argument("organisation_id", type=_positive_int, metavar="ORG_ID", help="the organisation's id")
    up = command("upsert", "register or update (what is not given is kept)", osub)
    up.add_argument("organisation_id", type=_positive_int, metavar="ORG_ID", help="the organisation's id")
    up.add_argument("--name", help="its name (required for a new organisation)")
    up.add_argument("--bsb", help="bank BSB, 123-456")
    up.add_argument("--account-number", help="bank account number")
    up.add_argument("--minimum", type=_dollars, metavar="DOLLARS", help="minimum balance after settlement")
    fee = up.add_mutually_exclusive_group()
    fee.add_argument("--fee-bp", type=_bp, help="settlement fee override in basis points (225 = 2.25%%)")
    fee.add_argument("--default-fee", action="store_true", help="remove the override")
    up.add_argument("--key", help="idempotency key (to retry safely from a script)")
    p.set_defaults(run=cmd_organisations)

    p = command("fees", "show or set the fee settings")
    fsub = p.add_subparsers(dest="fees_command", required=True, metavar="ACTION")
    command("show", "current settings and history", fsub)
    fs = command("set", "a new version; what is not given is kept", fsub)
    fs.add_argument("--settlement-bp", dest="settlement_fee_bp", type=_bp, metavar="BP",
                    help="default settlement fee in basis points (200 = 2.00%%)")
    fs.add_argument("--refund-bp", dest="refund_fee_bp", type=_bp, metavar="BP",
                    help="fee on a member's card refund, in basis points")
    fs.add_argument("--stripe-bp", dest="stripe_cost_bp", type=_bp, metavar="BP",
                    help="Stripe's percentage per card payment, in basis points")
    fs.add_argument("--stripe-cents", dest="stripe_cost_per_transaction_cents", type=_cents, metavar="CENTS",
                    help="Stripe's fixed cost per card payment, in cents")
    fs.add_argument("--low-balance", type=_dollars, metavar="DOLLARS",
                    help="balance under which a LOW_BALANCE event is sent")
    fs.add_argument("--key", help="idempotency key (to retry safely from a script)")
    p.set_defaults(run=cmd_fees)

    p = command("events", "the event stream")
    esub = p.add_subparsers(dest="events_command", required=True, metavar="ACTION")
    tail = command("tail", "follow events (Ctrl-C stops); amounts in dollars, times in PAYMENTS_TIMEZONE", esub)
    tail.add_argument("--route", action="append", default=[], metavar="CODE",
                      help="only events with this route code (repeatable)")
    tail.add_argument("--kind", action="append", default=[], choices=[k.lower() for k in pb.EventKind.keys()[1:]],
                      metavar="KIND", help="only events of this kind (repeatable): "
                      + ", ".join(k.lower() for k in pb.EventKind.keys()[1:]))
    tail.add_argument("--after", type=_sequence, default=0, metavar="SEQUENCE",
                      help="after this sequence (0: oldest kept, or the consumer's last ack; -1: only new events)")
    tail.add_argument("--consumer", help="durable consumer name (resumes after its last acknowledged event)")
    p.set_defaults(run=cmd_events)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        token = load_token(args.token_file)
        try:
            client = PaymentsClient(args.target, token, timeout_s=args.timeout)
        except ValueError as exc:  # TLS files, or plain text off this machine
            raise CliError(str(exc), EXIT_USAGE) from None
        with client:
            try:
                return args.run(client, args)
            except grpc.RpcError as exc:
                raise rpc_failure(exc, args.target) from None
    except CliError as exc:
        text = escape(exc.message)
        err.print(f"[red]error:[/] {text}" if exc.exit_code != EXIT_CANCELLED else text)
        return exc.exit_code
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
