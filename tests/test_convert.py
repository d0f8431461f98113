"""Encodings computed by hand for speed agree with protobuf's own: timestamps, and the stored
responses the one-statement paths fill in."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta, timezone

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from cobalt.payments.v1 import payments_pb2 as pb
from server.api.convert import timestamp
from server.ledger import idempotency


def test_timestamps_are_what_protobuf_makes_of_the_same_time() -> None:
    """convert.timestamp computes seconds and nanos itself (it is on every statement line): it must
    agree with Timestamp.FromDatetime everywhere, before 1970 and across offsets included."""
    def protobufs(value: datetime) -> Timestamp:
        ts = Timestamp()
        ts.FromDatetime(value.astimezone(UTC))
        return ts

    rng = random.Random(7)
    values = [datetime(1970, 1, 1, tzinfo=UTC), datetime(1969, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),
              datetime(1, 1, 1, tzinfo=UTC), datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),
              datetime(2026, 11, 27, 15, 0, 0, 123_456, tzinfo=timezone(timedelta(hours=11))),
              datetime(2026, 3, 1, 12, 0)]  # naive: local time, as astimezone takes it
    values += [datetime(1, 1, 1, tzinfo=UTC) + timedelta(microseconds=rng.randrange(315_537_897_600 * 10**6))
               for _ in range(2_000)]
    assert [timestamp(v) for v in values] == [protobufs(v) for v in values]
    assert timestamp(None) is None


@pytest.mark.parametrize("first, second", [(1, 1), (127, 128), (5_000, 2**20), (2**40, 300), (2**63 - 1, 7)])
def test_a_stored_response_is_split_around_its_balances_as_protobuf_writes_it(first: int, second: int) -> None:
    """The statements fill the balances into the stored response between parts found by walking
    protobuf's own serialisation: the parts and the varints together must be that serialisation,
    whatever comes before, between and after the fields."""
    transfer = pb.TransferResponse(transfer_id="pay_0123", from_balance_cents=first, to_balance_cents=second,
                                   topped_up_cents=250, reference="XFR-ABCD-EFGH-IJKL")
    head, mid, tail = idempotency.response_around(transfer, "from_balance_cents", "to_balance_cents")
    assert head + idempotency._varint(first) + mid + idempotency._varint(second) + tail == \
        transfer.SerializeToString(deterministic=True)
    paid = pb.PayResponse(status=pb.SUCCEEDED, payment_id="pay_1", balance_cents=first, topped_up_cents=second,
                          reference="EVT-AAAA-BBBB-CCCC")
    head, tail = idempotency.response_around(paid, "balance_cents")
    assert head + idempotency._varint(first) + tail == paid.SerializeToString(deterministic=True)


def test_a_response_without_the_field_set_is_refused() -> None:
    with pytest.raises(AssertionError, match="must be set"):
        idempotency.response_around(pb.PayResponse(status=pb.SUCCEEDED, payment_id="p"), "balance_cents")
