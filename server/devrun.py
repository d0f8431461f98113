"""`make run`: start the embedded PostgreSQL when no database is configured, create dev tokens once,
print how to call, serve the server and the webhook bridge; stop the embedded PostgreSQL on exit."""

from __future__ import annotations

import argparse
import os
import secrets
from pathlib import Path

TOKENS_FILE = Path(".dev-tokens")


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
        _serve(args)
    finally:
        if embedded is not None:
            embedded.stop()


def _serve(args: argparse.Namespace) -> None:
    if not os.environ.get("PAYMENTS_AUTH_TOKENS"):
        os.environ["PAYMENTS_AUTH_TOKENS"] = dev_tokens()
        addr = os.environ.get("PAYMENTS_GRPC_ADDR", "127.0.0.1:50051")
        database = os.environ["PAYMENTS_DATABASE_URL"]
        print(f"""
Cobalt Payments (development) on {addr}, database {database}
Dev tokens (roles app, admin, stripe-bridge) are in {TOKENS_FILE} (git-ignored). Try, in another shell:

  export ADMIN_TOKEN=$(tr ',' '\\n' < {TOKENS_FILE} | sed -n 's/=dev-admin:admin$//p')
  export APP_TOKEN=$(tr ',' '\\n' < {TOKENS_FILE} | sed -n 's/=dev-app:app$//p')
  npm ci   # once: installs buf, pinned in package.json
  node_modules/.bin/buf curl --protocol grpc --http2-prior-knowledge --list-methods http://{addr}
  node_modules/.bin/buf curl --protocol grpc --http2-prior-knowledge -H "authorization: Bearer $APP_TOKEN" \\
      -d '{{"account": {{"member_id": 1}}}}' http://{addr}/cobalt.payments.v1.PaymentsService/GetBalance
  PAYMENTS_TOKEN=$ADMIN_TOKEN .venv/bin/payments-admin balance --member 1

Ctrl-C stops.
""", flush=True)
    if args.local_stripe:
        from server.localdev import run_with_local_stripe

        run_with_local_stripe()
        return
    from server.localdev import run_server_and_bridge

    run_server_and_bridge(dict(os.environ))


if __name__ == "__main__":
    main()
