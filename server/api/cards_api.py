"""Card money (Stripe): top-ups, card payments, auto top-up, refunds, Stripe events.

These flows call Stripe, so they cannot run inside `mutate`'s one transaction: each service flow
checks for a stored response, calls Stripe outside any transaction, and records its response in the
final transaction that books (services.cards.Once). Flows run in the worker pool.
"""

from __future__ import annotations

import contextvars
import logging
import secrets
from collections.abc import Callable
from typing import Any, TypeVar

from google.protobuf.message import Message
from sqlalchemy.exc import IntegrityError

from cobalt.payments.v1 import payments_pb2 as pb
from server.api.base import ApiBase
from server.domain.errors import DomainError, InsufficientFunds
from server.ledger import idempotency
from server.services import auto_top_up, card_pay, cards, refund, stripe_events, top_up
from server.services.cards import Once, Replayed
from server.services.pay import PayCommand
from server.services.transfer import TransferCommand
from server.stripe_gateway import StripeGateway, stripe_key

log = logging.getLogger("payments.cards")

M = TypeVar("M", bound=Message)
T = TypeVar("T")

_CARD_STATUS = {cards.PENDING: pb.CARD_PAYMENT_PENDING, cards.SUCCEEDED: pb.CARD_PAYMENT_SUCCEEDED,
                cards.FAILED: pb.CARD_PAYMENT_FAILED}
_PAY_STATUS = {"SUCCEEDED": pb.SUCCEEDED, "REQUIRES_CARD_PAYMENT": pb.REQUIRES_CARD_PAYMENT, "FAILED": pb.FAILED}


def pay_outcome_pb(outcome: card_pay.PayOutcome) -> pb.PayResponse:
    return pb.PayResponse(status=_PAY_STATUS[outcome.status], payment_id=outcome.payment_id,
                          balance_cents=outcome.balance_cents, topped_up_cents=outcome.topped_up_cents,
                          payment_intent_id=outcome.payment_intent_id, client_secret=outcome.client_secret,
                          card_amount_cents=outcome.card_amount_cents, failure_reason=outcome.failure_reason,
                          reference=outcome.reference)


def auto_top_up_pb(state: auto_top_up.AutoTopUpState) -> pb.AutoTopUpResponse:
    return pb.AutoTopUpResponse(member_id=state.member_id, status=int(state.status), amount_cents=state.amount_cents,
                                topped_up_cents=state.topped_up_cents, balance_cents=state.balance_cents)


def _encoder(to_pb: Callable[[Any], Message]) -> Callable[[Any], bytes]:
    return lambda result: to_pb(result).SerializeToString(deterministic=True)


class CardsApi(ApiBase):
    _gateway: StripeGateway | None = None

    @property
    def gateway(self) -> StripeGateway:
        if self._gateway is None:
            self._gateway = StripeGateway(self.settings.stripe_secret_key, self.settings.stripe_api_base,
                                          self.settings.currency)
        return self._gateway

    # ---------------------------------------------------------------- plumbing
    async def in_context(self, fn: Callable[[], T]) -> T:
        """Run a blocking flow (database and Stripe) in the pool, with the caller's principal.
        A flow whose final write lost a race with a concurrent retry of the same request (same
        idempotency key, or the same pending card payment) runs once more: it then finds the
        stored response, and Stripe's idempotency key makes its Stripe calls the same ones."""
        ctx = contextvars.copy_context()

        def run() -> T:
            try:
                return ctx.run(fn)
            except IntegrityError:
                return ctx.run(fn)

        return await self.in_thread(run)

    def once(self, method: str, request: Message, to_pb: Callable[[Any], Message]) -> Once:
        key = request.idempotency_key  # type: ignore[attr-defined]
        idempotency.check_key(key)
        return Once(self.principal().name, key, method,
                    idempotency.request_hash(method, request.SerializeToString(deterministic=True)), _encoder(to_pb))

    @staticmethod
    def answer(context, result: Any, response_type: type[M], to_pb: Callable[[Any], M]) -> M:  # noqa: ANN001
        if isinstance(result, Replayed):
            context.set_trailing_metadata((("idempotent-replay", "true"),))
            return response_type.FromString(result.response)
        return to_pb(result)

    # ---------------------------------------------------------------- Pay and Transfer when short
    async def pay_when_short(self, context, request: pb.PayRequest, cmd: PayCommand,  # noqa: ANN001
                             short: InsufficientFunds) -> pb.PayResponse:
        if not self.gateway.configured:
            raise short
        once = self.once("Pay", request, pay_outcome_pb)
        result = await self.in_context(lambda: card_pay.pay_when_short(self.db, self.gateway, once, cmd, short))
        if isinstance(result, card_pay.PayOutcome) and result.needs_auto_top_up:
            await self.after_payment_top_up(cmd.member_id)
        return self.answer(context, result, pb.PayResponse, pay_outcome_pb)

    async def transfer_when_short(self, context, request: pb.TransferRequest,  # noqa: ANN001
                                  cmd: TransferCommand, short: InsufficientFunds) -> pb.TransferResponse:
        if not self.gateway.configured:
            raise short
        once = self.once("Transfer", request, self.transfer_response)  # type: ignore[attr-defined]
        result = await self.in_context(lambda: card_pay.transfer_when_short(self.db, self.gateway, once, cmd, short))
        return self.answer(context, result, pb.TransferResponse, self.transfer_response)  # type: ignore[attr-defined]

    async def after_payment_top_up(self, member_id: int) -> None:
        """The payment is booked and answered; a failed top-up here must not fail it."""
        if not self.gateway.configured:
            return
        principal = self.principal().name
        ref = stripe_key("low-balance", member_id, secrets.token_hex(10))  # a fresh top-up each time
        try:
            await self.in_context(lambda: auto_top_up.top_up_if_low(self.db, self.gateway, member_id, principal, ref))
        except DomainError as exc:
            log.warning("auto top-up after a payment of member %s did not happen: %s", member_id, exc.message)

    # ---------------------------------------------------------------- manual top-up and card payments
    async def StartTopUp(self, request: pb.StartTopUpRequest, context) -> pb.StartTopUpResponse:  # noqa: ANN001, N802
        def to_pb(r: top_up.TopUpStarted) -> pb.StartTopUpResponse:
            return pb.StartTopUpResponse(payment_intent_id=r.payment_intent_id, client_secret=r.client_secret,
                                         amount_cents=r.amount_cents)

        self.gateway.require()
        once = self.once("StartTopUp", request, to_pb)
        principal = self.principal().name
        result = await self.in_context(lambda: top_up.start(self.db, self.gateway, once, request.member_id,
                                                            request.amount_cents, principal))
        return self.answer(context, result, pb.StartTopUpResponse, to_pb)

    async def ConfirmCardPayment(self, request: pb.ConfirmCardPaymentRequest,  # noqa: N802
                                 context) -> pb.ConfirmCardPaymentResponse:  # noqa: ANN001
        self.gateway.require()
        state = await self.in_context(lambda: top_up.confirm_card_payment(self.db, self.gateway,
                                                                          request.payment_intent_id))
        return pb.ConfirmCardPaymentResponse(status=_CARD_STATUS[state.status], applied_now=state.applied_now,
                                             balance_cents=state.balance_cents, payment_id=state.payment_id)

    # ---------------------------------------------------------------- auto top-up
    async def SetupAutoTopUp(self, request: pb.SetupAutoTopUpRequest,  # noqa: N802
                             context) -> pb.SetupAutoTopUpResponse:  # noqa: ANN001
        def to_pb(r: auto_top_up.SetupStarted) -> pb.SetupAutoTopUpResponse:
            return pb.SetupAutoTopUpResponse(setup_intent_id=r.setup_intent_id, client_secret=r.client_secret,
                                             customer_id=r.customer_id, status=int(r.status))

        self.gateway.require()
        once = self.once("SetupAutoTopUp", request, to_pb)
        result = await self.in_context(lambda: auto_top_up.setup(self.db, self.gateway, once, request.member_id,
                                                                 request.amount_cents))
        return self.answer(context, result, pb.SetupAutoTopUpResponse, to_pb)

    async def ConfirmAutoTopUp(self, request: pb.ConfirmAutoTopUpRequest, context) -> pb.AutoTopUpResponse:  # noqa: ANN001, N802
        self.gateway.require()
        principal = self.principal().name
        state = await self.in_context(lambda: auto_top_up.confirm(self.db, self.gateway, request.member_id, principal))
        return auto_top_up_pb(state)

    async def UpdateAutoTopUp(self, request: pb.UpdateAutoTopUpRequest, context) -> pb.AutoTopUpResponse:  # noqa: ANN001, N802
        return await self.mutate(context, "UpdateAutoTopUp", request, pb.AutoTopUpResponse,
                                 lambda conn: auto_top_up_pb(auto_top_up.update_amount(conn, request.member_id,
                                                                                       request.amount_cents)))

    async def CancelAutoTopUp(self, request: pb.CancelAutoTopUpRequest, context) -> pb.AutoTopUpResponse:  # noqa: ANN001, N802
        self.gateway.require()
        once = self.once("CancelAutoTopUp", request, auto_top_up_pb)
        result = await self.in_context(lambda: auto_top_up.cancel(self.db, self.gateway, once, request.member_id))
        return self.answer(context, result, pb.AutoTopUpResponse, auto_top_up_pb)

    # ---------------------------------------------------------------- refunds
    async def Refund(self, request: pb.RefundRequest, context) -> pb.RefundResponse:  # noqa: ANN001, N802
        def to_pb(r: refund.RefundResult) -> pb.RefundResponse:
            return pb.RefundResponse(refund_id=r.refund_id, amount_cents=r.amount_cents, fee_cents=r.fee_cents,
                                     card_amount_cents=r.card_amount_cents, balance_cents=r.balance_cents,
                                     remaining_refundable_cents=r.remaining_refundable_cents)

        self.gateway.require()
        principal = self.principal()
        cmd = refund.RefundCommand(principal.name, principal.is_admin, request.payment_intent_id,
                                   request.amount_cents, request.member_id).validated()
        once = self.once("Refund", request, to_pb)
        result = await self.in_context(lambda: refund.refund(self.db, self.gateway, once, cmd))
        return self.answer(context, result, pb.RefundResponse, to_pb)

    # ---------------------------------------------------------------- Stripe events (the bridge)
    async def HandleStripeEvent(self, request: pb.HandleStripeEventRequest,  # noqa: N802
                                context) -> pb.HandleStripeEventResponse:  # noqa: ANN001
        outcome = await self.in_context(lambda: stripe_events.handle(self.db, self.gateway, request.event_id,
                                                                     request.type, request.payload_json))
        if outcome.top_up_member_id is not None and self.gateway.configured:
            member_id, principal = outcome.top_up_member_id, self.principal().name
            try:
                await self.in_context(lambda: auto_top_up.top_up_if_low(self.db, self.gateway, member_id, principal,
                                                                        outcome.top_up_ref))
            except DomainError as exc:
                log.warning("auto top-up on activation of member %s did not happen: %s", member_id, exc.message)
        return pb.HandleStripeEventResponse(duplicate=outcome.duplicate, handled=outcome.handled)
