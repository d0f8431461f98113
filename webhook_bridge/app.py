"""The bridge's HTTP server: `POST /stripe/webhook` and `GET /healthz`.

Bad or missing signature, a stale timestamp, or a body that is not a JSON object with an event's id
and type (`[1,2,3]`, `null`, `42` included): 400 and nothing is forwarded. Otherwise the raw verified body goes to HandleStripeEvent with the `stripe-bridge` token;
200 only once the server answered OK (it commits before answering), 5xx when the server is
unreachable or failing, so that Stripe delivers again. The server dedupes by event id.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass

import aiohttp.http_exceptions
import grpc
from aiohttp import web

from cobalt.payments.v1 import payments_pb2 as pb
from cobalt.payments.v1 import payments_pb2_grpc as pb_grpc
from server.stripe_gateway import WEBHOOK_TOLERANCE_S, BadWebhook, verify_webhook

log = logging.getLogger("payments.bridge")

MAX_BODY_BYTES = 512 * 1024
FORWARD_TIMEOUT_S = 15.0
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED,
             grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}


@dataclass(frozen=True)
class BridgeConfig:
    http_addr: str = "127.0.0.1:8080"
    grpc_target: str = "127.0.0.1:50051"
    token: str = ""
    webhook_secret: str = ""
    tolerance_s: int = WEBHOOK_TOLERANCE_S

    @classmethod
    def from_env(cls) -> BridgeConfig:
        env = os.environ
        config = cls(http_addr=env.get("BRIDGE_HTTP_ADDR") or "127.0.0.1:8080",
                     grpc_target=env.get("BRIDGE_GRPC_TARGET") or "127.0.0.1:50051",
                     token=env.get("BRIDGE_TOKEN", ""), webhook_secret=env.get("STRIPE_WEBHOOK_SECRET", ""))
        if not config.webhook_secret:
            raise ValueError("STRIPE_WEBHOOK_SECRET is required: the bridge verifies every webhook with it")
        if not config.token:
            raise ValueError("BRIDGE_TOKEN is required: the bridge's stripe-bridge token for the server")
        return config

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.http_addr.rpartition(":")
        return host.strip("[]") or "127.0.0.1", int(port)


def _answer(status: int, message: str) -> web.Response:
    return web.json_response({"status": status, "message": message}, status=status)


class Bridge:
    def __init__(self, config: BridgeConfig):
        self.config = config
        self.channel: grpc.aio.Channel | None = None
        self.stub: pb_grpc.PaymentsServiceStub | None = None
        self.runner: web.AppRunner | None = None
        self.port = 0

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_post("/stripe/webhook", self.webhook)
        app.router.add_get("/healthz", self.healthz)
        return app

    async def start(self) -> int:
        # reconnect quickly once the server is back: Stripe's next delivery should get through
        self.channel = grpc.aio.insecure_channel(self.config.grpc_target, options=[
            ("grpc.initial_reconnect_backoff_ms", 200), ("grpc.min_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 2000)])
        self.stub = pb_grpc.PaymentsServiceStub(self.channel)
        self.runner = web.AppRunner(self.make_app(), access_log=None)
        await self.runner.setup()
        host, port = self.config.host_port
        site = web.TCPSite(self.runner, host, port)
        await site.start()
        sockets = site._server.sockets if site._server else []  # type: ignore[union-attr]
        self.port = sockets[0].getsockname()[1] if sockets else port
        log.info(json.dumps({"event": "bridge serving", "addr": f"{host}:{self.port}",
                             "forwards_to": self.config.grpc_target}))
        return self.port

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
        if self.channel is not None:
            await self.channel.close()
            self.channel = None

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def webhook(self, request: web.Request) -> web.Response:
        started = time.monotonic()
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return _answer(400, "body too large")
        except (web.RequestPayloadError, aiohttp.http_exceptions.HttpProcessingError, ValueError) as exc:
            # a body that cannot be read as sent (a Content-Encoding it does not have, say): the
            # sender's fault, never the server's, so never a 5xx that Stripe would retry
            self._log(400, "", "", started, f"unreadable body: {type(exc).__name__}")
            return _answer(400, "the body cannot be read")
        try:
            event = verify_webhook(body, request.headers.get("Stripe-Signature"), self.config.webhook_secret,
                                   self.config.tolerance_s)
        except BadWebhook as exc:
            self._log(400, "", "", started, str(exc))
            return _answer(400, str(exc))
        status, message = await self.forward(event["id"], event["type"], body.decode("utf-8"))
        self._log(status, event["id"], event["type"], started, message)
        return _answer(status, message)

    async def forward(self, event_id: str, event_type: str, payload_json: str) -> tuple[int, str]:
        assert self.stub is not None
        try:
            response = await self.stub.HandleStripeEvent(
                pb.HandleStripeEventRequest(event_id=event_id, type=event_type, payload_json=payload_json),
                metadata=(("authorization", f"Bearer {self.config.token}"),), timeout=FORWARD_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code in RETRYABLE:
                return 503, f"the payments server is unavailable or failing ({code.name}); deliver again"
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                return 400, f"the payments server refused the event: {exc.details()}"
            return 500, f"the payments server answered {code.name}"
        if response.duplicate:
            return 200, "duplicate: already applied"
        return 200, "applied" if response.handled else "acknowledged"

    def _log(self, status: int, event_id: str, event_type: str, started: float, message: str) -> None:
        log.info(json.dumps({"event": "webhook", "status": status, "stripe_event": event_id, "type": event_type,
                             "duration_ms": round((time.monotonic() - started) * 1000, 1), "message": message}))
