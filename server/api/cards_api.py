"""Card money (Stripe): top-ups, card payments, auto top-up, refunds, Stripe events.

These flows call Stripe, so they cannot run inside `mutate`'s one transaction: each service flow
checks for a stored result, calls Stripe outside any transaction, and records its result in the
final transaction that books (services.cards.Once). Flows run in the worker pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from cobalt.payments.v1 import payments_pb2 as pb
from server.api.base import ApiBase
from server.domain.errors import DomainError, Unavailable
from server.services import auto_top_up, cards, reconcile, refund, stripe_events, top_up

log = logging.getLogger("payments.cards")

_CARD_STATUS = {cards.PENDING: pb.CARD_PAYMENT_PENDING, cards.SUCCEEDED: pb.CARD_PAYMENT_SUCCEEDED,
                cards.FAILED: pb.CARD_PAYMENT_FAILED}


def auto_top_up_pb(state: auto_top_up.AutoTopUpState) -> pb.AutoTopUpResponse:
    return pb.AutoTopUpResponse(member_id=state.member_id, status=int(state.status), amount_cents=state.amount_cents,
                                topped_up_cents=state.topped_up_cents, balance_cents=state.balance_cents)


# While Stripe is unreachable the reconciler waits longer each time, up to this many intervals.
RECONCILE_MAX_BACKOFF = 60


class CardsApi(ApiBase):
    reconciler: reconcile.Reconciler | None = None
    _reconciling: asyncio.Task | None = None

    # ---------------------------------------------------------------- the reconciler (background)
    async def on_server_start(self) -> None:
        await super().on_server_start()
        if self.gateway.configured and self.settings.reconcile_interval_ms > 0:
            interval_s = self.settings.reconcile_interval_ms / 1000
            self.reconciler = reconcile.Reconciler(self.db, self.gateway, reconcile.Limits(
                min_age_s=self.settings.reconcile_min_age_s, unpaid_ttl_s=self.settings.card_intent_ttl_s,
                first_delay_s=interval_s))
            self._reconciling = asyncio.create_task(self._reconcile_forever(interval_s), name="reconciler")

    async def on_server_stop(self) -> None:
        if self._reconciling is not None:
            assert self.reconciler is not None
            self.reconciler.stopping.set()  # a round in a worker thread ends after its current item
            self._reconciling.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reconciling
            self._reconciling = None
        await super().on_server_stop()

    async def _reconcile_forever(self, interval_s: float) -> None:
        """Every interval, settle the pending card operations with Stripe; while Stripe is
        unreachable (or a round fails), wait twice as long each time, up to RECONCILE_MAX_BACKOFF intervals."""
        assert self.reconciler is not None
        delay_s = interval_s
        while True:
            await asyncio.sleep(delay_s)
            try:
                await self.in_thread(self.reconciler.round)
                delay_s = interval_s
            except Unavailable as exc:
                delay_s = min(delay_s * 2, interval_s * RECONCILE_MAX_BACKOFF)
                log.warning("reconciler: %s; next round in %.1f s", exc.message, delay_s)
            except Exception:  # noqa: BLE001 - the loop outlives one bad round (a database restart, say)
                delay_s = min(delay_s * 2, interval_s * RECONCILE_MAX_BACKOFF)
                log.exception("reconciler round failed; next round in %.1f s", delay_s)

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
