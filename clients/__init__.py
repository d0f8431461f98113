"""Cobalt Payments clients: the Python client library and the `payments-admin` command line."""

from clients.payments_client import PaymentsClient, new_idempotency_key

__all__ = ["PaymentsClient", "new_idempotency_key"]
