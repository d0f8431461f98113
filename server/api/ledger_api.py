"""Servicer methods for the balance path: Pay, balances, statements, transfers, adjustments and
registration. Each translates proto → command → service → proto; no business rule lives here."""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg2

from cobalt.payments.v1 import payments_pb2 as pb
from server import metrics
from server.api import convert, responses
from server.api.base import ApiBase, M
from server.domain.errors import DomainError, InsufficientFunds
from server.ledger import green, idempotency
from server.ledger.balance_reads import BalanceReader
from server.services import accounts, adjust, auto_top_up, card_pay, pay, statements, transfer
from server.services.group_commit import GroupCommit
from server.stripe_gateway import stripe_key

log = logging.getLogger("payments.ledger")


class LedgerApi(ApiBase):
    def __init__(self, settings, db, executor):  # noqa: ANN001
        super().__init__(settings, db, executor)
        # a group's unit of work runs on the event loop (server.ledger.green), not in a database thread
        green.install()
        self.pay_group = GroupCommit(db, green.on_loop, "Pay", on_group=metrics.observe_group_size)
        self.transfer_group = GroupCommit(db, green.on_loop, "Transfer", on_group=metrics.observe_group_size)
        self.balance_reader = BalanceReader(db)

    def close(self) -> None:
        self.balance_reader.close()
        super().close()

    # ---------------------------------------------------------------- Pay
    def pay_command(self, request: pb.PayRequest) -> pay.PayCommand:
        payee = request.WhichOneof("payee")
        return pay.PayCommand(
            principal=self.principal().name,
            member_id=request.member_id,
            amount_cents=request.amount_cents,
            organisation_id=request.organisation_id if payee == "organisation_id" else None,
            other_member_id=request.other_member_id if payee == "other_member_id" else None,
            description=request.description,
            payment_type=convert.posting_type(request.payment_type),
            route_code=request.route_code,
            route_payload=request.route_payload,
            event_id=convert.zero_to_none(request.event_id),
            session_id=convert.zero_to_none(request.session_id),
            ensure_funds_only=request.ensure_funds_only,
        ).validated()

    async def Pay(self, request: pb.PayRequest, context) -> pb.PayResponse:  # noqa: ANN001, N802
        cmd = self.pay_command(request)
        outcome = await self.pay_group.submit(pay.PayRequest(cmd, self.pending("Pay", request)))
        return await self.answer_booking(context, outcome, responses.pay_pb, cmd.member_id,
                                         lambda short: self.pay_when_short(context, request, cmd, short))

    async def answer_booking(self, context, outcome: Any, to_pb: Callable[[Any], M],  # noqa: ANN001
                             payer_member_id: int | None,
                             when_short: Callable[[InsufficientFunds], Awaitable[M]]) -> M:
        """Pay and Transfer: answer a group-commit outcome. When the balance is short hand over to
        `when_short`; after a booking that left the payer below the low limit with auto top-up ON,
        top up (after the commit: Stripe is never called inside a transaction)."""
        if isinstance(outcome, InsufficientFunds):
            return await when_short(outcome)
        if isinstance(outcome, DomainError):
            raise outcome
        if isinstance(outcome, idempotency.Replayed):
            self.replayed(context)
            return to_pb(outcome.result)
        if outcome.needs_auto_top_up and payer_member_id:
            await self.after_payment_top_up(payer_member_id)
        return to_pb(outcome)

    async def pay_when_short(self, context, request: pb.PayRequest, cmd: pay.PayCommand,  # noqa: ANN001
                             short: InsufficientFunds) -> pb.PayResponse:
        """The balance does not cover the payment: auto top-up, or a card payment for the shortfall,
        when Stripe is configured (services.card_pay)."""
        if not self.gateway.configured:
            raise short
        once = self.once("Pay", request)
        result = await self.in_context(lambda: card_pay.pay_when_short(self.db, self.gateway, once, cmd, short))
        if isinstance(result, card_pay.PayOutcome) and result.needs_auto_top_up:
            await self.after_payment_top_up(cmd.member_id)
        return self.answer(context, result, responses.pay_pb)

    async def after_payment_top_up(self, member_id: int) -> None:
        """A payment left a member with auto top-up ON below the low limit. The payment is booked and
        answered; a failed top-up here must not fail it."""
        if not self.gateway.configured:
            return
        principal = self.principal().name
        ref = stripe_key("low-balance", member_id, secrets.token_hex(10))  # a fresh top-up each time
        try:
            await self.in_context(lambda: auto_top_up.top_up_if_low(self.db, self.gateway, member_id, principal, ref))
        except DomainError as exc:
            log.warning("auto top-up after a payment of member %s did not happen: %s", member_id, exc.message)

    # ---------------------------------------------------------------- balances and statements
    async def GetBalance(self, request: pb.GetBalanceRequest, context) -> pb.GetBalanceResponse:  # noqa: ANN001, N802
        acct = convert.account_id_of(request.account)
        bal = await self.balance_of(acct)
        return pb.GetBalanceResponse(
            account=request.account,
            balance_cents=bal.balance_cents,
            auto_top_up_status=int(bal.auto_top_up_status),
            auto_top_up_amount_cents=bal.auto_top_up_amount_cents,
            last_movement_at=convert.timestamp(bal.last_movement_at),
            name=bal.name,
        )

    async def balance_of(self, acct: int) -> accounts.Balance:
        """Read with the other balances asked for meanwhile, on the event loop; in a database thread
        when that read fails (its connection broke, say)."""
        try:
            return await self.balance_reader.balance(acct)
        except psycopg2.Error:
            pass
        return await self.read(lambda conn: accounts.get_balance(conn, acct))

    async def GetStatement(self, request: pb.GetStatementRequest, context) -> pb.GetStatementResponse:  # noqa: ANN001, N802
        acct = convert.account_id_of(request.account)
        start, end = convert.optional_time(request, "from"), convert.optional_time(request, "to")
        page = await self.read(
            lambda conn: statements.get_statement(conn, acct, start, end, request.page_size, request.page_token)
        )
        return pb.GetStatementResponse(
            lines=[
                pb.StatementLine(
                    reference=line.reference,
                    time=convert.timestamp(line.time),
                    type=convert.payment_type_pb(line.type),
                    type_name=line.type.display_name,
                    description=line.description,
                    amount_cents=line.amount_cents,
                    balance_after_cents=line.balance_after_cents,
                    counterparty=convert.counterparty(line.counterparty_account_id, line.counterparty_name),
                    payment_id=line.payment_id,
                    event_id=line.event_id,
                    session_id=line.session_id,
                )
                for line in page.lines
            ],
            opening_balance_cents=page.opening_balance_cents,
            closing_balance_cents=page.closing_balance_cents,
            next_page_token=page.next_page_token,
            name=page.name,
        )

    async def ExportStatement(self, request: pb.ExportStatementRequest, context):  # noqa: ANN001, N802
        acct = convert.account_id_of(request.account)
        start, end = convert.optional_time(request, "from"), convert.optional_time(request, "to")
        tz = self.settings.timezone
        # One read transaction, so the export is one consistent snapshot; chunks are pulled
        # from the pool thread one at a time.
        conn = await self.in_thread(self.db.snapshot_connection)
        chunks = None
        # a cancelled call may leave a pull running in its thread: the close waits for it, then
        # ends the export's cursor and transaction before the connection goes back
        in_use = threading.Lock()

        def pull() -> bytes | None:
            with in_use:
                return next(chunks, None)

        def finish() -> None:
            with in_use:
                try:
                    if chunks is not None:
                        chunks.close()
                finally:
                    conn.close()

        try:
            chunks = statements.export_csv(conn, acct, start, end, tz)
            while True:
                chunk = await self.in_thread(pull)
                if chunk is None:
                    return
                yield pb.CsvChunk(data=chunk)
        finally:
            await self.in_thread(finish)

    # ---------------------------------------------------------------- transfers and adjustments
    def transfer_command(self, request: pb.TransferRequest) -> transfer.TransferCommand:
        ref = getattr(request, "from")  # `from` is a Python keyword
        which = ref.WhichOneof("account") if request.HasField("from") else None
        return transfer.TransferCommand(
            principal=self.principal().name,
            is_admin=self.principal().is_admin,
            to_member_id=request.to_member_id,
            amount_cents=request.amount_cents,
            description=request.description,
            from_member_id=ref.member_id if which == "member_id" else None,
            from_organisation_id=ref.organisation_id if which == "organisation_id" else None,
        ).validated()

    async def Transfer(self, request: pb.TransferRequest, context) -> pb.TransferResponse:  # noqa: ANN001, N802
        cmd = self.transfer_command(request)
        outcome = await self.transfer_group.submit(transfer.TransferRequest(cmd, self.pending("Transfer", request)))
        return await self.answer_booking(context, outcome, responses.transfer_pb, cmd.from_member_id,
                                         lambda short: self.transfer_when_short(context, request, cmd, short))

    async def transfer_when_short(self, context, request: pb.TransferRequest,  # noqa: ANN001
                                  cmd: transfer.TransferCommand, short: InsufficientFunds) -> pb.TransferResponse:
        if not self.gateway.configured:
            raise short
        once = self.once("Transfer", request)
        result = await self.in_context(lambda: card_pay.transfer_when_short(self.db, self.gateway, once, cmd, short))
        return self.answer(context, result, responses.transfer_pb)

    async def Adjust(self, request: pb.AdjustRequest, context) -> pb.AdjustResponse:  # noqa: ANN001, N802
        cmd = adjust.AdjustCommand(
            principal=self.principal().name,
            account_id=convert.account_id_of(request.account),
            amount_cents=request.amount_cents,
            description=request.description,
        ).validated()

        return await self.mutate(context, "Adjust", request, lambda conn: adjust.adjust(conn, cmd),
                                 lambda result: pb.AdjustResponse(
                                     adjustment_id=result.adjustment_id,
                                     balance_cents=result.balance_cents,
                                     balance_negative=result.balance_negative,
                                     reference=result.reference,
                                 ))

    # ---------------------------------------------------------------- registration
    async def UpsertMember(self, request: pb.UpsertMemberRequest, context) -> pb.Member:  # noqa: ANN001, N802
        return await self.mutate(context, "UpsertMember", request,
                                 lambda conn: accounts.upsert_member(conn, request.member_id, request.name),
                                 lambda m: pb.Member(member_id=m.member_id, name=m.name, balance_cents=m.balance_cents))

    async def UpsertOrganisation(self, request: pb.UpsertOrganisationRequest, context) -> pb.Organisation:  # noqa: ANN001, N802
        fee_bp = request.settlement_fee_bp if request.HasField("settlement_fee_bp") else None
        return await self.mutate(context, "UpsertOrganisation", request,
                                 lambda conn: accounts.upsert_organisation(
                                     conn, request.organisation_id, request.name, request.bsb,
                                     request.account_number, request.minimum_balance_cents, fee_bp),
                                 convert.organisation_pb)
