"""Encodings: timestamps computed by hand agree with protobuf's own; stored results read back the same."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta, timezone

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from server.api.convert import timestamp
from server.ledger import idempotency
from server.services.pay import PayResult
from server.services.transfer import TransferResult


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


@pytest.mark.parametrize("balance", [-(2**63), -5_000, -1, 0, 1, 2**63 - 1])
def test_a_stored_result_is_the_same_data_back(balance: int) -> None:
    """Idempotency records hold the result's data; the replay's result is equal to the first,
    whatever the sign and size of its balances."""
    paid = PayResult("pay_1", balance, "PAY-AAAA-BBBB-CCCC", topped_up_cents=0, needs_auto_top_up=balance < 0)
    moved = TransferResult("pay_2", 0, balance, "TRF-AAAA-BBBB-CCCC")
    for result in (paid, moved):
        stored = json.loads(json.dumps(idempotency.encode(result)))  # as the database keeps it
        assert idempotency.decode(stored) == result


def test_only_result_types_of_the_service_are_stored_and_read() -> None:
    with pytest.raises(AssertionError):
        idempotency.encode({"not": "a result"})
    with pytest.raises(ValueError, match="not a result type"):
        idempotency.decode({"type": "os:system", "data": {}})
