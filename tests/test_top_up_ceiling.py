"""StartTopUp's ceiling counts the member's top-ups still pending (SPEC §4): $50.00 ≤ amount ≤
$2,000.00 − balance − pending top-ups, so top-ups started together (or one after the other, before
either is paid) can never lift a balance past $2,000.00. The check and the pending row are one
transaction under the member's lock: concurrent starts take turns."""

from __future__ import annotations

import threading

import grpc
import pytest
from stripe_support import CardStack

from cobalt.payments.v1 import payments_pb2 as pb
from server.domain.money import MAX_TOP_UP_CENTS

pytestmark = pytest.mark.stripe


def start_together(cards: CardStack, member_id: int, amounts: list[int]) -> tuple[list, list]:
    """Start the top-ups at once, each on its own connection; (started, refused)."""
    started: list[pb.StartTopUpResponse] = []
    refused: list[grpc.RpcError] = []
    barrier = threading.Barrier(len(amounts))

    def one(amount_cents: int) -> None:
        with cards.server.client("app") as app:
            barrier.wait()
            try:
                started.append(cards.start_top_up(member_id, amount_cents, client=app))
            except grpc.RpcError as err:
                refused.append(err)

    threads = [threading.Thread(target=one, args=(a,)) for a in amounts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return started, refused


def assert_ceiling_refusal(err: grpc.RpcError) -> None:
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert "amount_cents" in err.details()


@pytest.mark.parametrize("balance_cents", [0, 500_00])
def test_top_ups_started_together_cannot_lift_the_balance_past_the_ceiling(cards: CardStack,
                                                                           balance_cents: int) -> None:
    if balance_cents:
        cards.admin.adjust(balance_cents, "opening", member_id=1)
    room = MAX_TOP_UP_CENTS - balance_cents
    amounts = [room // 2 + 1_00] * 6  # any two together are over the room; one fits
    started, refused = start_together(cards, 1, amounts)
    assert len(started) == 1 and len(refused) == len(amounts) - 1
    for err in refused:
        assert_ceiling_refusal(err)
    # pay every intent that was started: the balance stays within the ceiling
    for s in started:
        assert cards.pay_intent_with_card(s.payment_intent_id) == "succeeded"
        cards.confirm_card_payment(s.payment_intent_id)
    assert cards.app.balance_cents(member_id=1) <= MAX_TOP_UP_CENTS
    cards.assert_invariants()


def test_many_small_top_ups_started_together_fill_the_room_exactly(cards: CardStack) -> None:
    started, refused = start_together(cards, 2, [500_00] * 6)
    assert sum(s.amount_cents for s in started) == MAX_TOP_UP_CENTS  # four fit, two do not
    assert len(refused) == 2
    for err in refused:
        assert_ceiling_refusal(err)


def test_a_pending_top_up_counts_until_it_is_paid(cards: CardStack) -> None:
    first = cards.start_top_up(3, 1_500_00)
    with pytest.raises(grpc.RpcError) as err:
        cards.start_top_up(3, 500_01)
    assert_ceiling_refusal(err.value)
    assert "pending" in err.value.details()
    assert cards.start_top_up(3, 500_00).amount_cents == 500_00  # exactly the room left
    assert cards.pay_intent_with_card(first.payment_intent_id) == "succeeded"
    cards.confirm_card_payment(first.payment_intent_id)
    # paid: it is in the balance now, and counted once
    with pytest.raises(grpc.RpcError) as err:
        cards.start_top_up(3, 50_00)
    assert_ceiling_refusal(err.value)
    assert cards.app.balance_cents(member_id=3) == 1_500_00


def test_a_retry_of_a_started_top_up_is_not_counted_against_itself(cards: CardStack) -> None:
    first = cards.start_top_up(4, MAX_TOP_UP_CENTS, key="same-key")
    again = cards.start_top_up(4, MAX_TOP_UP_CENTS, key="same-key")
    assert again.payment_intent_id == first.payment_intent_id
