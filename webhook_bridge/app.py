"""The bridge's HTTP server: `POST /stripe/webhook` and `GET /healthz`.

Bad or missing signature, a stale timestamp, or a body that is not a JSON object with an event's id
and type (`[1,2,3]`, `null`, `42` included): 400 and nothing is forwarded. Otherwise the raw verified body goes to HandleStripeEvent with the `stripe-bridge` token;
200 only once the server answered OK (it commits before answering), 5xx when the server is
unreachable or failing, so that Stripe delivers again. The server dedupes by event id.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import aiohttp.http_exceptions
import grpc
import structlog
from aiohttp import web
from prometheus_client import Counter, Histogram
from pydantic import AliasChoices, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from clients.channel import ClientTls, open_channel
from cobalt.payments.v1 import payments_pb2 as pb
from cobalt.payments.v1 import payments_pb2_grpc as pb_grpc
from server.config import ConfigError, describe_errors, split_addr
from server.metrics import MetricsEndpoint
from server.stripe_gateway import WEBHOOK_TOLERANCE_S, BadWebhook, verify_webhook

log = structlog.get_logger("payments.bridge")

MAX_BODY_BYTES = 512 * 1024
FORWARD_TIMEOUT_S = 15.0
REQUEST_ID = "X-Request-Id"
MAX_REQUEST_ID_CHARS = 128
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED,
             grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}

WEBHOOKS = Counter("payments_webhooks_total", "Stripe webhooks the bridge answered, by outcome", ("outcome",))
WEBHOOK_SECONDS = Histogram("payments_webhook_seconds", "Time the bridge took to answer a webhook",
                            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 15.0))
OUTCOMES = ("applied", "duplicate", "acknowledged", "bad_request", "refused", "server_unavailable", "server_error")
for _outcome in OUTCOMES:  # every outcome is in the first scrape, at zero
    WEBHOOKS.labels(_outcome)


def _env(*names: str):  # noqa: ANN202
    return AliasChoices(*names)


class BridgeConfig(BaseSettings):
    """The bridge's settings (its table in the README); each checked at start."""

    model_config = SettingsConfigDict(frozen=True, extra="forbid", populate_by_name=True, env_ignore_empty=True,
                                      case_sensitive=False, hide_input_in_errors=True)

    http_addr: str = Field("127.0.0.1:8080", validation_alias=_env("BRIDGE_HTTP_ADDR"))
    grpc_target: str = Field("127.0.0.1:50051", validation_alias=_env("BRIDGE_GRPC_TARGET"))
    token: str = Field("", repr=False, validation_alias=_env("BRIDGE_TOKEN"))
    webhook_secret: str = Field("", repr=False, validation_alias=_env("STRIPE_WEBHOOK_SECRET"))
    tolerance_s: int = Field(WEBHOOK_TOLERANCE_S, ge=1, le=3600, validation_alias=_env("BRIDGE_WEBHOOK_TOLERANCE_S"))
    metrics_addr: str = Field("", validation_alias=_env("BRIDGE_METRICS_ADDR"))  # empty: off
    # the channel to the server: TLS as every client takes it (clients/channel.py)
    tls: bool = Field(False, validation_alias=_env("PAYMENTS_TLS"))
    tls_ca_file: Path | None = Field(None, validation_alias=_env("PAYMENTS_TLS_CA_FILE"))
    tls_cert_file: Path | None = Field(None, validation_alias=_env("PAYMENTS_TLS_CLIENT_CERT_FILE"))
    tls_key_file: Path | None = Field(None, validation_alias=_env("PAYMENTS_TLS_CLIENT_KEY_FILE"))
    tls_server_name: str = Field("", validation_alias=_env("PAYMENTS_TLS_SERVER_NAME"))
    allow_insecure: bool = Field(False, validation_alias=_env("PAYMENTS_ALLOW_INSECURE"))

    @field_validator("http_addr", "metrics_addr")
    @classmethod
    def _addr(cls, value: str) -> str:
        if value.strip():
            split_addr(value)
        return value.strip()

    @field_validator("tls_ca_file", "tls_cert_file", "tls_key_file")
    @classmethod
    def _file(cls, value: Path | None) -> Path | None:
        if value is not None and not Path(value).expanduser().is_file():
            raise ValueError(f"{str(value)!r} is not a file")
        return value

    @model_validator(mode="after")
    def _required(self) -> BridgeConfig:
        if not self.webhook_secret:
            raise ValueError("STRIPE_WEBHOOK_SECRET is required: the bridge verifies every webhook with it")
        if not self.token:
            raise ValueError("BRIDGE_TOKEN is required: the bridge's stripe-bridge token for the server")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("PAYMENTS_TLS_CLIENT_CERT_FILE and PAYMENTS_TLS_CLIENT_KEY_FILE go together")
        return self

    @classmethod
    def from_env(cls) -> BridgeConfig:
        """The settings from the environment, or ConfigError (a ValueError) with one line per mistake."""
        try:
            return cls()
        except ValidationError as exc:
            raise ConfigError(describe_errors(exc, cls)) from None

    @property
    def host_port(self) -> tuple[str, int]:
        host, port = split_addr(self.http_addr)
        return host or "127.0.0.1", port

    @property
    def client_tls(self) -> ClientTls:
        enabled = self.tls or self.tls_ca_file is not None or self.tls_cert_file is not None
        return ClientTls(enabled, self.tls_ca_file, self.tls_cert_file, self.tls_key_file, self.tls_server_name)


def _request_id(request: web.Request) -> str:
    """The caller's X-Request-Id when it is short printable ASCII, else a new one."""
    given = request.headers.get(REQUEST_ID, "")
    if given and len(given) <= MAX_REQUEST_ID_CHARS and given.isascii() and given.isprintable():
        return given
    return uuid.uuid4().hex


def _answer(status: int, message: str, request_id: str) -> web.Response:
    return web.json_response({"status": status, "message": message}, status=status,
                             headers={REQUEST_ID: request_id})


class Bridge:
    def __init__(self, config: BridgeConfig):
        self.config = config
        self.channel: grpc.aio.Channel | None = None
        self.stub: pb_grpc.PaymentsServiceStub | None = None
        self.runner: web.AppRunner | None = None
        self.metrics: MetricsEndpoint | None = None
        self.port = 0

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_post("/stripe/webhook", self.webhook)
        app.router.add_get("/healthz", self.healthz)
        return app

    async def start(self) -> int:
        """Serve; OSError (a busy port) and ValueError (plain text off this machine) go to the caller."""
        # reconnect quickly once the server is back: Stripe's next delivery should get through
        self.channel = open_channel(self.config.grpc_target, self.config.client_tls, aio=True,
                                    allow_insecure=self.config.allow_insecure, options=[
                                        ("grpc.initial_reconnect_backoff_ms", 200),
                                        ("grpc.min_reconnect_backoff_ms", 200),
                                        ("grpc.max_reconnect_backoff_ms", 2000)])
        self.stub = pb_grpc.PaymentsServiceStub(self.channel)
        self.runner = web.AppRunner(self.make_app(), access_log=None)
        await self.runner.setup()
        host, port = self.config.host_port
        site = web.TCPSite(self.runner, host, port)
        await site.start()
        sockets = site._server.sockets if site._server else []  # type: ignore[union-attr]
        self.port = sockets[0].getsockname()[1] if sockets else port
        if self.config.metrics_addr:
            self.metrics = MetricsEndpoint(self.config.metrics_addr)
            self.metrics.start()
        log.info("bridge serving", addr=f"{host}:{self.port}", forwards_to=self.config.grpc_target,
                 tls=self.config.client_tls.enabled, metrics_port=self.metrics.port if self.metrics else None)
        return self.port

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
        if self.channel is not None:
            await self.channel.close()
            self.channel = None
        if self.metrics is not None:
            self.metrics.stop()
            self.metrics = None

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def webhook(self, request: web.Request) -> web.Response:
        """The request id (the caller's X-Request-Id, or a new one) goes to the server as its
        x-request-id, back in the answer's X-Request-Id, and into the log line."""
        started = time.monotonic()
        request_id = _request_id(request)
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            self._log(400, "bad_request", "", "", started, "body too large", request_id)
            return _answer(400, "body too large", request_id)
        except (web.RequestPayloadError, aiohttp.http_exceptions.HttpProcessingError, ValueError) as exc:
            # a body that cannot be read as sent (a Content-Encoding it does not have, say): the
            # sender's fault, never the server's, so never a 5xx that Stripe would retry
            self._log(400, "bad_request", "", "", started, f"unreadable body: {type(exc).__name__}", request_id)
            return _answer(400, "the body cannot be read", request_id)
        try:
            event = verify_webhook(body, request.headers.get("Stripe-Signature"), self.config.webhook_secret,
                                   self.config.tolerance_s)
        except BadWebhook as exc:
            self._log(400, "bad_request", "", "", started, str(exc), request_id)
            return _answer(400, str(exc), request_id)
        status, outcome, message = await self.forward(event["id"], event["type"], body.decode("utf-8"), request_id)
        self._log(status, outcome, event["id"], event["type"], started, message, request_id)
        return _answer(status, message, request_id)

    async def forward(self, event_id: str, event_type: str, payload_json: str,
                      request_id: str = "") -> tuple[int, str, str]:
        """(HTTP status, outcome, message) of forwarding one verified event."""
        assert self.stub is not None
        metadata = [("authorization", f"Bearer {self.config.token}")]
        if request_id:
            metadata.append(("x-request-id", request_id))
        try:
            response = await self.stub.HandleStripeEvent(
                pb.HandleStripeEventRequest(event_id=event_id, type=event_type, payload_json=payload_json),
                metadata=tuple(metadata), timeout=FORWARD_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code in RETRYABLE:
                return 503, "server_unavailable", (f"the payments server is unavailable or failing ({code.name}); "
                                                   "deliver again")
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                return 400, "refused", f"the payments server refused the event: {exc.details()}"
            return 500, "server_error", f"the payments server answered {code.name}"
        if response.duplicate:
            return 200, "duplicate", "duplicate: already applied"
        if response.handled:
            return 200, "applied", "applied"
        return 200, "acknowledged", "acknowledged"

    @staticmethod
    def _log(status: int, outcome: str, event_id: str, event_type: str, started: float, message: str,
             request_id: str) -> None:
        took_s = time.monotonic() - started
        WEBHOOKS.labels(outcome).inc()
        WEBHOOK_SECONDS.observe(took_s)
        line = log.error if outcome == "server_error" else log.warning if status >= 400 else log.info
        line("webhook", status=status, outcome=outcome, stripe_event=event_id, type=event_type,
             duration_ms=round(took_s * 1000, 1), message=message, request_id=request_id)
