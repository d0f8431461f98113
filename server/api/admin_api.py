"""Administrators: settlement, fee settings, summaries and lists. Role `admin` only (the
interceptor refuses every other role with PERMISSION_DENIED)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses

import structlog

from cobalt.payments.v1 import payments_pb2 as pb
from server.api import convert
from server.api.base import ApiBase
from server.domain.errors import InvalidArgument
from server.domain.types import AccountKind
from server.ledger import idempotency
from server.services import fees, settle, summaries

log = structlog.get_logger("payments.server")

_FEE_FIELDS = ("settlement_fee_bp", "refund_fee_bp", "stripe_cost_per_transaction_cents", "stripe_cost_bp",
               "low_balance_limit_cents")

# a settlement row's fields, each the proto field of the same name (read one by one: asdict's deep copy
# took a third of a second for 10,000 rows)
_SETTLEMENT_ROW_FIELDS = tuple(f.name for f in dataclasses.fields(settle.SettlementRow))

_KINDS = {
    pb.ACCOUNT_KIND_UNSPECIFIED: None,
    pb.MEMBER: AccountKind.MEMBER,
    pb.ORGANISATION: AccountKind.ORGANISATION,
    pb.SYSTEM: AccountKind.SYSTEM,
}


def _fee_settings_pb(s: fees.FeeSettings) -> pb.FeeSettings:
    return pb.FeeSettings(
        version=s.version,
        settlement_fee_bp=s.settlement_fee_bp,
        refund_fee_bp=s.refund_fee_bp,
        stripe_cost_per_transaction_cents=s.stripe_cost_per_transaction_cents,
        stripe_cost_bp=s.stripe_cost_bp,
        low_balance_limit_cents=s.low_balance_limit_cents,
        effective_from=convert.timestamp(s.effective_from),
        set_by=s.set_by,
    )


def _settle_response(result: settle.SettleResult, aba_available: bool) -> pb.SettleResponse:
    return pb.SettleResponse(
        batch_id=result.batch_id,
        dry_run=result.dry_run,
        rows=[pb.SettlementRow(**{name: getattr(row, name) for name in _SETTLEMENT_ROW_FIELDS}) for row in result.rows],
        total_gross_cents=result.total_gross_cents,
        total_fee_cents=result.total_fee_cents,
        total_gst_cents=result.total_gst_cents,
        total_net_cents=result.total_net_cents,
        skipped_organisation_ids=result.skipped_organisation_ids,
        fee_settings_version=result.fee_settings.version,
        default_fee_bp=result.fee_settings.settlement_fee_bp,
        aba_file=result.aba_file,
        aba_available=aba_available,
    )


# How often this process folds the rows that keep the balance totals (ListBalances' count and total)
BALANCE_TOTALS_FOLD_S = 5.0


class AdminApi(ApiBase):
    _folding: asyncio.Task | None = None

    async def on_server_start(self) -> None:
        await super().on_server_start()
        self._folding = asyncio.create_task(self._fold_balance_totals_forever(), name="balance-totals-fold")

    async def on_server_stop(self) -> None:
        if self._folding is not None:
            self._folding.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._folding
            self._folding = None
        await super().on_server_stop()

    async def _fold_balance_totals_forever(self) -> None:
        """Every few seconds, sum up the rows the writers added to the balance totals (one
        statement; any number of processes may do it at once)."""
        while True:
            await asyncio.sleep(BALANCE_TOTALS_FOLD_S)
            try:
                await self.in_thread(lambda: self.db.run(summaries.fold_balance_totals))
            except Exception as exc:  # noqa: BLE001 - the next round tries again; readers sum what is there
                log.warning("balance totals not folded", error=str(exc).splitlines()[0] if str(exc) else type(exc).__name__)

    async def Settle(self, request: pb.SettleRequest, context) -> pb.SettleResponse:  # noqa: ANN001, N802
        expected: dict[int, int] = {}
        for item in request.expected_balances:
            if item.organisation_id in expected:
                raise InvalidArgument.field("expected_balances", f"organisation {item.organisation_id} given twice")
            expected[item.organisation_id] = item.balance_cents
        cmd = settle.SettleCommand(
            principal=self.principal().name,
            organisation_ids=tuple(request.organisation_ids),
            dry_run=request.dry_run,
            expected_balances=expected,
        ).validated()
        originator, tz = self.settings.aba, self.settings.timezone

        def work(conn):  # noqa: ANN001, ANN202
            return settle.settle(conn, cmd, originator, tz)

        def to_pb(result: settle.SettleResult) -> pb.SettleResponse:
            return _settle_response(result, originator is not None)

        if cmd.dry_run:
            # books nothing and records nothing: the key, if given, is only checked for shape
            if request.idempotency_key:
                idempotency.check_key(request.idempotency_key)
            return to_pb(await self.read(work))
        return await self.mutate(context, "Settle", request, work, to_pb)

    async def SetFeeSettings(self, request: pb.SetFeeSettingsRequest, context) -> pb.FeeSettings:  # noqa: ANN001, N802
        changes = {name: getattr(request, name) for name in _FEE_FIELDS if request.HasField(name)}
        if not changes:
            raise InvalidArgument.field("settlement_fee_bp", "set at least one fee setting")

        def work(conn):  # noqa: ANN001, ANN202
            new = dataclasses.replace(fees.current_fee_settings(conn), **changes)
            return fees.set_fee_settings(conn, new, self.principal().name)

        return await self.mutate(context, "SetFeeSettings", request, work, _fee_settings_pb)

    async def GetFeeSettings(self, request: pb.GetFeeSettingsRequest, context) -> pb.GetFeeSettingsResponse:  # noqa: ANN001, N802
        def work(conn):  # noqa: ANN001, ANN202
            return fees.current_fee_settings(conn), fees.fee_settings_history(conn)

        current, history = await self.read(work)
        return pb.GetFeeSettingsResponse(current=_fee_settings_pb(current),
                                         history=[_fee_settings_pb(s) for s in history])

    async def GetAdminSummary(self, request: pb.GetAdminSummaryRequest, context) -> pb.GetAdminSummaryResponse:  # noqa: ANN001, N802
        s = await self.read(summaries.admin_summary)
        return pb.GetAdminSummaryResponse(
            members_with_balance=s.members_with_balance,
            member_balances_cents=s.member_balances_cents,
            organisations_with_balance=s.organisations_with_balance,
            organisation_balances_cents=s.organisation_balances_cents,
            net_liability_cents=s.net_liability_cents,
            members_with_auto_top_up=s.members_with_auto_top_up,
            card_money_in_30d_cents=s.card_money_in_30d_cents,
            system_balances=[pb.SystemBalance(account=code, balance_cents=cents) for code, cents in s.system_balances],
            card_refunds_30d_cents=s.card_refunds_30d_cents,
            ledger_sum_cents=s.ledger_sum_cents,
        )

    async def ListBalances(self, request: pb.ListBalancesRequest, context) -> pb.ListBalancesResponse:  # noqa: ANN001, N802
        if request.kind not in _KINDS:
            raise InvalidArgument.field("kind", f"unknown account kind {request.kind}")
        kind = _KINDS[request.kind]
        page = await self.read(lambda conn: summaries.list_balances(conn, kind, request.page_size, request.page_token,
                                                                    request.include_zero))
        return pb.ListBalancesResponse(
            rows=[
                pb.BalanceRow(kind=int(row.kind), id=row.ext_id, name=row.name, balance_cents=row.balance_cents,
                              system_account=row.system_account)
                for row in page.rows
            ],
            next_page_token=page.next_page_token,
            total_cents=page.total_cents,
            count=page.count,
        )

    async def ListOrganisations(self, request: pb.ListOrganisationsRequest, context) -> pb.ListOrganisationsResponse:  # noqa: ANN001, N802
        ids = list(request.organisation_ids)
        page = await self.read(lambda conn: summaries.list_organisations(conn, request.page_size, request.page_token,
                                                                         ids))
        return pb.ListOrganisationsResponse(organisations=[convert.organisation_pb(o) for o in page.organisations],
                                            next_page_token=page.next_page_token)

    async def GetOrganisationSummary(self, request: pb.GetOrganisationSummaryRequest,  # noqa: N802
                                     context) -> pb.GetOrganisationSummaryResponse:  # noqa: ANN001
        start, end = convert.optional_time(request, "from"), convert.optional_time(request, "to")
        s = await self.read(lambda conn: summaries.organisation_summary(conn, request.organisation_id, start, end))
        return pb.GetOrganisationSummaryResponse(
            organisation_id=s.organisation_id,
            name=s.name,
            totals=[
                pb.TypeTotal(type=convert.payment_type_pb(t.type), type_name=t.type.display_name,
                             amount_cents=t.amount_cents, count=t.count, in_cents=t.in_cents, out_cents=t.out_cents)
                for t in s.totals
            ],
            opening_balance_cents=s.opening_balance_cents,
            closing_balance_cents=s.closing_balance_cents,
        )
