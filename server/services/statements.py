"""Statements: newest first, keyset pagination, opening and closing balance, CSV export."""

from __future__ import annotations

import base64
import csv
import functools
import io
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, bindparam, select, text, tuple_
from sqlalchemy.orm import aliased

from server.domain.csv_cells import FORMULA_LEADS
from server.domain.errors import InvalidArgument
from server.domain.types import DISPLAY_NAMES, AccountKind, PostingType, SystemAccount
from server.ledger.db import as_utc
from server.ledger.schema import accounts, postings
from server.services.accounts import require_account

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
EXPORT_CHUNK_BYTES = 64 * 1024  # what one CsvChunk carries, about
EXPORT_FETCH_ROWS = 2000  # rows the server-side cursor hands over at a time


@dataclass(frozen=True)
class Line:
    posting_id: int
    reference: str
    time: datetime
    type: PostingType
    description: str
    amount_cents: int
    balance_after_cents: int
    counterparty_account_id: int | None
    counterparty_name: str
    payment_id: str
    event_id: int
    session_id: int


@dataclass(frozen=True)
class StatementPage:
    lines: list[Line]
    opening_balance_cents: int
    closing_balance_cents: int
    next_page_token: str
    name: str


def _encode_token(time: datetime, posting_id: int) -> str:
    return base64.urlsafe_b64encode(f"{time.isoformat()}|{posting_id}".encode()).decode()


def _decode_token(token: str) -> tuple[datetime, int]:
    try:
        text = base64.urlsafe_b64decode(token.encode()).decode()
        iso, posting_id = text.split("|")
        return as_utc(datetime.fromisoformat(iso)), int(posting_id)  # type: ignore[return-value]
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidArgument.field("page_token", "is not a token this service gave out") from exc


def _balance_query(with_when: bool):  # noqa: ANN202 - a select
    query = select(postings.c.balance_after_cents).where(postings.c.account_id == bindparam("acct_id"))
    if with_when:
        query = query.where(postings.c.created_at < bindparam("when", type_=postings.c.created_at.type))
    return query.order_by(postings.c.created_at.desc(), postings.c.id.desc()).limit(1)


# built once (SQLAlchemy then finds each compiled form in its cache): building them took a tenth
# of a statement page's CPU
_BALANCE_LATEST, _BALANCE_BEFORE = _balance_query(False), _balance_query(True)


def _balance_before(conn: Connection, acct_id: int, when: datetime | None) -> int:
    """The balance after the last posting strictly before `when` (or the latest, when None)."""
    if when is None:
        return conn.execute(_BALANCE_LATEST, {"acct_id": acct_id}).scalar() or 0
    return conn.execute(_BALANCE_BEFORE, {"acct_id": acct_id, "when": when}).scalar() or 0


def balance_at(conn: Connection, acct_id: int, when: datetime | None) -> int:
    """The balance at `when` (the latest, when None): after the last posting strictly before it."""
    return _balance_before(conn, acct_id, when)


@functools.cache
def _lines_query(with_start: bool, with_end: bool, with_after: bool):  # noqa: ANN202 - a select
    other = aliased(accounts)
    created_at = postings.c.created_at
    query = (
        select(postings, other.c.name.label("counterparty_name"))
        .outerjoin(other, other.c.id == postings.c.counterparty_account_id)
        .where(postings.c.account_id == bindparam("acct_id"))
    )
    if with_start:
        query = query.where(created_at >= bindparam("start", type_=created_at.type))
    if with_end:
        query = query.where(created_at < bindparam("end", type_=created_at.type))
    if with_after:
        # a row comparison, so the index (account_id, created_at, id) seeks straight to the page
        # however deep it is (an OR of the two cases makes PostgreSQL filter every newer line)
        query = query.where(
            tuple_(created_at, postings.c.id)
            < tuple_(bindparam("after_time", type_=created_at.type), bindparam("after_id", type_=postings.c.id.type))
        )
    return query.order_by(created_at.desc(), postings.c.id.desc()).limit(bindparam("limit"))


def _lines(conn: Connection, acct_id: int, start: datetime | None, end: datetime | None,
           after: tuple[datetime, int] | None, limit: int) -> list[Line]:
    query = _lines_query(start is not None, end is not None, after is not None)
    params = {"acct_id": acct_id, "start": start, "end": end, "limit": limit}
    if after is not None:
        params["after_time"], params["after_id"] = after
    return [
        Line(
            posting_id=r.id,
            reference=r.reference,
            time=as_utc(r.created_at),  # type: ignore[arg-type]
            type=PostingType(r.type),
            description=r.description,
            amount_cents=r.amount_cents,
            balance_after_cents=r.balance_after_cents,
            counterparty_account_id=r.counterparty_account_id,
            counterparty_name=r.counterparty_name or "",
            payment_id=r.payment_id or "",
            event_id=r.event_id or 0,
            session_id=r.session_id or 0,
        )
        for r in conn.execute(query, params)
    ]


_ACCOUNT = select(accounts.c.name, accounts.c.balance_cents).where(accounts.c.id == bindparam("acct_id"))


def _check_range(start: datetime | None, end: datetime | None) -> None:
    if start is not None and end is not None and end <= start:
        raise InvalidArgument.field("to", "must be after from")


def get_statement(conn: Connection, acct_id: int, start: datetime | None, end: datetime | None,
                  page_size: int, page_token: str) -> StatementPage:
    if page_size < 0 or page_size > MAX_PAGE_SIZE:
        raise InvalidArgument.field("page_size", f"must be between 1 and {MAX_PAGE_SIZE}")
    _check_range(start, end)
    page_size = page_size or DEFAULT_PAGE_SIZE
    after = _decode_token(page_token) if page_token else None
    account = conn.execute(_ACCOUNT, {"acct_id": acct_id}).first()
    if account is None:
        require_account(conn, acct_id)  # an organisation must be registered; a member exists from first use
    lines = _lines(conn, acct_id, start, end, after, page_size + 1)
    next_token = ""
    if len(lines) > page_size:
        lines = lines[:page_size]
        next_token = _encode_token(lines[-1].time, lines[-1].posting_id)
    opening = _balance_before(conn, acct_id, start) if start is not None else 0
    if end is not None:
        closing = _balance_before(conn, acct_id, end)
    else:  # the balance now: the account's own, which its latest posting's balance after always equals
        closing = account.balance_cents if account is not None else 0
    return StatementPage(lines, opening, closing, next_token, account.name or "" if account is not None else "")


CSV_COLUMNS = ["Date", "Counterparty", "Reference", "Type", "Description", "Amount", "Balance"]


def export_csv(conn: Connection, acct_id: int, start: datetime | None, end: datetime | None,
               tz_name: str) -> Iterator[bytes]:
    """The whole statement as CSV, newest first, in chunks of about EXPORT_CHUNK_BYTES; dates in
    the configured time zone. One server-side cursor reads it (one snapshot, memory bounded by
    one fetch) and the database formats each line."""
    _check_range(start, end)
    # the first statement of the connection's transaction: the export is one snapshot
    conn.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
    require_account(conn, acct_id)
    return _export_csv_pg(conn, acct_id, start, end, tz_name)


def _sql_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _sql_cell(expr: str) -> str:
    """A text cell as a CSV field, always quoted; a cell a spreadsheet would run as a formula gets
    a leading apostrophe (SPEC §4): domain.csv_cells's rule, in SQL."""
    starts = ", ".join(f"chr({ord(ch)})" for ch in FORMULA_LEADS)
    quote = "chr(34)"
    return (f"{quote} || CASE WHEN left({expr}, 1) IN ({starts}) THEN chr(39) ELSE '' END "
            f"|| replace({expr}, {quote}, {quote} || {quote}) || {quote}")


def _sql_dollars(expr: str) -> str:
    return (f"CASE WHEN {expr} < 0 THEN '-' ELSE '' END || (abs({expr}) / 100)::text || '.' "
            f"|| lpad((abs({expr}) % 100)::text, 2, '0')")


def _export_sql() -> str:
    """One CSV line per posting, built by the database: the columns of CSV_COLUMNS."""
    system_codes = " ".join(f"WHEN {int(acct)} THEN {_sql_literal(acct.code)}" for acct in SystemAccount)
    types = " ".join(f"WHEN {_sql_literal(t.value)} THEN {_sql_literal(name)}" for t, name in DISPLAY_NAMES.items())
    cp, name = "p.counterparty_account_id", "COALESCE(o.name, '')"
    member, system = int(AccountKind.MEMBER), int(AccountKind.SYSTEM)
    counterparty = (  # counterparty_label, in SQL
        f"CASE WHEN {cp} IS NULL THEN '' "
        f"WHEN {cp} % 4 = {system} THEN COALESCE(NULLIF({name}, ''), CASE {cp} / 4 {system_codes} END, '') "
        f"WHEN {name} <> '' THEN {name} || CASE {cp} % 4 WHEN {member} THEN ' (member ' ELSE ' (organisation ' END "
        f"|| ({cp} / 4)::text || ')' "
        f"ELSE CASE {cp} % 4 WHEN {member} THEN 'member ' ELSE 'organisation ' END || ({cp} / 4)::text END"
    )
    line = " || ',' || ".join([
        "to_char(p.created_at AT TIME ZONE :tz, 'YYYY-MM-DD HH24:MI:SS')",
        _sql_cell(counterparty),
        _sql_cell("p.reference"),
        _sql_cell(f"CASE p.type {types} ELSE p.type END"),
        _sql_cell("p.description"),
        _sql_dollars("p.amount_cents"),
        _sql_dollars("p.balance_after_cents"),
    ])
    return (f"SELECT {line} FROM postings p LEFT JOIN accounts o ON o.id = p.counterparty_account_id "
            "WHERE p.account_id = :acct_id AND (CAST(:start AS timestamptz) IS NULL OR p.created_at >= :start) "
            "AND (CAST(:end AS timestamptz) IS NULL OR p.created_at < :end) ORDER BY p.created_at DESC, p.id DESC")


_DECLARE_EXPORT = text("DECLARE statement_export NO SCROLL CURSOR FOR " + _export_sql())
_FETCH_EXPORT = f"FETCH {EXPORT_FETCH_ROWS} FROM statement_export"


def _csv_header() -> str:
    buf = io.StringIO()
    csv.writer(buf).writerow(CSV_COLUMNS)
    return buf.getvalue()


def _export_csv_pg(conn: Connection, acct_id: int, start: datetime | None, end: datetime | None,
                   tz_name: str) -> Iterator[bytes]:
    # a cursor of our own in the connection's transaction: the server holds one fetch at a time
    try:
        conn.execute(_DECLARE_EXPORT, {"acct_id": acct_id, "start": start, "end": end, "tz": tz_name})
        pending = [_csv_header().removesuffix("\r\n")]
        size = len(pending[0])
        while True:
            rows = conn.exec_driver_sql(_FETCH_EXPORT).fetchall()
            pending.extend(line for (line,) in rows)
            size += sum(len(line) + 2 for (line,) in rows)
            if size >= EXPORT_CHUNK_BYTES or (len(rows) < EXPORT_FETCH_ROWS and pending):
                yield ("\r\n".join(pending) + "\r\n").encode()
                pending, size = [], 0
            if len(rows) < EXPORT_FETCH_ROWS:
                return
    finally:
        conn.rollback()
