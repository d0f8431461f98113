"""proto ↔ domain conversions that are computed by hand for speed agree with protobuf's own."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta, timezone

from google.protobuf.timestamp_pb2 import Timestamp

from server.api.convert import timestamp


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
