"""The PaymentsService servicer: one mixin per part of the API."""

from __future__ import annotations

from cobalt.payments.v1 import payments_pb2_grpc
from server.api.admin_api import AdminApi
from server.api.cards_api import CardsApi
from server.api.events_api import EventsApi
from server.api.ledger_api import LedgerApi


class PaymentsServicer(CardsApi, EventsApi, AdminApi, LedgerApi, payments_pb2_grpc.PaymentsServiceServicer):
    pass
