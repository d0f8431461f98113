"""Authentication, roles and the per-call log line: one JSON line per call with method, principal,
status and duration; never a token. The server runs as the `payments-server` subprocess so that
what is checked is exactly what it prints."""

from __future__ import annotations

import time
import uuid

import grpc
import pytest
from conftest import record_backend, scratch_database
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from server_process import ServerProcess

from cobalt.payments.v1 import payments_pb2 as pb
from cobalt.payments.v1 import payments_pb2_grpc as pb_grpc
from server.api.auth import TokenConfigError, allowed, digest, parse_tokens

pytestmark = pytest.mark.e2e

APP_TOKEN = "app-" + uuid.uuid4().hex
ADMIN_TOKEN = "admin-" + uuid.uuid4().hex
BRIDGE_TOKEN = "bridge-" + uuid.uuid4().hex
WRONG_TOKEN = "wrong-" + uuid.uuid4().hex
HASHED_TOKEN = "hashed-" + uuid.uuid4().hex
SPEC = (f"{APP_TOKEN}=shop:app,{ADMIN_TOKEN}=ops:admin,{BRIDGE_TOKEN}=bridge:stripe-bridge,"
        f"sha256:{digest(HASHED_TOKEN)}=hashed-svc:app")


@pytest.fixture(autouse=True)
def _count_on_postgresql(request):  # noqa: ANN001, ANN202
    """Tests that call the server process count in the per-database summary."""
    yield
    if "proc" in request.fixturenames:
        record_backend("postgresql")


@pytest.fixture(scope="module")
def proc(tmp_path_factory):  # noqa: ANN001, ANN201
    srv = ServerProcess(scratch_database(), SPEC).start()
    yield srv
    srv.stop()


def rpc(proc: ServerProcess, method: str, request, token: str | None, request_id: str):  # noqa: ANN001, ANN201
    md = [("x-request-id", request_id)]
    if token is not None:
        md.append(("authorization", f"Bearer {token}"))
    with grpc.insecure_channel(proc.target) as channel:
        try:
            result = getattr(pb_grpc.PaymentsServiceStub(channel), method)(request, metadata=md, timeout=30)
            if method == "ExportStatement":
                list(result)  # a stream: read it to the end
            return grpc.StatusCode.OK
        except grpc.RpcError as err:
            return err.code()


def test_one_json_line_per_call_and_never_a_token(proc):
    key = uuid.uuid4().hex
    calls = [
        ("UpsertOrganisation", pb.UpsertOrganisationRequest(idempotency_key=key, organisation_id=7, name="Club"),
         ADMIN_TOKEN, "ops", "OK"),
        ("UpsertOrganisation", pb.UpsertOrganisationRequest(idempotency_key=key, organisation_id=7, name="Club"),
         ADMIN_TOKEN, "ops", "OK"),  # a replay is a call too
        ("Adjust", pb.AdjustRequest(idempotency_key=uuid.uuid4().hex, account=pb.AccountRef(member_id=1),
                                    amount_cents=5_000, description="opening"), ADMIN_TOKEN, "ops", "OK"),
        ("Pay", pb.PayRequest(idempotency_key=uuid.uuid4().hex, member_id=1, organisation_id=7, amount_cents=100),
         APP_TOKEN, "shop", "OK"),
        ("GetBalance", pb.GetBalanceRequest(account=pb.AccountRef(member_id=1)), HASHED_TOKEN, "hashed-svc", "OK"),
        ("GetBalance", pb.GetBalanceRequest(account=pb.AccountRef(member_id=1)), WRONG_TOKEN, None,
         "UNAUTHENTICATED"),
        ("GetBalance", pb.GetBalanceRequest(account=pb.AccountRef(member_id=1)), None, None, "UNAUTHENTICATED"),
        ("Adjust", pb.AdjustRequest(idempotency_key=uuid.uuid4().hex, account=pb.AccountRef(member_id=1),
                                    amount_cents=1, description="x"), APP_TOKEN, "shop", "PERMISSION_DENIED"),
        ("Pay", pb.PayRequest(idempotency_key=uuid.uuid4().hex, member_id=1, organisation_id=7, amount_cents=0),
         APP_TOKEN, "shop", "INVALID_ARGUMENT"),
        ("Pay", pb.PayRequest(idempotency_key=uuid.uuid4().hex, member_id=1, organisation_id=7,
                              amount_cents=1_000_000), APP_TOKEN, "shop", "FAILED_PRECONDITION"),
        ("GetBalance", pb.GetBalanceRequest(account=pb.AccountRef(member_id=1)), BRIDGE_TOKEN, "bridge",
         "PERMISSION_DENIED"),
        ("ExportStatement", pb.ExportStatementRequest(account=pb.AccountRef(member_id=1)), APP_TOKEN, "shop", "OK"),
        ("ExportStatement", pb.ExportStatementRequest(account=pb.AccountRef(organisation_id=404)), APP_TOKEN, "shop",
         "NOT_FOUND"),
    ]
    ids = []
    for method, request, token, _, status in calls:
        request_id = uuid.uuid4().hex[:16]
        ids.append(request_id)
        assert rpc(proc, method, request, token, request_id).name == status, method
    # health checks and reflection are open and not per-call logged as service calls
    with grpc.insecure_channel(proc.target) as channel:
        assert health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status == \
            health_pb2.HealthCheckResponse.SERVING

    deadline = time.monotonic() + 10  # stdout is read by a thread: let it catch up
    while True:
        by_id: dict[str, list[dict]] = {}
        for record in proc.records():
            if record.get("event") == "rpc":
                by_id.setdefault(record.get("request_id"), []).append(record)
        if all(i in by_id for i in ids) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    for (method, _, _, principal, status), request_id in zip(calls, ids, strict=True):
        lines = by_id.get(request_id, [])
        assert len(lines) == 1, f"{method} {status}: expected one log line, got {lines}"
        line = lines[0]
        assert (line["method"], line["principal"], line["status"]) == (method, principal, status)
        assert isinstance(line["duration_ms"], int | float) and line["duration_ms"] >= 0
        assert line["level"] == "info" and line["timestamp"]
    not_json = [line for line in proc.lines if not line.startswith("{")]
    assert not_json == [], "every line on stdout is one JSON object (migrations included)"
    assert len(proc.records()) == len(proc.lines)
    output = "\n".join(proc.lines)
    for token in (APP_TOKEN, ADMIN_TOKEN, BRIDGE_TOKEN, WRONG_TOKEN, HASHED_TOKEN):
        assert token not in output, "a token appeared in the log"
        assert token not in proc.stderr


def _log_lines(proc: ServerProcess, request_id: str, timeout_s: float = 10) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while True:
        lines = [r for r in proc.records() if r.get("event") == "rpc" and r.get("request_id") == request_id]
        if lines or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def test_a_stream_the_caller_leaves_is_logged_cancelled(proc):
    request_id = uuid.uuid4().hex[:16]
    md = [("x-request-id", request_id), ("authorization", f"Bearer {APP_TOKEN}")]
    with grpc.insecure_channel(proc.target) as channel:
        stream = pb_grpc.PaymentsServiceStub(channel).Subscribe(pb.SubscribeRequest(after_sequence=-1), metadata=md)
        time.sleep(0.3)  # the stream is open and waiting for events
        stream.cancel()
    lines = _log_lines(proc, request_id)
    assert [(line["method"], line["principal"], line["status"]) for line in lines] == [("Subscribe", "shop", "CANCELLED")]


def test_reflection_is_open(proc):
    with grpc.insecure_channel(proc.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        [resp] = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                 timeout=10))
    names = {s.name for s in resp.list_services_response.service}
    assert "cobalt.payments.v1.PaymentsService" in names
    assert "grpc.health.v1.Health" in names


def test_role_table():
    for method in ("Pay", "GetBalance", "GetStatement", "ExportStatement", "Transfer", "Subscribe", "Ack"):
        assert allowed("app", method) and allowed("admin", method) and not allowed("stripe-bridge", method)
    for method in ("Adjust", "UpsertMember", "UpsertOrganisation", "Settle", "SetFeeSettings", "ListBalances"):
        assert allowed("admin", method) and not allowed("app", method) and not allowed("stripe-bridge", method)
    assert allowed("stripe-bridge", "HandleStripeEvent")
    assert not allowed("admin", "HandleStripeEvent") and not allowed("app", "HandleStripeEvent")
    assert not allowed("nobody", "GetBalance")


@pytest.mark.parametrize("spec", ["tok=alice", "tok=alice:root", "=alice:app", "tok=:app"])
def test_bad_token_configuration_is_refused(spec):
    with pytest.raises(TokenConfigError):
        parse_tokens(spec)


def test_bad_token_configuration_stops_the_server(tmp_path):
    srv = ServerProcess(scratch_database(), "tok=alice:root")
    with pytest.raises(RuntimeError, match="unknown role"):
        srv.start(timeout_s=20)
    assert srv.proc is not None and srv.proc.wait(10) != 0


@pytest.mark.parametrize("method, principal, status, duration_ms, request_id", [
    ("Pay", "shop", "OK", 1.25, "abc"),
    ('Get"Balance\\', None, "NOT_FOUND", 12.0, "line\nbreak \u2028 caf\u00e9 \U0001f600"),
    ("Settle", "ops", "OK", 0.1 + 0.2, ""),
])
def test_the_call_line_is_what_json_writes_for_it(method, principal, status, duration_ms, request_id) -> None:  # noqa: ANN001
    """The line is written by hand for speed: it must be exactly json's encoding of the same dict,
    whatever a caller puts in its request id."""
    import io
    import json

    from server.api import call_log

    out, before = io.StringIO(), call_log._stream
    call_log.configure(out)
    try:
        call_log.write_call_line(method, principal, status, duration_ms, request_id)
    finally:
        call_log.configure(before)
    line = out.getvalue()
    assert line.endswith("\n") and line.count("\n") == 1
    parsed = json.loads(line)
    assert parsed == {"method": method, "principal": principal, "status": status, "duration_ms": duration_ms,
                      "request_id": request_id, "event": "rpc", "level": "info", "timestamp": parsed["timestamp"]}
    assert line[:-1] == json.dumps(parsed)
