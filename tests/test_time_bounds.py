"""Range bounds finer than the microsecond round UP, both ends (SPEC §4): times are kept to the
microsecond, `from` is inclusive and `to` exclusive, so a line at t is in [t, …) but not in
[t + 1 ns, …), and in […, t + 1 ns) but not in […, t)."""

from __future__ import annotations

import csv
import io

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from cobalt.payments.v1 import payments_pb2 as pb
from server.api.convert import optional_time


def shifted(stamp: Timestamp, nanos: int) -> Timestamp:
    total = stamp.seconds * 1_000_000_000 + stamp.nanos + nanos
    return Timestamp(seconds=total // 1_000_000_000, nanos=total % 1_000_000_000)


def ranged(request, start: Timestamp | None, end: Timestamp | None):  # noqa: ANN001, ANN201
    if start is not None:
        getattr(request, "from").CopyFrom(start)
    if end is not None:
        request.to.CopyFrom(end)
    return request


@pytest.fixture
def line_time(admin, app) -> Timestamp:  # noqa: ANN001
    """One line on organisation 7's statement, and its time (kept to the microsecond)."""
    admin.upsert_organisation(7, "Club")
    admin.adjust(10_000, "opening", member_id=1)
    app.pay(1, 1_234, organisation_id=7, payment_type=pb.ENTRY_TO_EVENT)
    [line] = app.get_statement(organisation_id=7).lines
    assert line.time.nanos % 1_000 == 0
    return line.time


@pytest.mark.parametrize(("start_ns", "end_ns", "included"), [
    (0, None, True),        # from t: inclusive
    (1, None, False),       # from t + 1 ns rounds up to t + 1 µs: after the line
    (-1, None, True),       # from t − 1 ns rounds up to t
    (-999, None, True),
    (-1_000, None, True),
    (None, 0, False),       # to t: exclusive
    (None, 1, True),        # to t + 1 ns rounds up to t + 1 µs: the line is before it
    (None, -1, False),      # to t − 1 ns rounds up to t: exclusive
    (None, 999, True),
    (-1, 1, True),
])
def test_statement_bounds_round_up(app, admin, line_time: Timestamp, start_ns, end_ns, included: bool) -> None:  # noqa: ANN001
    start = None if start_ns is None else shifted(line_time, start_ns)
    end = None if end_ns is None else shifted(line_time, end_ns)
    request = ranged(pb.GetStatementRequest(account=pb.AccountRef(organisation_id=7)), start, end)
    page = app.call("GetStatement", request)
    assert (len(page.lines) == 1) is included
    exported = b"".join(c.data for c in app.stream("ExportStatement", ranged(
        pb.ExportStatementRequest(account=pb.AccountRef(organisation_id=7)), start, end), timeout_s=10))
    rows = list(csv.reader(io.StringIO(exported.decode())))[1:]
    assert (len(rows) == 1) is included
    summary = admin.call("GetOrganisationSummary", ranged(pb.GetOrganisationSummaryRequest(organisation_id=7),
                                                          start, end))
    assert (sum(t.count for t in summary.totals) == 1) is included


def test_bounds_that_round_to_one_microsecond_are_an_empty_range(app, line_time: Timestamp) -> None:  # noqa: ANN001
    """t + 1 ns and t + 999 ns both round up to t + 1 µs: [t + 1 µs, t + 1 µs) is empty, refused as any other."""
    request = ranged(pb.GetStatementRequest(account=pb.AccountRef(organisation_id=7)), shifted(line_time, 1),
                     shifted(line_time, 999))
    with pytest.raises(grpc.RpcError) as err:
        app.call("GetStatement", request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_opening_and_closing_balances_use_the_rounded_bounds(app, line_time: Timestamp) -> None:  # noqa: ANN001
    after = app.call("GetStatement", ranged(pb.GetStatementRequest(account=pb.AccountRef(organisation_id=7)),
                                            shifted(line_time, 1), None))
    assert after.opening_balance_cents == 1_234  # the line at t is before t + 1 µs
    before = app.call("GetStatement", ranged(pb.GetStatementRequest(account=pb.AccountRef(organisation_id=7)),
                                             None, shifted(line_time, 1)))
    assert before.closing_balance_cents == 1_234


@pytest.mark.parametrize(("seconds", "nanos", "micros"), [(10, 0, 0), (10, 1, 1), (10, 999, 1), (10, 1_000, 1),
                                                          (10, 1_001, 2), (-5, 500, 1), (10, 999_999_999, 1_000_000)])
def test_optional_time_rounds_up_to_the_microsecond(seconds: int, nanos: int, micros: int) -> None:
    request = pb.GetStatementRequest()
    request.to.CopyFrom(Timestamp(seconds=seconds, nanos=nanos))
    value = optional_time(request, "to")
    assert value is not None
    assert (value.timestamp() - seconds) * 1_000_000 == pytest.approx(micros)
