"""`payments-webhook-bridge`: serve the bridge until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from webhook_bridge.app import Bridge, BridgeConfig


def main() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
    try:
        config = BridgeConfig.from_env()
    except ValueError as exc:
        raise SystemExit(str(exc)) from exc

    async def serve() -> None:
        bridge = Bridge(config)
        await bridge.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await bridge.stop()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
