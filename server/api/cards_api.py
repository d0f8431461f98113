"""Card money (Stripe): top-ups, card payments, auto top-up, refunds, Stripe events."""

from __future__ import annotations

from server.api.base import ApiBase
from server.domain.errors import Unimplemented


class CardsApi(ApiBase):
    async def StartTopUp(self, request, context):  # noqa: ANN001, N802
        raise Unimplemented("StartTopUp is not built yet")

    async def ConfirmCardPayment(self, request, context):  # noqa: ANN001, N802
        raise Unimplemented("ConfirmCardPayment is not built yet")

    async def SetupAutoTopUp(self, request, context):  # noqa: ANN001, N802
        raise Unimplemented("SetupAutoTopUp is not built yet")

    async def ConfirmAutoTopUp(self, request, context):  # noqa: ANN001, N802
        raise Unimplemented("ConfirmAutoTopUp is not built yet")

    async def UpdateAutoTopUp(self, request, context):  # noqa: ANN001, N802
        raise Unimplemented("UpdateAutoTopUp is not built yet")

    async def CancelAutoTopUp(self, request, context):  # noqa: ANN001, N802
        raise Unimplemented("CancelAutoTopUp is not built yet")

    async def Refund(self, request, context):  # noqa: ANN001, N802
        raise Unimplemented("Refund is not built yet")

    async def HandleStripeEvent(self, request, context):  # noqa: ANN001, N802
        raise Unimplemented("HandleStripeEvent is not built yet")
