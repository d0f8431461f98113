"""`make run`: start the embedded PostgreSQL when no database is configured, create dev tokens once,
print how to call, serve the server and the webhook bridge; stop the embedded PostgreSQL on exit.
Exits non-zero, naming the part, when one of them cannot start (a busy port, a bad setting)."""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from pathlib import Path

TOKENS_FILE = Path(".dev-tokens")
DEV_METRICS_ADDR = "127.0.0.1:9464"


def dev_tokens() -> str:
    """Dev tokens, created once and kept in an ignored local file (never printed to logs)."""
    if TOKENS_FILE.exists():
        return TOKENS_FILE.read_text().strip()
    spec = ",".join(
        f"{secrets.token_urlsafe(24)}={name}:{role}"
        for name, role in (("dev-app", "app"), ("dev-admin", "admin"), ("dev-bridge", "stripe-bridge"))
    )
    TOKENS_FILE.write_text(spec + "\n")
    TOKENS_FILE.chmod(0o600)
    return spec


def database_label() -> str:
    url = os.environ.get("PAYMENTS_DATABASE_URL")
    if not url:
        return "PAYMENTS_DATABASE_URL (unset)"
    from server.config import database_label as without_password

    return without_password(url)


def main() -> None:
    parser = argparse.ArgumentParser(description="run Cobalt Payments locally")
    parser.add_argument("--local-stripe", action="store_true", help="also start localstripe and the webhook bridge")
    args = parser.parse_args()
    embedded = None
    if not os.environ.get("PAYMENTS_DATABASE_URL"):
        from server import embedded_pg

        embedded = embedded_pg.start(Path("var") / "postgres")
        os.environ["PAYMENTS_DATABASE_URL"] = embedded.url
        print(f"embedded PostgreSQL: data in var/postgres, {embedded.url}", flush=True)
    try:
        code = _serve(args)
    finally:
        if embedded is not None:
            embedded.stop()
    sys.exit(code)


def _serve(args: argparse.Namespace) -> int:
    os.environ.setdefault("PAYMENTS_METRICS_ADDR", DEV_METRICS_ADDR)
    if not os.environ.get("PAYMENTS_AUTH_TOKENS"):
        os.environ["PAYMENTS_AUTH_TOKENS"] = dev_tokens()
        addr = os.environ.get("PAYMENTS_GRPC_ADDR") or "127.0.0.1:50051"
        metrics_addr = os.environ["PAYMENTS_METRICS_ADDR"]
        print(f"""
Cobalt Payments (development) on {addr}, database {database_label()}
Metrics: http://{metrics_addr}/metrics
Dev tokens (roles app, admin, stripe-bridge) are in {TOKENS_FILE} (git-ignored). Try, in another shell:

  export ADMIN_TOKEN=$(tr ',' '\\n' < {TOKENS_FILE} | sed -n 's/=dev-admin:admin$//p')
  export APP_TOKEN=$(tr ',' '\\n' < {TOKENS_FILE} | sed -n 's/=dev-app:app$//p')
  npm ci   # once: installs buf, pinned in package.json
  node_modules/.bin/buf curl --protocol grpc --http2-prior-knowledge --list-methods http://{addr}
  node_modules/.bin/buf curl --protocol grpc --http2-prior-knowledge -H "authorization: Bearer $APP_TOKEN" \\
      -d '{{"account": {{"member_id": 1}}}}' http://{addr}/cobalt.payments.v1.PaymentsService/GetBalance
  export PATH=$PWD/.venv/bin:$PATH
  PAYMENTS_TOKEN=$ADMIN_TOKEN payments-admin --target {addr} balance --member 1

Ctrl-C stops.
""", flush=True)
    if args.local_stripe:
        from server.localdev import run_with_local_stripe

        return run_with_local_stripe()
    from server.localdev import run_server_and_bridge

    return run_server_and_bridge(dict(os.environ))


if __name__ == "__main__":
    main()
