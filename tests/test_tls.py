"""TLS and mutual TLS with throwaway certificate authorities made here: the server, the client library,
payments-admin and the webhook bridge. A client that does not trust the server's CA is refused, and
under mutual TLS so is a client without a certificate or with one from another CA."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from conftest import TOKENS, RunningServer, start_server
from grpc_health.v1 import health_pb2, health_pb2_grpc
from stripe_support import post_signed
from tls_support import ThrowawayCA

from clients.channel import ClientTls, open_channel
from clients.payments_client import PaymentsClient
from webhook_bridge.app import Bridge, BridgeConfig

pytestmark = pytest.mark.postgres

ADMIN_SCRIPT = Path(sys.executable).with_name("payments-admin")


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict:  # noqa: ANN001
    directory = tmp_path_factory.mktemp("pki")
    ours, theirs = ThrowawayCA(directory, "ours"), ThrowawayCA(directory, "theirs")
    return {
        "ca": ours, "other_ca": theirs,
        "server": ours.issue("payments-server", server=True),
        "client": ours.issue("payments-app", server=False),
        "impostor_server": theirs.issue("impostor", server=True),
        "impostor_client": theirs.issue("impostor-app", server=False),
    }


@pytest.fixture(scope="module")
def tls_server(postgres_url, pki) -> Iterator[RunningServer]:  # noqa: ANN001
    srv = start_server(postgres_url, "postgresql", tls_cert_file=pki["server"].cert_file,
                       tls_key_file=pki["server"].key_file)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def mtls_server(postgres_url, pki) -> Iterator[RunningServer]:  # noqa: ANN001
    srv = start_server(postgres_url, "postgresql", tls_cert_file=pki["server"].cert_file,
                       tls_key_file=pki["server"].key_file, tls_client_ca_file=pki["ca"].cert_file)
    yield srv
    srv.stop()


def summary(target: str, tls: ClientTls) -> grpc.StatusCode:
    """An admin call over `tls`: OK, or the code it failed with."""
    with PaymentsClient(target, TOKENS["admin"], tls=tls, timeout_s=10) as client:
        try:
            client.admin_summary()
            return grpc.StatusCode.OK
        except grpc.RpcError as exc:
            return exc.code()


def test_tls_works_with_the_servers_ca(tls_server, pki) -> None:  # noqa: ANN001
    assert summary(tls_server.target, ClientTls(True, ca_file=pki["ca"].cert_file)) == grpc.StatusCode.OK
    # by name too (the certificate names localhost and 127.0.0.1)
    port = tls_server.target.rpartition(":")[2]
    assert summary(f"localhost:{port}", ClientTls(True, ca_file=pki["ca"].cert_file)) == grpc.StatusCode.OK


def test_a_client_that_trusts_another_ca_is_refused(tls_server, pki) -> None:  # noqa: ANN001
    assert summary(tls_server.target, ClientTls(True, ca_file=pki["other_ca"].cert_file)) == \
        grpc.StatusCode.UNAVAILABLE


def test_a_plain_text_client_gets_nothing_from_a_tls_server(tls_server) -> None:  # noqa: ANN001
    assert summary(tls_server.target, ClientTls()) == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_accepts_a_client_certificate_from_its_ca(mtls_server, pki) -> None:  # noqa: ANN001
    tls = ClientTls(True, ca_file=pki["ca"].cert_file, cert_file=pki["client"].cert_file,
                    key_file=pki["client"].key_file)
    assert summary(mtls_server.target, tls) == grpc.StatusCode.OK


def test_mutual_tls_refuses_a_client_without_a_certificate(mtls_server, pki) -> None:  # noqa: ANN001
    assert summary(mtls_server.target, ClientTls(True, ca_file=pki["ca"].cert_file)) == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_refuses_a_client_certificate_from_another_ca(mtls_server, pki) -> None:  # noqa: ANN001
    tls = ClientTls(True, ca_file=pki["ca"].cert_file, cert_file=pki["impostor_client"].cert_file,
                    key_file=pki["impostor_client"].key_file)
    assert summary(mtls_server.target, tls) == grpc.StatusCode.UNAVAILABLE


def test_health_is_served_over_the_same_tls(mtls_server, pki) -> None:  # noqa: ANN001
    tls = ClientTls(True, ca_file=pki["ca"].cert_file, cert_file=pki["client"].cert_file,
                    key_file=pki["client"].key_file)
    with open_channel(mtls_server.target, tls) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


def test_the_client_takes_tls_from_the_environment(mtls_server, pki, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setenv("PAYMENTS_TLS_CA_FILE", str(pki["ca"].cert_file))
    monkeypatch.setenv("PAYMENTS_TLS_CLIENT_CERT_FILE", str(pki["client"].cert_file))
    monkeypatch.setenv("PAYMENTS_TLS_CLIENT_KEY_FILE", str(pki["client"].key_file))
    with PaymentsClient(mtls_server.target, TOKENS["admin"], timeout_s=10) as client:
        assert client.admin_summary().ledger_sum_cents == 0
    monkeypatch.delenv("PAYMENTS_TLS_CLIENT_KEY_FILE")
    with pytest.raises(ValueError, match="go together"):
        PaymentsClient(mtls_server.target, TOKENS["admin"])


def test_no_token_goes_in_the_clear_off_this_machine(monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.delenv("PAYMENTS_ALLOW_INSECURE", raising=False)
    for target in ("10.1.2.3:50051", "payments.internal:50051", "dns:///payments.internal:50051"):
        with pytest.raises(ValueError, match="not a loopback address and TLS is off"):
            PaymentsClient(target, "token", tls=ClientTls())
    for target in ("127.0.0.1:50051", "localhost:50051", "[::1]:50051", "unix:/tmp/payments.sock"):
        PaymentsClient(target, "token", tls=ClientTls()).close()  # channels connect lazily: nothing is sent
    monkeypatch.setenv("PAYMENTS_ALLOW_INSECURE", "true")
    PaymentsClient("10.1.2.3:50051", "token", tls=ClientTls()).close()


@pytest.mark.e2e
def test_payments_admin_over_mutual_tls(mtls_server, pki, tmp_path) -> None:  # noqa: ANN001
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAYMENTS_")}
    env.update(HOME=str(tmp_path), PAYMENTS_TARGET=mtls_server.target, PAYMENTS_TOKEN=TOKENS["admin"],
               PAYMENTS_TLS_CA_FILE=str(pki["ca"].cert_file))
    without_cert = subprocess.run([str(ADMIN_SCRIPT), "summary"], env=env, capture_output=True, text=True, timeout=60)
    assert without_cert.returncode == 4, without_cert.stderr  # the server cannot be reached this way
    env.update(PAYMENTS_TLS_CLIENT_CERT_FILE=str(pki["client"].cert_file),
               PAYMENTS_TLS_CLIENT_KEY_FILE=str(pki["client"].key_file))
    with_cert = subprocess.run([str(ADMIN_SCRIPT), "--json", "summary"], env=env, capture_output=True, text=True,
                               timeout=60)
    assert with_cert.returncode == 0, with_cert.stderr
    assert '"ledger_sum_cents": "0"' in with_cert.stdout


def test_the_bridge_forwards_over_mutual_tls(mtls_server, pki) -> None:  # noqa: ANN001
    from conftest import run_in_own_loop
    from stripe_support import WEBHOOK_SECRET

    def bridge_with(issued) -> tuple:  # noqa: ANN001
        config = BridgeConfig(http_addr="127.0.0.1:0", grpc_target=mtls_server.target, token=TOKENS["bridge"],
                              webhook_secret=WEBHOOK_SECRET, tls_ca_file=pki["ca"].cert_file,
                              tls_cert_file=issued.cert_file if issued else None,
                              tls_key_file=issued.key_file if issued else None)
        bridge = Bridge(config)
        loop, thread, port = run_in_own_loop(bridge.start, "bridge-tls")
        return bridge, loop, thread, f"http://127.0.0.1:{port}/stripe/webhook"

    import asyncio

    for issued, expected in ((pki["client"], 200), (None, 503)):
        bridge, loop, thread, url = bridge_with(issued)
        try:
            status, answer = post_signed(url, "customer.created", {"id": "cus_tls", "object": "customer"})
            assert status == expected, answer
        finally:
            asyncio.run_coroutine_threadsafe(bridge.stop(), loop).result(30)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(30)
