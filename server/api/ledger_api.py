"""Servicer methods for the balance path: Pay, balances, statements, transfers, adjustments and
registration. Each translates proto → command → service → proto; no business rule lives here."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import psycopg2
from sqlalchemy import Connection

from cobalt.payments.v1 import payments_pb2 as pb
from server.api import convert
from server.api.base import ApiBase, M
from server.domain.errors import InsufficientFunds
from server.ledger import idempotency
from server.ledger.balance_reads import BalanceReader
from server.services import accounts, adjust, pay, statements, transfer


class LedgerApi(ApiBase):
    def __init__(self, settings, db, executor):  # noqa: ANN001
        super().__init__(settings, db, executor)
        self.pay_batcher = pay.new_batcher(db)
        self.balance_reader = BalanceReader(db)
        self.transfer_batcher = transfer.new_batcher(db)

    def close(self) -> None:
        self.pay_batcher.close()
        self.balance_reader.close()
        self.transfer_batcher.close()
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

    @staticmethod
    def pay_response(result: pay.PayResult) -> pb.PayResponse:
        return pb.PayResponse(
            status=pb.SUCCEEDED,
            payment_id=result.payment_id,
            balance_cents=result.balance_cents,
            topped_up_cents=result.topped_up_cents,
            reference=result.reference,
        )

    async def Pay(self, request: pb.PayRequest, context) -> pb.PayResponse:  # noqa: ANN001, N802
        cmd = self.pay_command(request)

        async def in_one_statement(record: idempotency.Pending) -> pb.PayResponse | None:
            payment = pay.member_payment(cmd, record, self.pay_response)
            result = pay.paid_in_one_statement(payment, await self.pay_batcher.book(payment))
            return None if result is None else self.pay_response(result)

        return await self.book_from_balance(
            context, "Pay", request, pb.PayResponse, lambda conn: pay.pay_from_balance(conn, cmd),
            self.pay_response, cmd.member_id, lambda short: self.pay_when_short(context, request, cmd, short),
            first_try=in_one_statement if pay.in_one_statement(cmd) else None)

    async def book_from_balance(self, context, method: str, request, response_type: type[M],  # noqa: ANN001
                                book: Callable[[Connection], Any], to_pb: Callable[[Any], M], payer_member_id: int | None,
                                when_short: Callable[[InsufficientFunds], Awaitable[M]],
                                first_try: Callable[[idempotency.Pending], Awaitable[M | None]] | None = None) -> M:
        """Pay and Transfer: book from the balance once per idempotency key; when the balance is
        short hand over to `when_short`; after a booking that left the payer below the low limit
        with auto top-up ON, top up (after the commit: Stripe is never called inside a transaction)."""
        booked: list[Any] = []

        def work(conn: Connection) -> M:
            result = book(conn)
            booked.append(result)
            return to_pb(result)

        try:
            response, replayed = await self.mutate_once(context, method, request, response_type, work, optimistic=True,
                                                        first_try=first_try)
        except InsufficientFunds as short:
            return await when_short(short)
        # the last booking is the committed one, unless the answer is a replay (then none was)
        if not replayed and booked and booked[-1].needs_auto_top_up and payer_member_id:
            await self.after_payment_top_up(payer_member_id)
        return response

    async def pay_when_short(self, context, request: pb.PayRequest, cmd: pay.PayCommand,  # noqa: ANN001
                             short: InsufficientFunds) -> pb.PayResponse:
        """The balance does not cover the payment. The card paths (auto top-up, or a card
        payment for the shortfall) take over here when Stripe is configured."""
        raise short

    async def after_payment_top_up(self, member_id: int) -> None:
        """A payment left a member with auto top-up ON below the low limit (card paths)."""

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
        """On PostgreSQL read with the other balances asked for meanwhile, on the event loop; in a
        database thread on SQLite, or when that read fails (its connection broke, say)."""
        if self.db.records_with_commit:
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
        conn = await self.in_thread(self.db.read_connection)
        try:
            chunks = statements.export_csv(conn, acct, start, end, tz)
            while True:
                chunk = await self.in_thread(lambda: next(chunks, None))
                if chunk is None:
                    return
                yield pb.CsvChunk(data=chunk)
        finally:
            await self.in_thread(conn.close)

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

    @staticmethod
    def transfer_response(result: transfer.TransferResult) -> pb.TransferResponse:
        return pb.TransferResponse(
            transfer_id=result.transfer_id,
            from_balance_cents=result.from_balance_cents,
            to_balance_cents=result.to_balance_cents,
            topped_up_cents=result.topped_up_cents,
            reference=result.reference,
        )

    async def Transfer(self, request: pb.TransferRequest, context) -> pb.TransferResponse:  # noqa: ANN001, N802
        cmd = self.transfer_command(request)

        async def in_one_statement(record: idempotency.Pending) -> pb.TransferResponse | None:
            t = transfer.member_transfer(cmd, record, self.transfer_response)
            result = transfer.transferred_in_one_statement(t, await self.transfer_batcher.book(t))
            return None if result is None else self.transfer_response(result)

        return await self.book_from_balance(
            context, "Transfer", request, pb.TransferResponse, lambda conn: transfer.transfer(conn, cmd),
            self.transfer_response, cmd.from_member_id,
            lambda short: self.transfer_when_short(context, request, cmd, short),
            first_try=in_one_statement if transfer.in_one_statement(cmd) else None)

    async def transfer_when_short(self, context, request: pb.TransferRequest,  # noqa: ANN001
                                  cmd: transfer.TransferCommand, short: InsufficientFunds) -> pb.TransferResponse:
        raise short

    async def Adjust(self, request: pb.AdjustRequest, context) -> pb.AdjustResponse:  # noqa: ANN001, N802
        cmd = adjust.AdjustCommand(
            principal=self.principal().name,
            account_id=convert.account_id_of(request.account),
            amount_cents=request.amount_cents,
            description=request.description,
        ).validated()

        def work(conn):  # noqa: ANN001, ANN202
            result = adjust.adjust(conn, cmd)
            return pb.AdjustResponse(
                adjustment_id=result.adjustment_id,
                balance_cents=result.balance_cents,
                balance_negative=result.balance_negative,
                reference=result.reference,
            )

        return await self.mutate(context, "Adjust", request, pb.AdjustResponse, work)

    # ---------------------------------------------------------------- registration
    async def UpsertMember(self, request: pb.UpsertMemberRequest, context) -> pb.Member:  # noqa: ANN001, N802
        def work(conn):  # noqa: ANN001, ANN202
            member_id, name, balance = accounts.upsert_member(conn, request.member_id, request.name)
            return pb.Member(member_id=member_id, name=name, balance_cents=balance)

        return await self.mutate(context, "UpsertMember", request, pb.Member, work)

    async def UpsertOrganisation(self, request: pb.UpsertOrganisationRequest, context) -> pb.Organisation:  # noqa: ANN001, N802
        fee_bp = request.settlement_fee_bp if request.HasField("settlement_fee_bp") else None

        def work(conn):  # noqa: ANN001, ANN202
            org = accounts.upsert_organisation(conn, request.organisation_id, request.name, request.bsb,
                                               request.account_number, request.minimum_balance_cents, fee_bp)
            return convert.organisation_pb(org)

        return await self.mutate(context, "UpsertOrganisation", request, pb.Organisation, work)


