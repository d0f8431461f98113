"""A thin, typed wrapper over the generated stubs that adds the bearer token and idempotency keys.

    client = PaymentsClient("127.0.0.1:50051", token)
    client.upsert_organisation(7, "Bridge Club")
    client.pay(member_id=1, organisation_id=7, amount_cents=1500, description="Entry")

The channel (clients/channel.py) takes TLS from the environment (PAYMENTS_TLS_CA_FILE, …) unless
`tls` is given, and gRPC retries a call that met UNAVAILABLE (its service config's retryPolicy). A
request that changes money gets its idempotency key here, once, so every attempt carries the same key.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import grpc

from clients.channel import ClientTls, open_channel
from cobalt.payments.v1 import payments_pb2 as pb
from cobalt.payments.v1 import payments_pb2_grpc as pb_grpc


def new_idempotency_key() -> str:
    return uuid.uuid4().hex


def account(member_id: int | None = None, organisation_id: int | None = None) -> pb.AccountRef:
    if (member_id is None) == (organisation_id is None):
        raise ValueError("give exactly one of member_id and organisation_id")
    return pb.AccountRef(member_id=member_id) if member_id is not None else pb.AccountRef(organisation_id=organisation_id)


class PaymentsClient:
    def __init__(self, target: str, token: str, *, channel: grpc.Channel | None = None, timeout_s: float = 30.0,
                 tls: ClientTls | None = None, allow_insecure: bool | None = None):
        self.channel = channel or open_channel(target, tls, allow_insecure=allow_insecure)
        self.stub = pb_grpc.PaymentsServiceStub(self.channel)
        self._metadata = (("authorization", f"Bearer {token}"),)
        self.timeout_s = timeout_s

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> PaymentsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, method: str, request, *, with_call: bool = False):  # noqa: ANN001
        """Any RPC by name with the token attached; with_call=True also returns the grpc.Call."""
        fn = getattr(self.stub, method)
        if with_call:
            return fn.with_call(request, metadata=self._metadata, timeout=self.timeout_s)
        return fn(request, metadata=self._metadata, timeout=self.timeout_s)

    def stream(self, method: str, request, timeout_s: float | None = None) -> Iterator:  # noqa: ANN001
        return getattr(self.stub, method)(request, metadata=self._metadata, timeout=timeout_s)

    # ---- members and applications
    def pay(self, member_id: int, amount_cents: int, *, organisation_id: int | None = None,
            other_member_id: int | None = None, description: str = "", payment_type: int = 0,
            route_code: str = "", route_payload: str = "", event_id: int = 0, session_id: int = 0,
            ensure_funds_only: bool = False, idempotency_key: str | None = None) -> pb.PayResponse:
        req = pb.PayRequest(
            idempotency_key=idempotency_key or new_idempotency_key(), member_id=member_id, amount_cents=amount_cents,
            description=description, payment_type=payment_type, route_code=route_code, route_payload=route_payload,
            event_id=event_id, session_id=session_id, ensure_funds_only=ensure_funds_only,
        )
        if organisation_id is not None:
            req.organisation_id = organisation_id
        if other_member_id is not None:
            req.other_member_id = other_member_id
        return self.call("Pay", req)

    def get_balance(self, member_id: int | None = None, organisation_id: int | None = None) -> pb.GetBalanceResponse:
        return self.call("GetBalance", pb.GetBalanceRequest(account=account(member_id, organisation_id)))

    def balance_cents(self, member_id: int | None = None, organisation_id: int | None = None) -> int:
        return self.get_balance(member_id, organisation_id).balance_cents

    def get_statement(self, member_id: int | None = None, organisation_id: int | None = None, *,
                      page_size: int = 0, page_token: str = "", start=None, end=None) -> pb.GetStatementResponse:  # noqa: ANN001
        req = pb.GetStatementRequest(account=account(member_id, organisation_id), page_size=page_size,
                                     page_token=page_token)
        if start is not None:
            getattr(req, "from").FromDatetime(start)
        if end is not None:
            req.to.FromDatetime(end)
        return self.call("GetStatement", req)

    def export_statement(self, member_id: int | None = None, organisation_id: int | None = None, *,
                         start=None, end=None) -> bytes:  # noqa: ANN001
        req = pb.ExportStatementRequest(account=account(member_id, organisation_id))
        if start is not None:
            getattr(req, "from").FromDatetime(start)
        if end is not None:
            req.to.FromDatetime(end)
        return b"".join(chunk.data for chunk in self.stream("ExportStatement", req, self.timeout_s))

    def transfer(self, to_member_id: int, amount_cents: int, *, from_member_id: int | None = None,
                 from_organisation_id: int | None = None, description: str = "",
                 idempotency_key: str | None = None) -> pb.TransferResponse:
        req = pb.TransferRequest(idempotency_key=idempotency_key or new_idempotency_key(), to_member_id=to_member_id,
                                 amount_cents=amount_cents, description=description)
        getattr(req, "from").CopyFrom(account(from_member_id, from_organisation_id))
        return self.call("Transfer", req)

    # ---- administrators
    def adjust(self, amount_cents: int, description: str, *, member_id: int | None = None,
               organisation_id: int | None = None, idempotency_key: str | None = None) -> pb.AdjustResponse:
        return self.call("Adjust", pb.AdjustRequest(
            idempotency_key=idempotency_key or new_idempotency_key(), account=account(member_id, organisation_id),
            amount_cents=amount_cents, description=description))

    def upsert_member(self, member_id: int, name: str = "", *, idempotency_key: str | None = None) -> pb.Member:
        return self.call("UpsertMember", pb.UpsertMemberRequest(
            idempotency_key=idempotency_key or new_idempotency_key(), member_id=member_id, name=name))

    def upsert_organisation(self, organisation_id: int, name: str, *, bsb: str = "", account_number: str = "",
                            minimum_balance_cents: int = 0, settlement_fee_bp: int | None = None,
                            idempotency_key: str | None = None) -> pb.Organisation:
        req = pb.UpsertOrganisationRequest(
            idempotency_key=idempotency_key or new_idempotency_key(), organisation_id=organisation_id, name=name,
            bsb=bsb, account_number=account_number, minimum_balance_cents=minimum_balance_cents)
        if settlement_fee_bp is not None:
            req.settlement_fee_bp = settlement_fee_bp
        return self.call("UpsertOrganisation", req)

    # ---- administrators: settlement, fees, summaries and lists
    def settle(self, organisation_ids: list[int] | tuple[int, ...] = (), *, dry_run: bool = False,
               expected_balances: dict[int, int] | None = None,
               idempotency_key: str | None = None, timeout_s: float | None = None) -> pb.SettleResponse:
        """Settle organisations (empty: every eligible one). `expected_balances` (organisation id →
        balance a dry run showed) marks rows whose balance changed since (`balance_changed`)."""
        req = pb.SettleRequest(
            idempotency_key=idempotency_key or new_idempotency_key(), organisation_ids=list(organisation_ids),
            dry_run=dry_run,
            expected_balances=[pb.ExpectedBalance(organisation_id=org_id, balance_cents=cents)
                               for org_id, cents in sorted((expected_balances or {}).items())],
        )
        if timeout_s is not None:
            return self.stub.Settle(req, metadata=self._metadata, timeout=timeout_s)
        return self.call("Settle", req)

    def set_fee_settings(self, *, idempotency_key: str | None = None, **settings: int) -> pb.FeeSettings:
        """A new fee-settings version; settings not given keep their current value. Names as in
        SetFeeSettingsRequest: settlement_fee_bp, refund_fee_bp, stripe_cost_per_transaction_cents,
        stripe_cost_bp, low_balance_limit_cents."""
        return self.call("SetFeeSettings", pb.SetFeeSettingsRequest(
            idempotency_key=idempotency_key or new_idempotency_key(), **settings))

    def get_fee_settings(self) -> pb.GetFeeSettingsResponse:
        return self.call("GetFeeSettings", pb.GetFeeSettingsRequest())

    def admin_summary(self) -> pb.GetAdminSummaryResponse:
        return self.call("GetAdminSummary", pb.GetAdminSummaryRequest())

    def list_balances(self, kind: int = 0, *, page_size: int = 0, page_token: str = "",
                      include_zero: bool = False) -> pb.ListBalancesResponse:
        return self.call("ListBalances", pb.ListBalancesRequest(kind=kind, page_size=page_size, page_token=page_token,
                                                                include_zero=include_zero))

    def iter_balances(self, kind: int = 0, *, page_size: int = 0, include_zero: bool = False) -> Iterator[pb.BalanceRow]:
        """Every row of ListBalances, page after page."""
        token = ""
        while True:
            page = self.list_balances(kind, page_size=page_size, page_token=token, include_zero=include_zero)
            yield from page.rows
            token = page.next_page_token
            if not token:
                return

    def list_organisations(self, organisation_ids: list[int] | tuple[int, ...] = (), *, page_size: int = 0,
                           page_token: str = "") -> pb.ListOrganisationsResponse:
        return self.call("ListOrganisations", pb.ListOrganisationsRequest(
            organisation_ids=list(organisation_ids), page_size=page_size, page_token=page_token))

    def iter_organisations(self, *, page_size: int = 0) -> Iterator[pb.Organisation]:
        token = ""
        while True:
            page = self.list_organisations(page_size=page_size, page_token=token)
            yield from page.organisations
            token = page.next_page_token
            if not token:
                return

    def organisation_summary(self, organisation_id: int, *, start=None, end=None  # noqa: ANN001
                             ) -> pb.GetOrganisationSummaryResponse:
        req = pb.GetOrganisationSummaryRequest(organisation_id=organisation_id)
        if start is not None:
            getattr(req, "from").FromDatetime(start)
        if end is not None:
            req.to.FromDatetime(end)
        return self.call("GetOrganisationSummary", req)
