"""The event stream: Subscribe and Ack."""

from __future__ import annotations

from server.api.base import ApiBase
from server.domain.errors import Unimplemented


class EventsApi(ApiBase):
    async def Subscribe(self, request, context):  # noqa: ANN001, N802
        raise Unimplemented("Subscribe is not built yet")
        yield  # an async generator, as the streaming RPC needs

    async def Ack(self, request, context):  # noqa: ANN001, N802
        raise Unimplemented("Ack is not built yet")
