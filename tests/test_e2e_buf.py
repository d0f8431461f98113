"""End to end: `payments-server` as a subprocess, called with `buf curl --protocol grpc` through
server reflection (no proto files), and stopped with SIGTERM."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import re
import subprocess
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import grpc
import pytest
from conftest import record_backend, scratch_database
from grpc_health.v1 import health_pb2, health_pb2_grpc
from server_process import ServerProcess
from sqlalchemy import create_engine, text

from cobalt.payments.v1 import payments_pb2 as pb
from cobalt.payments.v1 import payments_pb2_grpc as pb_grpc
from server.domain.types import organisation_account

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
BUF = ROOT / "node_modules" / ".bin" / "buf"
SERVICE = "cobalt.payments.v1.PaymentsService"
APP_TOKEN, ADMIN_TOKEN = "e2e-app-" + uuid.uuid4().hex, "e2e-admin-" + uuid.uuid4().hex
SPEC = f"{APP_TOKEN}=e2e-app:app,{ADMIN_TOKEN}=e2e-ops:admin"


@pytest.fixture(scope="module")
def buf() -> Path:
    if not BUF.exists():
        message = f"{BUF.relative_to(ROOT)} is missing: `make test` installs it (npm ci)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    return BUF


@pytest.fixture(autouse=True)
def _count_on_postgresql(request):  # noqa: ANN001, ANN202
    """Tests that call the server process count in the per-database summary."""
    yield
    if "proc" in request.fixturenames:
        record_backend("postgresql")


@pytest.fixture(scope="module")
def proc(tmp_path_factory):  # noqa: ANN001, ANN201
    # a zone without summer time, far from Sydney's offset: the CSV must follow the setting
    srv = ServerProcess(scratch_database(), SPEC, PAYMENTS_TIMEZONE="Asia/Kolkata").start()
    yield srv
    assert srv.stop() == 0


def curl(buf: Path, proc: ServerProcess, *args: str, method: str | None = None, body: dict | None = None,
         token: str | None = None) -> subprocess.CompletedProcess:
    cmd = [str(buf), "curl", "--protocol", "grpc", "--http2-prior-knowledge", "--timeout", "20s"]
    if token:
        cmd += ["-H", f"authorization: Bearer {token}"]
    if body is not None:
        cmd += ["-d", json.dumps(body)]
    url = f"http://{proc.target}" + (f"/{SERVICE}/{method}" if method else "")
    return subprocess.run([*cmd, *args, url], capture_output=True, text=True, timeout=60)


def ok(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout) if result.stdout.strip() else {}


def test_lists_services_and_methods_through_reflection(buf, proc):
    services = curl(buf, proc, "--list-services")
    assert services.returncode == 0, services.stderr
    assert {SERVICE, "grpc.health.v1.Health"} <= set(services.stdout.split())
    methods = curl(buf, proc, "--list-methods")
    assert methods.returncode == 0, methods.stderr
    listed = set(methods.stdout.split())
    for name in ("Pay", "GetBalance", "GetStatement", "ExportStatement", "Transfer", "Adjust", "UpsertMember",
                 "UpsertOrganisation", "Subscribe", "Settle", "HandleStripeEvent"):
        assert f"{SERVICE}/{name}" in listed


def test_pay_and_balance_with_buf_curl(buf, proc):
    ok(curl(buf, proc, method="UpsertOrganisation", token=ADMIN_TOKEN,
            body={"idempotencyKey": uuid.uuid4().hex, "organisationId": 7, "name": "E2E Club"}))
    adjusted = ok(curl(buf, proc, method="Adjust", token=ADMIN_TOKEN,
                       body={"idempotencyKey": uuid.uuid4().hex, "account": {"memberId": 1}, "amountCents": 5000,
                             "description": "opening"}))
    assert adjusted["balanceCents"] == "5000"
    pay_body = {"idempotencyKey": uuid.uuid4().hex, "memberId": 1, "organisationId": 7, "amountCents": 1250,
                "description": "Entry", "paymentType": "ENTRY_TO_EVENT", "routeCode": "EVT"}
    paid = ok(curl(buf, proc, method="Pay", token=APP_TOKEN, body=pay_body))
    assert paid["status"] == "SUCCEEDED" and paid["balanceCents"] == "3750" and paid["paymentId"]
    replay = curl(buf, proc, "-v", method="Pay", token=APP_TOKEN, body=pay_body)
    assert json.loads(replay.stdout) == paid
    assert "idempotent-replay: true" in replay.stderr.lower()
    member = ok(curl(buf, proc, method="GetBalance", token=APP_TOKEN, body={"account": {"memberId": 1}}))
    assert member["balanceCents"] == "3750" and member["lastMovementAt"]
    club = ok(curl(buf, proc, method="GetBalance", token=APP_TOKEN, body={"account": {"organisationId": 7}}))
    assert (club["balanceCents"], club["name"]) == ("1250", "E2E Club")
    statement = ok(curl(buf, proc, method="GetStatement", token=APP_TOKEN, body={"account": {"memberId": 1}}))
    assert [line["typeName"] for line in statement["lines"]] == ["Entry to an event", "Manual Adjustment"]

    export = curl(buf, proc, method="ExportStatement", token=APP_TOKEN, body={"account": {"memberId": 1}})
    assert export.returncode == 0, export.stderr
    chunks = json.loads("[" + export.stdout.replace("}\n{", "},{") + "]")
    rows = list(csv.reader(io.StringIO(b"".join(base64.b64decode(c["data"]) for c in chunks).decode())))
    assert rows[0] == ["Date", "Counterparty", "Reference", "Type", "Description", "Amount", "Balance"]
    assert [r[5] for r in rows[1:]] == ["-12.50", "50.00"]
    line_time = datetime.fromisoformat(statement["lines"][0]["time"].replace("Z", "+00:00"))
    assert rows[1][0] == line_time.astimezone(ZoneInfo("Asia/Kolkata")).strftime("%Y-%m-%d %H:%M:%S")


@pytest.mark.parametrize(("method", "body", "token", "code"), [
    ("Pay", {"memberId": 1, "organisationId": 404, "amountCents": 100}, APP_TOKEN, grpc.StatusCode.NOT_FOUND),
    ("Pay", {"memberId": 1, "organisationId": 7, "amountCents": 0}, APP_TOKEN, grpc.StatusCode.INVALID_ARGUMENT),
    ("GetBalance", {"account": {"memberId": 1}}, None, grpc.StatusCode.UNAUTHENTICATED),
    ("Adjust", {"account": {"memberId": 1}, "amountCents": 1, "description": "x"}, APP_TOKEN,
     grpc.StatusCode.PERMISSION_DENIED),
], ids=["not-found", "invalid", "unauthenticated", "permission-denied"])
def test_errors_give_a_non_zero_exit_code(buf, proc, method, body, token, code):
    if method in ("Pay", "Adjust"):
        body = {"idempotencyKey": uuid.uuid4().hex, **body}
    result = curl(buf, proc, method=method, token=token, body=body)
    assert result.returncode != 0
    assert result.returncode == 8 * code.value[0], "buf curl exits with 8 × the gRPC status code"
    error = json.loads(result.stderr[result.stderr.index("{"):])
    assert error["code"] == code.name.lower()
    assert error["message"]


def test_sigterm_lets_an_in_flight_call_finish_then_exits_zero(tmp_path):
    """A Pay waiting on the database when SIGTERM arrives still completes; then the process exits 0."""
    db_url = scratch_database()
    srv = ServerProcess(db_url, SPEC, PAYMENTS_SHUTDOWN_GRACE_S="10", PAYMENTS_LOCK_TIMEOUT_MS="20000").start()
    try:
        with grpc.insecure_channel(srv.target) as channel:
            stub = pb_grpc.PaymentsServiceStub(channel)
            admin_md = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
            stub.UpsertOrganisation(pb.UpsertOrganisationRequest(idempotency_key="o", organisation_id=7, name="C"),
                                    metadata=admin_md, timeout=10)
            stub.Adjust(pb.AdjustRequest(idempotency_key="a", account=pb.AccountRef(member_id=1), amount_cents=900,
                                         description="opening"), metadata=admin_md, timeout=10)
            blocker = create_engine(db_url).connect()
            # holds the club's account row: the next Pay waits for it
            blocker.execute(text("SELECT 1 FROM accounts WHERE id = :id FOR UPDATE"), {"id": organisation_account(7)})
            outcome: dict = {}

            def pay() -> None:
                try:
                    outcome["resp"] = stub.Pay(
                        pb.PayRequest(idempotency_key="p", member_id=1, organisation_id=7, amount_cents=400),
                        metadata=(("authorization", f"Bearer {APP_TOKEN}"),), timeout=20)
                except grpc.RpcError as err:
                    outcome["error"] = err

            health_seen: list[int] = []
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=30)

            def follow_health() -> None:
                try:
                    for update in watch:
                        health_seen.append(update.status)
                except grpc.RpcError:
                    pass  # the stream ends with the server

            watcher = threading.Thread(target=follow_health)
            watcher.start()
            caller = threading.Thread(target=pay)
            caller.start()
            time.sleep(0.5)  # the Pay reaches the database and waits for the lock
            srv.proc.send_signal(15)  # SIGTERM while the Pay is in flight
            deadline = time.monotonic() + 5
            while health_pb2.HealthCheckResponse.NOT_SERVING not in health_seen and time.monotonic() < deadline:
                time.sleep(0.1)
            assert srv.proc.poll() is None, "the server waits for the in-flight call"
            assert health_seen[:1] == [health_pb2.HealthCheckResponse.SERVING]
            assert health_pb2.HealthCheckResponse.NOT_SERVING in health_seen, "health says NOT_SERVING first"
            blocker.rollback()
            blocker.close()
            caller.join(20)
            watch.cancel()
            watcher.join(10)
        assert "error" not in outcome, outcome.get("error")
        assert outcome["resp"].status == pb.SUCCEEDED and outcome["resp"].balance_cents == 500
        assert srv.stop() == 0
        events = [r.get("event") for r in srv.records()]
        # grpc may log its own note about the health Watch stream it cut short after ours
        ours = [e for e in events if not str(e).startswith("Exception not handled by _handle_exceptions")]
        assert ours[-1] == "stopped"
        # grpc prints a traceback of its own when a stream's cancel meets the shutdown: nothing of ours in it
        grpc_note = re.compile(r'Traceback \(most recent call last\):\n  File "[^"]*aio/server\.pyx\.pxi", line \d+, '
                               r"in grpc\._cython\.cygrpc\._schedule_rpc_coro\nasyncio\.exceptions\.CancelledError\n")
        assert "Traceback" not in grpc_note.sub("", srv.stderr)
        record_backend("postgresql")
    finally:
        if srv.proc is not None and srv.proc.poll() is None:
            srv.stop()


# ---- the proto as a product: reflection v1 and v1alpha, google.rpc details, buf lint and breaking

@pytest.fixture(scope="module")
def pg_proc(postgres_url):  # noqa: ANN001, ANN201
    srv = ServerProcess(postgres_url, SPEC).start()
    yield srv
    assert srv.stop() == 0


@pytest.mark.postgres
@pytest.mark.parametrize("protocol", ["grpc-v1", "grpc-v1alpha"])
def test_reflection_serves_v1_and_v1alpha(buf, pg_proc, protocol):
    listed = curl(buf, pg_proc, "--reflect-protocol", protocol, "--list-services")
    assert listed.returncode == 0, listed.stderr
    assert {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection"} <= set(listed.stdout.split())
    methods = curl(buf, pg_proc, "--reflect-protocol", protocol, "--list-methods")
    assert f"{SERVICE}/Pay" in methods.stdout.split()


@pytest.mark.postgres
def test_reflection_describes_the_google_rpc_error_details(pg_proc):
    """A tool that decodes an error's details through reflection (grpcurl does) finds
    google.rpc.BadRequest there, over v1 as over v1alpha."""
    from google.protobuf import descriptor_pb2
    from grpc_reflection.v1alpha import reflection_pb2

    def ask(service: str, symbol: str) -> list[str]:
        with grpc.insecure_channel(pg_proc.target) as channel:
            call = channel.stream_stream(f"/{service}/ServerReflectionInfo",
                                         request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                                         response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
            (answer,) = list(call(iter([reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol)]),
                                  timeout=10))
        assert not answer.HasField("error_response"), answer.error_response
        files = [descriptor_pb2.FileDescriptorProto.FromString(raw)
                 for raw in answer.file_descriptor_response.file_descriptor_proto]
        return [f"{f.package}.{m.name}" for f in files for m in f.message_type]

    for service in ("grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"):
        assert "google.rpc.BadRequest" in ask(service, "google.rpc.BadRequest")
        assert "cobalt.payments.v1.PayRequest" in ask(service, SERVICE)


@pytest.mark.postgres
def test_buf_curl_shows_the_field_violation(buf, pg_proc):
    """buf curl prints the error's details by type name; the BadRequest in them names the field."""
    from google.rpc import error_details_pb2

    result = curl(buf, pg_proc, method="Pay", token=APP_TOKEN, body={
        "idempotencyKey": uuid.uuid4().hex, "memberId": 1, "organisationId": 7, "amountCents": 0})
    assert result.returncode == 8 * grpc.StatusCode.INVALID_ARGUMENT.value[0], result.stderr
    error = json.loads(result.stderr[result.stderr.index("{"):])
    assert "amount_cents" in error["message"]
    (detail,) = error["details"]
    assert detail["type"] == "google.rpc.BadRequest"
    value = detail["value"] + "=" * (-len(detail["value"]) % 4)
    violations = error_details_pb2.BadRequest.FromString(base64.b64decode(value)).field_violations
    assert [v.field for v in violations] == ["amount_cents"] and violations[0].description


@pytest.mark.postgres
def test_every_answer_carries_a_request_id_buf_curl_can_see(buf, pg_proc):
    result = curl(buf, pg_proc, "-v", "-H", "x-request-id: from-buf-curl", method="GetBalance", token=APP_TOKEN,
                  body={"account": {"memberId": 1}})
    assert result.returncode == 0, result.stderr
    assert "x-request-id: from-buf-curl" in result.stderr.lower()


def test_buf_lint_is_clean_and_breaking_changes_are_caught(buf, tmp_path):
    lint = subprocess.run([str(buf), "lint"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    same = subprocess.run([str(buf), "breaking", "--against", "protos-released"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert same.returncode == 0, same.stdout + same.stderr
    # a copy of the repository's proto with one field renamed: buf breaking refuses it
    import shutil

    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    shutil.copytree(ROOT / "protos", tmp_path / "protos")
    proto = tmp_path / "protos" / "cobalt" / "payments" / "v1" / "payments.proto"
    text = proto.read_text()
    assert "int64 amount_cents = " in text
    proto.write_text(text.replace("int64 amount_cents = ", "int64 amount_in_cents = ", 1))
    broken = subprocess.run([str(buf), "breaking", "--against", str(ROOT / "protos-released")], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert broken.returncode != 0 and "amount_in_cents" in broken.stdout + broken.stderr
