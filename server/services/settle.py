"""Settlement (SPEC §4 Settle): pay clubs' balances above their minimum out to their bank accounts,
less the federation's fee.

For each organisation whose balance exceeds its minimum balance after settlement:
gross = balance − minimum; fee = gross × fee_bp half-up (its override, else the default settlement
fee); GST inside the fee = fee / 11 half-up; net = gross − fee. Postings: organisation −gross,
`federation` +fee, `bank` +net — one ledger transaction per organisation, all of a batch in one
database transaction.

A dry run reads and books nothing. A real run first locks the organisations' accounts (in id order,
the ledger's lock order) and computes every row from the balances read under that lock, so a payment
arriving concurrently is either settled in this batch or left on the balance — never lost, never
settled twice. When the caller passes the balances its dry run showed, a row whose balance differs
at booking is settled on the balance now and marked `balance_changed`.

Clubs are paid by the bank from a file: a club whose bank details cannot go into one (no BSB, a BSB
not ddd-ddd, an account number not 1-9 digits) is refused by name before anything is booked, and a
dry run marks it (`bank_details_problem`). Where the federation's Direct Entry details are set, a
real run also answers the ABA file paying every club (server.domain.aba).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from zoneinfo import ZoneInfo

from sqlalchemy import BigInteger, Connection, any_, bindparam, select
from sqlalchemy.dialects import postgresql

from server.domain import aba
from server.domain.errors import DomainError, FailedPrecondition, InvalidArgument, NotFound
from server.domain.money import settlement_for
from server.domain.types import AccountKind, EventKind, PostingType, SystemAccount, organisation_account, system_account
from server.events.outbox import NewEvent, emit
from server.ledger.ledger import Booked, Leg, NewTransaction, post
from server.ledger.schema import accounts, organisations, settlements
from server.services.fees import FeeSettings, current_fee_settings

MAX_ORGANISATIONS_PER_REQUEST = 10_000
MAX_NAMED_IN_A_REFUSAL = 20

# types.account_id(ORGANISATION, organisation_id) as SQL, so the join uses the accounts primary key
_FEDERATION, _BANK = system_account(SystemAccount.FEDERATION), system_account(SystemAccount.BANK)
_ORGANISATION_ACCOUNT_ID = organisations.c.organisation_id * 4 + int(AccountKind.ORGANISATION)
assert organisation_account(7) == 7 * 4 + int(AccountKind.ORGANISATION)


@dataclass(frozen=True)
class SettleCommand:
    principal: str
    organisation_ids: tuple[int, ...]  # empty: every eligible organisation
    dry_run: bool
    expected_balances: dict[int, int] = field(default_factory=dict)  # organisation id -> dry-run balance

    def validated(self) -> SettleCommand:
        if len(self.organisation_ids) > MAX_ORGANISATIONS_PER_REQUEST:
            raise InvalidArgument.field("organisation_ids", f"at most {MAX_ORGANISATIONS_PER_REQUEST} per request")
        if any(org_id <= 0 for org_id in self.organisation_ids):
            raise InvalidArgument.field("organisation_ids", "must be positive ids")
        if len(self.expected_balances) > MAX_ORGANISATIONS_PER_REQUEST:
            raise InvalidArgument.field("expected_balances", f"at most {MAX_ORGANISATIONS_PER_REQUEST} entries")
        if any(org_id <= 0 for org_id in self.expected_balances):
            raise InvalidArgument.field("expected_balances", "organisation ids must be positive")
        if self.dry_run and self.expected_balances:
            raise InvalidArgument.field("expected_balances", "only a real run compares with a dry run")
        # keep the caller's order out of it: rows come in organisation id order
        return SettleCommand(self.principal, tuple(sorted(set(self.organisation_ids))), self.dry_run,
                             dict(self.expected_balances))


@dataclass(frozen=True)
class SettlementRow:
    organisation_id: int
    name: str
    bsb: str
    account_number: str
    balance_cents: int
    minimum_balance_cents: int
    gross_cents: int
    fee_bp: int
    fee_cents: int
    gst_cents: int
    net_cents: int
    reference: str = ""
    balance_changed: bool = False
    expected_balance_cents: int = 0
    bank_details_problem: str = ""  # why the bank cannot pay this club ("" when it can)


@dataclass
class SettleResult:
    batch_id: str
    dry_run: bool
    rows: list[SettlementRow]
    skipped_organisation_ids: list[int]
    fee_settings: FeeSettings
    aba_file: bytes = b""  # a real run's bank file, where the federation's Direct Entry details are set

    @property
    def total_gross_cents(self) -> int:
        return sum(r.gross_cents for r in self.rows)

    @property
    def total_fee_cents(self) -> int:
        return sum(r.fee_cents for r in self.rows)

    @property
    def total_gst_cents(self) -> int:
        return sum(r.gst_cents for r in self.rows)

    @property
    def total_net_cents(self) -> int:
        return sum(r.net_cents for r in self.rows)


def new_batch_id() -> str:
    return "stl_" + secrets.token_hex(10)


def _candidates(conn: Connection, organisation_ids: Sequence[int], lock: bool):  # noqa: ANN202
    """Registered organisations with their balances, in id order; locked for a real run."""
    query = (
        select(
            organisations.c.organisation_id,
            organisations.c.name,
            organisations.c.bsb,
            organisations.c.account_number,
            organisations.c.minimum_balance_cents,
            organisations.c.settlement_fee_bp,
            accounts.c.balance_cents,
        )
        .join(accounts, accounts.c.id == _ORGANISATION_ACCOUNT_ID)
        .order_by(accounts.c.id)
    )
    if organisation_ids:
        # one array value, not one bound value per organisation (10,000 of them took 50 ms to render)
        query = query.where(organisations.c.organisation_id == any_(
            bindparam("organisation_ids", list(organisation_ids), type_=postgresql.ARRAY(BigInteger))))
    else:
        query = query.where(accounts.c.balance_cents > organisations.c.minimum_balance_cents)
    if lock:
        # row locks on the accounts, taken in id order (the ledger's order for organisations);
        # the balances read are the latest committed ones
        query = query.with_for_update(of=accounts)
    return list(conn.execute(query))


def settle(conn: Connection, cmd: SettleCommand, originator: aba.Originator | None = None,
           tz_name: str = "Australia/Sydney") -> SettleResult:
    """The settlement table, and for a real run the bookings (and, given `originator`, the ABA
    file dated in `tz_name`), all in the caller's transaction."""
    fees = current_fee_settings(conn)
    found = _candidates(conn, cmd.organisation_ids, lock=not cmd.dry_run)
    missing = sorted(set(cmd.organisation_ids) - {r.organisation_id for r in found})
    if missing:
        shown = ", ".join(str(m) for m in missing[:10])
        raise NotFound(f"organisation{'s' if len(missing) > 1 else ''} {shown} "
                       f"{'are' if len(missing) > 1 else 'is'} not registered")
    batch_id = "" if cmd.dry_run else new_batch_id()
    rows: list[SettlementRow] = []
    skipped: list[int] = []
    for org in found:
        fee_bp = org.settlement_fee_bp if org.settlement_fee_bp is not None else fees.settlement_fee_bp
        due = settlement_for(org.balance_cents, org.minimum_balance_cents, fee_bp)
        if due is None:
            skipped.append(org.organisation_id)
            continue
        expected = cmd.expected_balances.get(org.organisation_id)
        row = SettlementRow(
            organisation_id=org.organisation_id,
            name=org.name,
            bsb=org.bsb,
            account_number=org.account_number,
            balance_cents=org.balance_cents,
            minimum_balance_cents=org.minimum_balance_cents,
            gross_cents=due.gross_cents,
            fee_bp=due.fee_bp,
            fee_cents=due.fee_cents,
            gst_cents=due.gst_cents,
            net_cents=due.net_cents,
            balance_changed=expected is not None and expected != org.balance_cents,
            expected_balance_cents=expected or 0,
            bank_details_problem=aba.bank_details_problem(org.bsb, org.account_number),
        )
        rows.append(row)
    if cmd.dry_run:
        return SettleResult(batch_id, True, rows, skipped, fees)
    if not rows:
        return SettleResult("", False, rows, skipped, fees)  # nothing was settled: no batch
    _refuse_unpayable(rows, originator is not None)
    # every organisation's transaction through the one write path at once (set-based)
    booked_all = post(conn, [_transaction(cmd.principal, batch_id, row) for row in rows])
    for outcome in booked_all:
        if isinstance(outcome, DomainError):  # under the locks taken above, nothing can refuse a row
            raise outcome
    done = list(zip(rows, booked_all, strict=True))
    for row, booked in done:
        assert booked.balances_after[organisation_account(row.organisation_id)] == row.minimum_balance_cents, \
            "a settlement leaves the minimum balance"
    # the batch's records and events, written once for the whole batch
    _insert_settlements(conn, [_settlement_record(batch_id, fees, row, booked) for row, booked in done])
    emit(conn, *(_settlement_event(batch_id, row, booked) for row, booked in done))
    rows = [_with_reference(row, booked.reference) for row, booked in done]
    aba_file = b""
    if originator is not None:
        process_date = done[0][1].created_at.astimezone(ZoneInfo(tz_name)).date()
        aba_file = aba.settlement_file(originator, [_payment(row) for row in rows], process_date,
                                       debit_reference(batch_id))
    return SettleResult(batch_id, False, rows, skipped, fees, aba_file)


def _with_reference(row: SettlementRow, reference: str) -> SettlementRow:
    """The row with its booking's reference (dataclasses.replace, at a quarter of its cost)."""
    return SettlementRow(**{**vars(row), "reference": reference})


def _refuse_unpayable(rows: list[SettlementRow], with_bank_file: bool) -> None:
    """Refuse the whole batch, naming each club the bank could not pay, before anything is booked."""
    problems = [f"organisation {row.organisation_id} ({row.name}): {row.bank_details_problem}"
                for row in rows if row.bank_details_problem]
    if with_bank_file:
        problems += [f"organisation {row.organisation_id} ({row.name}): net {row.net_cents} cents is more than an "
                     "ABA file's amount can hold" for row in rows if row.net_cents > aba.MAX_AMOUNT_CENTS]
    if problems:
        shown = "; ".join(problems[:MAX_NAMED_IN_A_REFUSAL])
        more = f"; and {len(problems) - MAX_NAMED_IN_A_REFUSAL} more" if len(problems) > MAX_NAMED_IN_A_REFUSAL else ""
        raise FailedPrecondition(f"nothing settled: the bank cannot pay {shown}{more}. Correct the bank details "
                                 "(UpsertOrganisation) or leave these organisations out of the settlement")
    if with_bank_file:
        total_problem = aba.check_totals(sum(row.net_cents for row in rows), 0)
        if total_problem:
            raise FailedPrecondition(f"nothing settled: {total_problem}")


def debit_reference(batch_id: str) -> str:
    """The lodgement reference of the federation's balancing debit: the batch, in 18 characters."""
    return f"STL {batch_id.removeprefix('stl_')[:14].upper()}"


def _payment(row: SettlementRow) -> aba.Payment:
    return aba.Payment(bsb=row.bsb, account_number=row.account_number, account_name=row.name,
                       amount_cents=row.net_cents, lodgement_reference=row.reference)


def _transaction(principal: str, batch_id: str, row: SettlementRow) -> NewTransaction:
    """One organisation's settlement: organisation −gross, `federation` +fee, `bank` +net."""
    org_acct = organisation_account(row.organisation_id)
    federation, bank = _FEDERATION, _BANK
    legs = [Leg(org_acct, -row.gross_cents, bank, must_stay_non_negative=True)]
    if row.fee_cents:
        legs.append(Leg(federation, row.fee_cents, org_acct))
    if row.net_cents:
        legs.append(Leg(bank, row.net_cents, org_acct))
    return NewTransaction(
        type=PostingType.SETTLEMENT,
        description=_description(row),
        principal=principal,
        legs=legs,
        payment_id=batch_id,
        batch_id=batch_id,
    )


_SETTLEMENT_COLUMNS = ("batch_id", "organisation_id", "transaction_id", "balance_cents", "minimum_balance_cents",
                       "gross_cents", "fee_bp", "fee_cents", "gst_cents", "net_cents", "fee_settings_version", "bsb",
                       "account_number", "created_at")
# one statement for the whole batch, its rows as one JSON literal of arrays in column order (10,000
# clubs are one round trip; without the keys, half the text for PostgreSQL to parse)
_INSERT_SETTLEMENTS = (
    f"INSERT INTO settlements ({', '.join(_SETTLEMENT_COLUMNS)}) SELECT "
    + ", ".join(f"(s.r->>{i})::{settlements.c[c].type.compile(dialect=postgresql.dialect()).split('(')[0]}"
                for i, c in enumerate(_SETTLEMENT_COLUMNS))
    + " FROM jsonb_array_elements(%(rows)s::jsonb) AS s(r)"
)


def _insert_settlements(conn: Connection, rows: list[tuple]) -> None:
    conn.exec_driver_sql(_INSERT_SETTLEMENTS, {"rows": json.dumps(rows, default=str)})


def _settlement_record(batch_id: str, fees: FeeSettings, row: SettlementRow, booked: Booked) -> tuple:
    """A settlements row, its values in _SETTLEMENT_COLUMNS order."""
    return (
        batch_id,
        row.organisation_id,
        booked.transaction_id,
        row.balance_cents,
        row.minimum_balance_cents,
        row.gross_cents,
        row.fee_bp,
        row.fee_cents,
        row.gst_cents,
        row.net_cents,
        fees.version or None,  # fee_settings_version; NULL: the built-in defaults applied
        row.bsb,
        row.account_number,
        booked.created_at,
    )


def _settlement_event(batch_id: str, row: SettlementRow, booked: Booked) -> NewEvent:
    return NewEvent(
        EventKind.SETTLEMENT_MADE,
        organisation_id=row.organisation_id,
        amount_cents=row.gross_cents,
        balance_cents=row.minimum_balance_cents,
        payment_id=batch_id,
        reference=booked.reference,
        reason=f"net {row.net_cents} fee {row.fee_cents} gst {row.gst_cents} cents",
    )


def _description(row: SettlementRow) -> str:
    dest = f"BSB {row.bsb} acct {row.account_number}" if row.bsb and row.account_number else "no bank details"
    text = f"Settlement to {dest}, fee {row.fee_bp // 100}.{row.fee_bp % 100:02d}%"
    return text[:80]
