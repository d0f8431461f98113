"""Administrators: settlement, fee settings, summaries and lists."""

from __future__ import annotations

from server.api.base import ApiBase
from server.domain.errors import Unimplemented


class AdminApi(ApiBase):
    async def Settle(self, request, context):  # noqa: ANN001, N802
        raise Unimplemented("Settle is not built yet")

    async def SetFeeSettings(self, request, context):  # noqa: ANN001, N802
        raise Unimplemented("SetFeeSettings is not built yet")

    async def GetFeeSettings(self, request, context):  # noqa: ANN001, N802
        raise Unimplemented("GetFeeSettings is not built yet")

    async def GetAdminSummary(self, request, context):  # noqa: ANN001, N802
        raise Unimplemented("GetAdminSummary is not built yet")

    async def ListBalances(self, request, context):  # noqa: ANN001, N802
        raise Unimplemented("ListBalances is not built yet")

    async def ListOrganisations(self, request, context):  # noqa: ANN001, N802
        raise Unimplemented("ListOrganisations is not built yet")

    async def GetOrganisationSummary(self, request, context):  # noqa: ANN001, N802
        raise Unimplemented("GetOrganisationSummary is not built yet")
