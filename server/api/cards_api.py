"""Card money (Stripe): top-ups, card payments, auto top-up, refunds, Stripe events.

These flows call Stripe, so they cannot run inside `mutate`'s one transaction: each service flow
checks for a stored result, calls Stripe outside any transaction, and records its result in the
final transaction that books (services.cards.Once). Flows run in the worker pool.
"""

from __future__ import annotations

import logging

from cobalt.payments.v1 import payments_pb2 as pb
from server.api.base import ApiBase
from server.domain.errors import DomainError
from server.services import auto_top_up, cards, refund, stripe_events, top_up

log = logging.getLogger("payments.cards")

_CARD_STATUS = {cards.PENDING: pb.CARD_PAYMENT_PENDING, cards.SUCCEEDED: pb.CARD_PAYMENT_SUCCEEDED,
                cards.FAILED: pb.CARD_PAYMENT_FAILED}


def auto_top_up_pb(state: auto_top_up.AutoTopUpState) -> pb.AutoTopUpResponse:
    return pb.AutoTopUpResponse(member_id=state.member_id, status=int(state.status), amount_cents=state.amount_cents,
                                topped_up_cents=state.topped_up_cents, balance_cents=state.balance_cents)


class CardsApi(ApiBase):
    # ---------------------------------------------------------------- manual top-up and card payments
    async def StartTopUp(self, request: pb.StartTopUpRequest, context) -> pb.StartTopUpResponse:  # noqa: ANN001, N802
        def to_pb(r: top_up.TopUpStarted) -> pb.StartTopUpResponse:
            return pb.StartTopUpResponse(payment_intent_id=r.payment_intent_id, client_secret=r.client_secret,
                                         amount_cents=r.amount_cents)

        self.gateway.require()
        once = self.once("StartTopUp", request)
        principal = self.principal().name
        result = await self.in_context(lambda: top_up.start(self.db, self.gateway, once, request.member_id,
                                                            request.amount_cents, principal))
        return self.answer(context, result, to_pb)

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
        once = self.once("SetupAutoTopUp", request)
        result = await self.in_context(lambda: auto_top_up.setup(self.db, self.gateway, once, request.member_id,
                                                                 request.amount_cents))
        return self.answer(context, result, to_pb)

    async def ConfirmAutoTopUp(self, request: pb.ConfirmAutoTopUpRequest, context) -> pb.AutoTopUpResponse:  # noqa: ANN001, N802
        self.gateway.require()
        principal = self.principal().name
        state = await self.in_context(lambda: auto_top_up.confirm(self.db, self.gateway, request.member_id, principal))
        return auto_top_up_pb(state)

    async def UpdateAutoTopUp(self, request: pb.UpdateAutoTopUpRequest, context) -> pb.AutoTopUpResponse:  # noqa: ANN001, N802
        return await self.mutate(context, "UpdateAutoTopUp", request,
                                 lambda conn: auto_top_up.update_amount(conn, request.member_id, request.amount_cents),
                                 auto_top_up_pb)

    async def CancelAutoTopUp(self, request: pb.CancelAutoTopUpRequest, context) -> pb.AutoTopUpResponse:  # noqa: ANN001, N802
        self.gateway.require()
        once = self.once("CancelAutoTopUp", request)
        result = await self.in_context(lambda: auto_top_up.cancel(self.db, self.gateway, once, request.member_id))
        return self.answer(context, result, auto_top_up_pb)

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
        once = self.once("Refund", request)
        result = await self.in_context(lambda: refund.refund(self.db, self.gateway, once, cmd))
        return self.answer(context, result, to_pb)

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
