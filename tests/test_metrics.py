"""Prometheus metrics on their own port, scraped after calls; request ids on every answer; the call's
log line at error level for INTERNAL."""

from __future__ import annotations

import io
import json
import time
import urllib.request
import uuid
from collections.abc import Iterator

import grpc
import pytest
from conftest import TOKENS, RunningServer, start_server
from prometheus_client.parser import text_string_to_metric_families

from clients.payments_client import PaymentsClient
from cobalt.payments.v1 import payments_pb2 as pb
from cobalt.payments.v1 import payments_pb2_grpc
from server import metrics
from server.api import call_log

pytestmark = pytest.mark.postgres

SERVICE = "cobalt.payments.v1.PaymentsService"


@pytest.fixture(scope="module")
def measured(postgres_url) -> Iterator[RunningServer]:  # noqa: ANN001
    srv = start_server(postgres_url, "postgresql", metrics_addr="127.0.0.1:0")
    yield srv
    srv.stop()


def scrape(srv: RunningServer) -> dict[tuple[str, tuple], float]:
    """Every sample of the endpoint: (name, sorted labels) → value."""
    port = srv.server.metrics_port
    assert port, "the metrics endpoint is served"
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        assert answer.status == 200
        body = answer.read().decode()
    samples = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def calls(samples: dict, method: str, code: str) -> float:
    key = ("grpc_server_handled_total", tuple(sorted({"grpc_service": SERVICE, "grpc_method": method,
                                                      "grpc_type": "unary", "grpc_code": code}.items())))
    return samples.get(key, 0.0)


def latency_count(samples: dict, method: str) -> float:
    key = ("grpc_server_handling_seconds_count", tuple(sorted({"grpc_service": SERVICE, "grpc_method": method,
                                                               "grpc_type": "unary"}.items())))
    return samples.get(key, 0.0)


def test_calls_by_method_and_code_and_their_latency(measured) -> None:  # noqa: ANN001
    before = scrape(measured)
    with measured.client("admin") as admin:
        admin.adjust(2_500, "opening", member_id=41)
        admin.adjust(1_000, "more", member_id=41)
        with pytest.raises(grpc.RpcError):
            admin.adjust(0, "zero is refused", member_id=41)
    with measured.client("app") as app, pytest.raises(grpc.RpcError):
        app.adjust(100, "not allowed", member_id=41)
    after = scrape(measured)
    assert calls(after, "Adjust", "OK") - calls(before, "Adjust", "OK") == 2
    assert calls(after, "Adjust", "INVALID_ARGUMENT") - calls(before, "Adjust", "INVALID_ARGUMENT") == 1
    assert calls(after, "Adjust", "PERMISSION_DENIED") - calls(before, "Adjust", "PERMISSION_DENIED") == 1
    assert latency_count(after, "Adjust") - latency_count(before, "Adjust") == 4
    assert ("grpc_server_handling_seconds_bucket",
            tuple(sorted({"grpc_service": SERVICE, "grpc_method": "Pay", "grpc_type": "unary",
                          "le": "0.01"}.items()))) in after, "latency is a histogram, every method listed"


def test_pool_group_commit_and_process_metrics(measured) -> None:  # noqa: ANN001
    before = scrape(measured).get(("payments_group_commit_size_count", ()), 0)
    with measured.client("admin") as admin, measured.client("app") as app:
        admin.upsert_organisation(51, "Group Club")
        admin.adjust(10_00, "credit", member_id=51)
        app.pay(51, 1_00, organisation_id=51)
        app.transfer(52, 1_00, from_member_id=51)
    assert scrape(measured)[("payments_group_commit_size_count", ())] - before == 2, "a Pay and a Transfer"
    metrics.observe_group_size(3)
    metrics.observe_group_size(40)
    samples = scrape(measured)
    assert samples[("payments_db_pool_size", ())] >= measured.server.settings.db_pool_size
    assert samples[("payments_db_pool_checked_out", ())] >= 0
    assert samples[("payments_group_commit_size_count", ())] >= 2
    assert samples[("payments_group_commit_size_bucket", (("le", "4.0"),))] >= 1
    assert samples[("payments_group_commit_size_bucket", (("le", "32.0"),))] < \
        samples[("payments_group_commit_size_bucket", (("le", "64.0"),))]
    assert ("process_cpu_seconds_total", ()) in samples


def test_event_stream_subscribers_and_lag(measured) -> None:  # noqa: ANN001
    before = scrape(measured)
    with measured.client("app") as app, measured.client("admin") as admin:
        stream = app.stream("Subscribe", pb.SubscribeRequest(after_sequence=-1), timeout_s=30)
        deadline = time.monotonic() + 10
        while scrape(measured)[("payments_event_stream_subscribers", ())] < \
                before[("payments_event_stream_subscribers", ())] + 1:
            assert time.monotonic() < deadline, "the open stream is counted"
            time.sleep(0.05)
        admin.adjust(700, "an event for the stream", member_id=42)
        event = next(stream)
        assert event.kind == pb.ADJUSTED
        during = scrape(measured)
        stream.cancel()
    assert during[("payments_event_stream_lag_seconds_count", ())] > \
        before.get(("payments_event_stream_lag_seconds_count", ()), 0)
    assert during[("payments_event_stream_published_sequence", ())] >= event.sequence
    deadline = time.monotonic() + 10
    while scrape(measured)[("payments_event_stream_subscribers", ())] != \
            before[("payments_event_stream_subscribers", ())]:
        assert time.monotonic() < deadline, "a closed stream is no longer counted"
        time.sleep(0.05)


# ---- request ids

def trailing(call) -> dict:  # noqa: ANN001
    return dict(call.trailing_metadata() or ())


def test_the_callers_request_id_comes_back_and_one_is_made_otherwise(measured) -> None:  # noqa: ANN001
    with measured.channel() as channel:
        client = payments_pb2_grpc.PaymentsServiceStub(channel)
        auth = ("authorization", f"Bearer {TOKENS['app']}")
        request = pb.GetBalanceRequest(account=pb.AccountRef(organisation_id=999_999))
        mine = "req-" + uuid.uuid4().hex
        with pytest.raises(grpc.RpcError) as failed:  # NOT_FOUND: errors carry it too
            client.GetBalance(request, metadata=(auth, ("x-request-id", mine)), timeout=10)
        assert failed.value.code() == grpc.StatusCode.NOT_FOUND
        assert trailing(failed.value)["x-request-id"] == mine
        with pytest.raises(grpc.RpcError) as refused:  # refused before any handler runs
            client.GetBalance(request, metadata=(("x-request-id", mine),), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert trailing(refused.value)["x-request-id"] == mine
        _, ok = payments_pb2_grpc.PaymentsServiceStub(channel).GetFeeSettings.with_call(
            pb.GetFeeSettingsRequest(), metadata=(("authorization", f"Bearer {TOKENS['admin']}"),), timeout=10)
        made = trailing(ok)["x-request-id"]
        assert len(made) >= 16 and made != mine
        _, again = payments_pb2_grpc.PaymentsServiceStub(channel).GetFeeSettings.with_call(
            pb.GetFeeSettingsRequest(), metadata=(("authorization", f"Bearer {TOKENS['admin']}"),), timeout=10)
        assert trailing(again)["x-request-id"] != made, "each call its own"
        junk = "x" * 500
        _, long_id = payments_pb2_grpc.PaymentsServiceStub(channel).GetFeeSettings.with_call(
            pb.GetFeeSettingsRequest(), metadata=(("authorization", f"Bearer {TOKENS['admin']}"),
                                                  ("x-request-id", junk)), timeout=10)
        assert trailing(long_id)["x-request-id"] != junk, "an unreasonable id is replaced, not echoed"


def test_an_idempotent_replay_keeps_its_marker_and_the_request_id(measured) -> None:  # noqa: ANN001
    with measured.client("admin") as admin:
        request = pb.AdjustRequest(idempotency_key=uuid.uuid4().hex, account=pb.AccountRef(member_id=43),
                                   amount_cents=300, description="once")
        admin.call("Adjust", request)
        _, replay = admin.stub.Adjust.with_call(request, metadata=(*admin._metadata, ("x-request-id", "replay-1")),
                                                timeout=10)
    md = trailing(replay)
    assert md["idempotent-replay"] == "true" and md["x-request-id"] == "replay-1"


def test_a_stream_carries_its_request_id_in_the_initial_metadata(measured) -> None:  # noqa: ANN001
    with measured.client("app") as app:
        stream = app.stub.Subscribe(pb.SubscribeRequest(after_sequence=-1),
                                    metadata=(*app._metadata, ("x-request-id", "stream-7")), timeout=30)
        assert dict(stream.initial_metadata())["x-request-id"] == "stream-7"
        stream.cancel()


def test_internal_is_logged_at_error_level_with_its_request_id(measured, monkeypatch) -> None:  # noqa: ANN001
    from server.services import fees

    def broken(conn):  # noqa: ANN001, ANN202
        raise RuntimeError("a bug")

    monkeypatch.setattr(fees, "current_fee_settings", broken)
    captured = io.StringIO()
    call_log.configure(captured)
    try:
        with measured.client("admin") as admin, pytest.raises(grpc.RpcError) as failed:
            admin.stub.GetFeeSettings(pb.GetFeeSettingsRequest(),
                                      metadata=(*admin._metadata, ("x-request-id", "bug-1")), timeout=10)
        assert failed.value.code() == grpc.StatusCode.INTERNAL
        assert "bug-1" in failed.value.details()
        with measured.client("admin") as admin:
            admin.call("GetAdminSummary", pb.GetAdminSummaryRequest())  # an OK call, for contrast
        deadline = time.monotonic() + 5
        while captured.getvalue().count("\n") < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        call_log.configure(None)
    lines = [json.loads(line) for line in captured.getvalue().splitlines()]
    by_method = {line["method"]: line for line in lines}
    assert by_method["GetFeeSettings"]["level"] == "error"
    assert by_method["GetFeeSettings"]["status"] == "INTERNAL"
    assert by_method["GetFeeSettings"]["request_id"] == "bug-1"
    assert by_method["GetAdminSummary"]["level"] == "info"


def test_client_retries_unavailable_through_the_service_config(measured, monkeypatch) -> None:  # noqa: ANN001
    """A call that meets UNAVAILABLE is sent again by gRPC itself (retryPolicy), with the same
    idempotency key, and succeeds once the server answers."""
    from server.services import fees

    real = fees.current_fee_settings
    seen = []

    def flaky(conn):  # noqa: ANN001, ANN202
        seen.append(1)
        if len(seen) < 3:
            from server.domain.errors import Unavailable

            raise Unavailable("the database is unavailable")
        return real(conn)

    monkeypatch.setattr(fees, "current_fee_settings", flaky)
    with PaymentsClient(measured.target, TOKENS["admin"], timeout_s=20) as admin:
        answer = admin.get_fee_settings()
    assert answer.current.version >= 0
    assert len(seen) == 3, "two UNAVAILABLE answers, then the third attempt"


# ---- the webhook bridge: request ids forwarded, structlog lines in the server's schema, webhook metrics

@pytest.mark.e2e
def test_the_bridge_forwards_the_request_id_logs_in_the_servers_schema_and_counts_outcomes(measured) -> None:  # noqa: ANN001
    import os
    import subprocess
    import sys
    import threading
    from pathlib import Path

    from stripe_support import WEBHOOK_SECRET, event_body, post_webhook, stripe_signature

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PAYMENTS_", "BRIDGE_", "STRIPE_"))}
    env.update(BRIDGE_HTTP_ADDR="127.0.0.1:0", BRIDGE_METRICS_ADDR="127.0.0.1:0", BRIDGE_GRPC_TARGET=measured.target,
               BRIDGE_TOKEN=TOKENS["bridge"], STRIPE_WEBHOOK_SECRET=WEBHOOK_SECRET)
    script = Path(sys.executable).with_name("payments-webhook-bridge")
    proc = subprocess.Popen([str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[dict] = []

    def read() -> None:
        for raw in proc.stdout:  # type: ignore[union-attr]
            try:
                lines.append(json.loads(raw))
            except ValueError:
                lines.append({"unparsed": raw})

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    captured = io.StringIO()
    call_log.configure(captured)
    try:
        deadline = time.monotonic() + 30
        while not any(line.get("event") == "bridge serving" for line in lines):
            assert proc.poll() is None, proc.stderr.read()  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "the bridge says it is serving"
            time.sleep(0.05)
        serving = next(line for line in lines if line.get("event") == "bridge serving")
        url = f"http://{serving['addr']}/stripe/webhook"
        body = event_body("customer.created", {"id": "cus_rid", "object": "customer"})
        request = urllib.request.Request(url, data=body, method="POST", headers={
            "Content-Type": "application/json", "Stripe-Signature": stripe_signature(body),
            "X-Request-Id": "hook-42"})
        with urllib.request.urlopen(request, timeout=30) as answer:
            assert answer.status == 200
            assert answer.headers["X-Request-Id"] == "hook-42"
        status, _ = post_webhook(url, body, "t=1,v1=bad")
        assert status == 400
        deadline = time.monotonic() + 5
        while not any(line.get("stripe_event") == json.loads(body)["id"] for line in lines) or \
                '"hook-42"' not in captured.getvalue():
            assert time.monotonic() < deadline, "the bridge and the server log the webhook"
            time.sleep(0.05)
        with urllib.request.urlopen(f"http://127.0.0.1:{serving['metrics_port']}/metrics", timeout=10) as answer:
            scraped = {(s.name, tuple(sorted(s.labels.items()))): s.value
                       for family in text_string_to_metric_families(answer.read().decode())
                       for s in family.samples}
    finally:
        call_log.configure(None)
        proc.terminate()
        proc.wait(20)
    server_line = next(json.loads(line) for line in captured.getvalue().splitlines() if '"hook-42"' in line)
    assert (server_line["method"], server_line["principal"]) == ("HandleStripeEvent", "stripe-bridge")
    hook = next(line for line in lines if line.get("stripe_event") == json.loads(body)["id"])
    assert hook["request_id"] == "hook-42" and hook["level"] == "info" and hook["outcome"] == "acknowledged"
    assert set(hook) >= {"event", "level", "timestamp", "request_id", "status", "duration_ms"}
    bad = next(line for line in lines if line.get("status") == 400)
    assert bad["level"] == "warning" and len(bad["request_id"]) >= 16
    assert scraped[("payments_webhooks_total", (("outcome", "acknowledged"),))] == 1
    assert scraped[("payments_webhooks_total", (("outcome", "bad_request"),))] == 1
    assert scraped[("payments_webhooks_total", (("outcome", "applied"),))] == 0
