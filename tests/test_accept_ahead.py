"""Accept-ahead: the server keeps several requests for each method's next call open in gRPC core.
Calls it takes run exactly as grpc.aio's own: authenticated, logged, answered (every method's
handler is registered guarded, for both). When grpc's
internals are not as expected (or it is turned off) the server serves on grpc.aio's loop alone, and
a stop leaves nothing open."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import grpc
from conftest import RunningServer, record_backend, scratch_database, start_server

from clients.payments_client import new_idempotency_key
from cobalt.payments.v1 import payments_pb2 as pb
from cobalt.payments.v1 import payments_pb2_grpc as pb_grpc
from server.api import accept_ahead
from server.config import Settings

PAYMENT_METHODS = len(pb.DESCRIPTOR.services_by_name["PaymentsService"].methods)


def _fund(srv: RunningServer, members: int, club: int = 7) -> None:
    with srv.client("admin") as admin:
        admin.upsert_organisation(club, "North Shore Bridge Club")
        for m in range(1, members + 1):
            admin.upsert_member(m, f"Member {m}")
            admin.adjust(50_000, "opening", member_id=m)


def _pay_concurrently(srv: RunningServer, members: int, club: int = 7) -> list[pb.PayResponse]:
    with srv.client("app") as app, ThreadPoolExecutor(members) as pool:
        return list(pool.map(lambda m: app.pay(m, 1_000, organisation_id=club, description="entry"),
                             range(1, members + 1)))


def test_the_pinned_grpc_has_what_accept_ahead_needs() -> None:
    async def check() -> str:
        server = grpc.aio.server()
        try:
            return accept_ahead._missing_internals(server)
        finally:
            await server.stop(None)

    assert asyncio.run(check()) == ""


def test_requests_are_kept_open_for_every_method_and_calls_taken_are_answered(server) -> None:  # noqa: ANN001
    srv = server.server
    assert srv.accept_ahead.unavailable == ""
    assert len(srv.accept_ahead.handlers) == PAYMENT_METHODS
    assert srv.accept_ahead.open_requests == srv.settings.grpc_accept_ahead * PAYMENT_METHODS
    _fund(server, 24)
    before = srv.accept_ahead.accepted
    answers = _pay_concurrently(server, 24)
    assert len({a.payment_id for a in answers}) == 24
    assert all(a.balance_cents == 49_000 for a in answers)
    assert srv.accept_ahead.accepted > before, "no call was taken by accept-ahead"
    with server.client("admin") as admin:
        assert admin.balance_cents(organisation_id=7) == 24_000
    assert srv.accept_ahead.open_requests == srv.settings.grpc_accept_ahead * PAYMENT_METHODS


def test_calls_taken_ahead_are_authenticated_like_any_other(server) -> None:  # noqa: ANN001
    srv = server.server
    before = srv.accept_ahead.accepted
    codes = []
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.PaymentsServiceStub(channel)
        for token in [None, "wrong-token"] * 10:
            metadata = () if token is None else (("authorization", f"Bearer {token}"),)
            try:
                stub.Pay(pb.PayRequest(idempotency_key=new_idempotency_key(), member_id=1, organisation_id=7,
                                       amount_cents=100), metadata=metadata, timeout=10)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as err:
                codes.append(err.code())
    assert codes == [grpc.StatusCode.UNAUTHENTICATED] * 20
    # core hands a call to whichever request is open: most of these reached accept-ahead's
    assert srv.accept_ahead.accepted - before >= 10


def _own_server(tmp_path, **overrides) -> RunningServer:  # noqa: ANN001, ANN003
    srv = start_server(scratch_database(), "postgresql", **overrides)
    record_backend("postgresql")
    return srv


def _serves_on_grpc_aio_alone(srv: RunningServer, why_off: str) -> None:
    try:
        assert why_off in srv.server.accept_ahead.unavailable
        assert srv.server.accept_ahead.open_requests == 0
        _fund(srv, 8)
        assert [a.balance_cents for a in _pay_concurrently(srv, 8)] == [49_000] * 8
        assert srv.server.accept_ahead.accepted == 0
    finally:
        srv.stop()


def test_turned_off_the_server_serves_on_grpc_aio_alone(tmp_path) -> None:  # noqa: ANN001
    _serves_on_grpc_aio_alone(_own_server(tmp_path, grpc_accept_ahead=0), "turned off")


def test_unexpected_grpc_internals_leave_it_off_and_the_server_serving(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setattr(accept_ahead, "_HANDLE_RPC_ARGS", ("method_name", "something_else"))
    _serves_on_grpc_aio_alone(_own_server(tmp_path), "_handle_rpc")


def test_stop_leaves_no_request_open_and_a_restart_accepts_again(tmp_path) -> None:  # noqa: ANN001
    srv = _own_server(tmp_path)
    addr = srv.target
    _fund(srv, 4)
    _pay_concurrently(srv, 4)
    first = srv.server.accept_ahead
    srv.stop()
    assert first.open_requests == 0 and not first._acceptors and not first._calls
    again = start_server(srv.database_url, "postgresql", addr=addr)
    try:
        assert again.server.accept_ahead.open_requests == Settings().grpc_accept_ahead * PAYMENT_METHODS
        answers = _pay_concurrently(again, 4)
        assert [a.balance_cents for a in answers] == [48_000] * 4
    finally:
        again.stop()


def test_every_method_of_the_service_is_guarded(server) -> None:  # noqa: ANN001
    """Handlers are wrapped at registration, not by an interceptor: every method of the service,
    called without a token (an empty request of its type), is refused before its handler runs."""
    service = pb.DESCRIPTOR.services_by_name["PaymentsService"]
    registered = server.server.accept_ahead.handlers
    assert set(registered) == {f"/{service.full_name}/{m.name}" for m in service.methods}
    refused = {}
    with grpc.insecure_channel(server.target) as channel:
        for method in service.methods:
            request_type = getattr(pb, method.input_type.name)
            path = f"/{service.full_name}/{method.name}"
            if method.server_streaming:
                call = channel.unary_stream(path, request_serializer=request_type.SerializeToString)
                try:
                    list(call(request_type(), timeout=10))
                    refused[method.name] = grpc.StatusCode.OK
                except grpc.RpcError as err:
                    refused[method.name] = err.code()
            else:
                call = channel.unary_unary(path, request_serializer=request_type.SerializeToString)
                try:
                    call(request_type(), timeout=10)
                    refused[method.name] = grpc.StatusCode.OK
                except grpc.RpcError as err:
                    refused[method.name] = err.code()
    assert refused == {m.name: grpc.StatusCode.UNAUTHENTICATED for m in service.methods}
