"""Channels to the payments server, for the client library, `payments-admin` and the webhook bridge
alike: TLS or mutual TLS from files named in the environment, keepalive, and retries of UNAVAILABLE
done by gRPC itself from the service config's `retryPolicy`.

    PAYMENTS_TLS_CA_FILE           CA that signed the server's certificate (turns TLS on)
    PAYMENTS_TLS=true              TLS with the system's CAs (when no CA file is given)
    PAYMENTS_TLS_CLIENT_CERT_FILE  this client's certificate, for a server that asks for one (mutual TLS)
    PAYMENTS_TLS_CLIENT_KEY_FILE   its key
    PAYMENTS_TLS_SERVER_NAME       the name to expect in the server's certificate, when the target is an address
    PAYMENTS_ALLOW_INSECURE=true   allow a plain-text channel to an address other than loopback

Retrying is safe: every request that changes money carries an idempotency key, set once by the caller
and sent unchanged on each attempt, so the server applies it once however often it arrives.
`Refund` is not retried: when Stripe cannot be reached its outcome is held for reconciliation and a
second attempt adds nothing.
"""

from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

SERVICE = "cobalt.payments.v1.PaymentsService"
MAX_MESSAGE_BYTES = 4 * 1024 * 1024

SERVICE_CONFIG = json.dumps({
    "methodConfig": [
        {
            "name": [{"service": SERVICE}],
            "retryPolicy": {
                "maxAttempts": 5,
                "initialBackoff": "0.2s",
                "maxBackoff": "5s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        },
        {"name": [{"service": SERVICE, "method": "Refund"}]},
    ],
    # a client facing a server that keeps failing stops retrying rather than multiplying the load
    "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1},
})

CHANNEL_OPTIONS: tuple[tuple[str, object], ...] = (
    ("grpc.enable_retries", 1),
    ("grpc.service_config", SERVICE_CONFIG),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # pings keep a quiet Subscribe stream alive through load balancers and find a dead server;
    # at most one per 30 s, which the server allows (server/app.py, grpc_options)
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
)

_TRUE = frozenset({"1", "true", "yes", "on"})


def _flag(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "").strip().lower() in _TRUE


def is_loopback_host(host: str) -> bool:
    """127.0.0.0/8, ::1 and localhost. Anything else (0.0.0.0, [::], a name) may be reached from
    elsewhere."""
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def target_is_local(target: str) -> bool:
    """A gRPC target (`host:port`, `dns:///host:port`, `ipv4:…`, `unix:…`) on this machine only."""
    rest = target.strip()
    if rest.startswith(("unix:", "unix-abstract:")):
        return True
    for prefix in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        if rest.startswith(prefix):
            rest = rest[len(prefix):]
            break
    addresses = rest.split(",")  # ipv4:a:1,b:2
    return all(is_loopback_host(address.rpartition(":")[0] or address) for address in addresses)


def _read(path: Path | None, what: str, name: str) -> bytes | None:
    if path is None:
        return None
    try:
        return path.expanduser().read_bytes()
    except OSError as exc:
        raise ValueError(f"{name}={path}: cannot read the {what} ({exc.strerror})") from None


@dataclass(frozen=True)
class ClientTls:
    """What a client needs for TLS: all empty means plain text."""

    enabled: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str = ""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ClientTls:
        env = os.environ if env is None else env

        def path(name: str) -> Path | None:
            value = env.get(name, "").strip()
            return Path(value) if value else None

        ca, cert, key = path("PAYMENTS_TLS_CA_FILE"), path("PAYMENTS_TLS_CLIENT_CERT_FILE"), \
            path("PAYMENTS_TLS_CLIENT_KEY_FILE")
        if (cert is None) != (key is None):
            raise ValueError("PAYMENTS_TLS_CLIENT_CERT_FILE and PAYMENTS_TLS_CLIENT_KEY_FILE go together: give both "
                             "or neither")
        enabled = _flag(env, "PAYMENTS_TLS") or ca is not None or cert is not None
        return cls(enabled, ca, cert, key, env.get("PAYMENTS_TLS_SERVER_NAME", "").strip())

    def credentials(self) -> grpc.ChannelCredentials | None:
        if not self.enabled:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca_file, "CA file", "PAYMENTS_TLS_CA_FILE"),
            private_key=_read(self.key_file, "client key", "PAYMENTS_TLS_CLIENT_KEY_FILE"),
            certificate_chain=_read(self.cert_file, "client certificate", "PAYMENTS_TLS_CLIENT_CERT_FILE"),
        )

    def options(self) -> tuple[tuple[str, object], ...]:
        return (("grpc.ssl_target_name_override", self.server_name),) if self.enabled and self.server_name else ()


def check_insecure_allowed(target: str, tls: ClientTls, allow_insecure: bool | None = None) -> None:
    """A bearer token never crosses the network in the clear: plain text only to loopback, unless
    allowed (PAYMENTS_ALLOW_INSECURE=true, or `allow_insecure`)."""
    if tls.enabled or target_is_local(target):
        return
    if allow_insecure is None:
        allow_insecure = _flag(os.environ, "PAYMENTS_ALLOW_INSECURE")
    if not allow_insecure:
        raise ValueError(f"{target} is not a loopback address and TLS is off: the token would cross the network in "
                         "the clear. Set PAYMENTS_TLS_CA_FILE (or PAYMENTS_TLS=true), or PAYMENTS_ALLOW_INSECURE=true "
                         "where something else encrypts the traffic")


def open_channel(target: str, tls: ClientTls | None = None, *, aio: bool = False,
                 options: Sequence[tuple[str, object]] = (), allow_insecure: bool | None = None):  # noqa: ANN201
    """A channel (grpc.Channel, or grpc.aio.Channel with `aio`) to the payments server; TLS from
    `tls`, else from the environment. ValueError when plain text would carry a token off this machine."""
    tls = ClientTls.from_env() if tls is None else tls
    check_insecure_allowed(target, tls, allow_insecure)
    all_options = [*CHANNEL_OPTIONS, *tls.options(), *options]
    credentials = tls.credentials()
    module = grpc.aio if aio else grpc
    if credentials is None:
        return module.insecure_channel(target, options=all_options)
    return module.secure_channel(target, credentials, options=all_options)
