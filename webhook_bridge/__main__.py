"""`payments-webhook-bridge`: serve the bridge until SIGINT/SIGTERM. A bad setting or a busy port is
one log line and a non-zero exit (2 settings, 1 could not start)."""

from __future__ import annotations

import argparse
import asyncio
import signal

import structlog

from server.config import ConfigError
from server.logs import configure_logging
from server.startup import StartupError, ensure_port_free, version
from webhook_bridge.app import Bridge, BridgeConfig

log = structlog.get_logger("payments.bridge")


class _CannotStart(Exception):
    pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="payments-webhook-bridge",
        description="Verify Stripe's signed webhooks and forward each event to the payments server. "
                    "Configuration is environment variables (BRIDGE_*, STRIPE_WEBHOOK_SECRET, PAYMENTS_TLS_*), "
                    "listed in the README.",
        epilog="Exit codes: 0 stopped cleanly; 1 could not start (port in use); 2 bad settings.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    parser.parse_args(argv)
    configure_logging()
    try:
        config = BridgeConfig.from_env()
    except ConfigError as exc:
        for line in exc.lines:
            log.error(line)
        raise SystemExit(2) from None

    async def serve() -> None:
        ensure_port_free(config.http_addr, "BRIDGE_HTTP_ADDR")
        if config.metrics_addr:
            ensure_port_free(config.metrics_addr, "BRIDGE_METRICS_ADDR")
        bridge = Bridge(config)
        try:
            await bridge.start()
        except OSError as exc:
            await bridge.stop()
            raise _CannotStart(f"BRIDGE_HTTP_ADDR={config.http_addr} or BRIDGE_METRICS_ADDR={config.metrics_addr}: "
                               f"cannot listen there ({exc.strerror or exc})") from None
        except ValueError as exc:
            await bridge.stop()
            raise _CannotStart(f"BRIDGE_GRPC_TARGET={exc}") from None
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await bridge.stop()

    try:
        asyncio.run(serve())
    except (_CannotStart, StartupError) as exc:
        log.error(str(exc))
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
