"""Local development: `make run` (server and bridge) and `make run-local-stripe` (SPEC §9).

`make run-local-stripe` starts three things on 127.0.0.1: localstripe (a stateful Stripe double, its aiohttp app served
here with its disk store switched off), the gRPC server with STRIPE_API_BASE pointing at it, and the
webhook bridge, with localstripe's webhook aimed at the bridge. Ctrl-C stops all three.

`python -m server.localdev --localstripe-only --port N` serves localstripe alone (the test suite
starts it this way).
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request

LOCALSTRIPE_HOST = "127.0.0.1"
FAKE_SECRET_KEY = "sk_test_localstripe"  # localstripe accepts any key that starts with sk_


def serve_localstripe(port: int, host: str = LOCALSTRIPE_HOST) -> None:
    """Serve localstripe's app on host:port only, never writing its store to disk."""
    import logging

    from aiohttp import web
    from localstripe import resources
    from localstripe.server import app

    # The CLI loads and dumps /tmp/localstripe.pickle on every request: keep the store in memory.
    resources.Store.dump_to_disk = lambda self: None  # type: ignore[method-assign]
    resources.Store.try_load_from_disk = lambda self: None  # type: ignore[method-assign]
    logging.basicConfig(level=logging.WARNING)
    web.run_app(app, host=host, port=port, print=None, access_log=None, handle_signals=True, shutdown_timeout=1)


def free_port(host: str = LOCALSTRIPE_HOST) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for_http(url: str, timeout_s: float = 60.0, proc: subprocess.Popen | None = None) -> bool:
    """Poll until something answers HTTP at url (any status): True. False as soon as `proc` (the
    process that should answer) has exited."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return True
        except urllib.error.HTTPError:
            return True  # it answered
        except OSError:
            if proc is not None and proc.poll() is not None:
                return False
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing answered at {url} within {timeout_s} s") from None
            time.sleep(0.05)


def start_localstripe_process(port: int | None = None) -> tuple[subprocess.Popen, str]:
    """Start localstripe in a child process; returns (process, api base URL)."""
    port = port or free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.localdev", "--localstripe-only", "--port", str(port)],
        stdout=subprocess.DEVNULL,
    )
    base = f"http://{LOCALSTRIPE_HOST}:{port}"
    try:
        wait_for_http(base + "/js.stripe.com/v3/")
    except TimeoutError:
        proc.kill()
        raise
    return proc, base


def configure_localstripe_webhook(api_base: str, url: str, secret: str, name: str = "bridge") -> None:
    """Point localstripe's signed webhooks at url (its `_config/webhooks` endpoint)."""
    body = urllib.parse.urlencode({"url": url, "secret": secret}).encode()
    req = urllib.request.Request(f"{api_base}/_config/webhooks/{name}", data=body, method="POST")
    urllib.request.urlopen(req, timeout=5).close()


def run_with_local_stripe() -> int:
    """localstripe + server + bridge, all on 127.0.0.1, until Ctrl-C; returns the exit code."""
    stripe_proc, api_base = start_localstripe_process(int(os.environ.get("LOCALSTRIPE_PORT", "0")) or None)
    env = dict(os.environ)
    env.setdefault("STRIPE_SECRET_KEY", FAKE_SECRET_KEY)
    env["STRIPE_API_BASE"] = api_base
    return run_server_and_bridge(env, [("localstripe", stripe_proc)], api_base)


def _failed(name: str, proc: subprocess.Popen) -> int:
    """The exit code for `make run` once a part stopped by itself: 0 when it stopped cleanly (Ctrl-C
    reaches every part of the terminal's process group, and one may stop before this process
    notices), else its code, named on stderr."""
    if proc.returncode in (0, -signal.SIGINT, -signal.SIGTERM):
        return 0
    print(f"make run: {name} exited with code {proc.returncode} (its own line above says why); "
          "stopping the rest", file=sys.stderr, flush=True)
    return proc.returncode if proc.returncode > 0 else 1


def run_server_and_bridge(env: dict[str, str], children: list[tuple[str, subprocess.Popen]] | None = None,
                          localstripe_base: str = "") -> int:
    """The gRPC server and the webhook bridge as child processes until Ctrl-C (`make run`).
    With localstripe running, its signed webhooks are aimed at the bridge. Returns the exit code:
    0 after Ctrl-C or SIGTERM, else that of the first part that stopped by itself (a busy port, a
    bad setting), which is named on stderr."""
    env.setdefault("STRIPE_WEBHOOK_SECRET", "whsec_" + secrets.token_hex(16))
    grpc_addr = env.setdefault("PAYMENTS_GRPC_ADDR", "127.0.0.1:50051")
    bridge_addr = env.setdefault("BRIDGE_HTTP_ADDR", "127.0.0.1:8080")
    env.setdefault("BRIDGE_GRPC_TARGET", grpc_addr)
    if not env.get("BRIDGE_TOKEN"):
        for entry in env.get("PAYMENTS_AUTH_TOKENS", "").split(","):
            token, _, who = entry.strip().rpartition("=")
            if who.endswith(":stripe-bridge") and not token.startswith("sha256:"):
                env["BRIDGE_TOKEN"] = token
                break
    children = list(children or [])
    exit_code = 0
    try:
        children.append(("the payments server (payments-server)",
                         subprocess.Popen([sys.executable, "-m", "server"], env=env)))
        if env.get("BRIDGE_TOKEN"):
            bridge = subprocess.Popen([sys.executable, "-m", "webhook_bridge"], env=env)
            children.append(("the webhook bridge (payments-webhook-bridge)", bridge))
            if wait_for_http(f"http://{bridge_addr}/healthz", proc=bridge):
                print(f"webhook bridge on http://{bridge_addr}/stripe/webhook (GET /healthz)", flush=True)
        else:
            print("no stripe-bridge token in PAYMENTS_AUTH_TOKENS and no BRIDGE_TOKEN: the bridge is not started",
                  flush=True)
        if localstripe_base and env.get("BRIDGE_TOKEN"):
            configure_localstripe_webhook(localstripe_base, f"http://{bridge_addr}/stripe/webhook",
                                          env["STRIPE_WEBHOOK_SECRET"])
            print(f"localstripe on {localstripe_base} (STRIPE_API_BASE), webhooks → "
                  f"http://{bridge_addr}/stripe/webhook", flush=True)
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        while all(child.poll() is None for _, child in children):
            time.sleep(0.2)
        name, stopped = next((name, child) for name, child in children if child.poll() is not None)
        exit_code = _failed(name, stopped)
    except KeyboardInterrupt:
        pass
    finally:
        for _, child in reversed(children):
            if child.poll() is None:
                child.terminate()
        for _, child in children:
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                child.kill()
    return exit_code


def main() -> None:
    parser = argparse.ArgumentParser(description="localstripe on 127.0.0.1, with the server and the bridge")
    parser.add_argument("--localstripe-only", action="store_true", help="serve localstripe alone")
    parser.add_argument("--port", type=int, default=8420)
    args = parser.parse_args()
    if args.localstripe_only:
        serve_localstripe(args.port)
    else:
        sys.exit(run_with_local_stripe())


if __name__ == "__main__":
    main()
