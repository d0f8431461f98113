"""`python -m bench.grpc_floor`: the gRPC floor. A server built as `payments-server` builds its own
(grpc.aio on uvloop, accept-ahead, every handler wrapped by its guard: authentication and the call's
log line) whose `Pay` answers at once, with no database: what a call costs this machine's server
and load generator before any payment is booked. Serves on PAYMENTS_GRPC_ADDR with the tokens of
PAYMENTS_AUTH_TOKENS until SIGTERM; every other method answers UNIMPLEMENTED."""

from __future__ import annotations

import asyncio
import signal

from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from cobalt.payments.v1 import payments_pb2 as pb
from cobalt.payments.v1 import payments_pb2_grpc as pb_grpc
from server.api import call_log
from server.api.accept_ahead import AcceptAhead
from server.app import configure_logging, new_event_loop, new_grpc_server, register_payments, tune_garbage_collector
from server.config import Settings

# what a Pay answers: the size and fields of a real answer
ANSWER = pb.PayResponse(status=pb.SUCCEEDED, payment_id="0f1e2d3c4b5a69788796a5b4c3d2e1f0", balance_cents=123_456,
                        reference="PAY-7KQ3-M9ZT-2WXA")


class AnswerAtOnce(pb_grpc.PaymentsServiceServicer):
    async def Pay(self, request: pb.PayRequest, context) -> pb.PayResponse:  # noqa: ANN001, N802
        return ANSWER


async def serve(settings: Settings) -> None:
    server = new_grpc_server()
    accept_ahead = AcceptAhead(settings.grpc_accept_ahead)
    register_payments(server, AnswerAtOnce(), settings.auth_tokens, accept_ahead)
    checks = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    if server.add_insecure_port(settings.grpc_addr) == 0:
        raise SystemExit(f"cannot listen on {settings.grpc_addr}")
    await server.start()
    accept_ahead.start(server)
    await checks.set("", health_pb2.HealthCheckResponse.SERVING)
    tune_garbage_collector()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1)
    await accept_ahead.stop()
    call_log.flush()


def main() -> None:
    configure_logging()
    settings = Settings.from_env()
    with asyncio.Runner(loop_factory=lambda: new_event_loop(settings.event_loop)) as runner:
        runner.run(serve(settings))


if __name__ == "__main__":
    main()
