"""Responses built from the results of Pay and Transfer, for the first answer and every replay of
a stored result alike (a Pay is answered from the balance or through a card)."""

from __future__ import annotations

from cobalt.payments.v1 import payments_pb2 as pb
from server.services import card_pay, pay, transfer

_PAY_STATUS = {"SUCCEEDED": pb.SUCCEEDED, "REQUIRES_CARD_PAYMENT": pb.REQUIRES_CARD_PAYMENT, "FAILED": pb.FAILED}


def pay_pb(result: pay.PayResult | card_pay.PayOutcome) -> pb.PayResponse:
    if isinstance(result, card_pay.PayOutcome):
        return pb.PayResponse(status=_PAY_STATUS[result.status], payment_id=result.payment_id,
                              balance_cents=result.balance_cents, topped_up_cents=result.topped_up_cents,
                              payment_intent_id=result.payment_intent_id, client_secret=result.client_secret,
                              card_amount_cents=result.card_amount_cents, failure_reason=result.failure_reason,
                              reference=result.reference)
    return pb.PayResponse(status=pb.SUCCEEDED, payment_id=result.payment_id, balance_cents=result.balance_cents,
                          topped_up_cents=result.topped_up_cents, reference=result.reference)


def transfer_pb(result: transfer.TransferResult) -> pb.TransferResponse:
    return pb.TransferResponse(transfer_id=result.transfer_id, from_balance_cents=result.from_balance_cents,
                               to_balance_cents=result.to_balance_cents, topped_up_cents=result.topped_up_cents,
                               reference=result.reference)
