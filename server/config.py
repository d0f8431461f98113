"""Configuration from environment variables (documented in the README)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from server.domain.aba import Originator


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:  # a bad setting must stop the start, loudly
        raise SystemExit(f"{name} must be an integer, got {raw!r}") from exc


def _int_in(name: str, default: int, low: int, high: int) -> int:
    value = _int(name, default)
    if not low <= value <= high:
        raise SystemExit(f"{name} must be between {low} and {high}, got {value}")
    return value


def _choice(name: str, allowed: tuple[str, ...]) -> str:
    """One of `allowed` (the first when unset)."""
    raw = (os.environ.get(name) or allowed[0]).strip().lower()
    if raw not in allowed:
        raise SystemExit(f"{name} must be one of {', '.join(allowed)}, got {raw!r}")
    return raw


@dataclass(frozen=True)
class Settings:
    database_url: str = ""  # PostgreSQL; `make run` starts an embedded one when unset
    grpc_addr: str = "127.0.0.1:50051"
    auth_tokens: str = ""
    currency: str = "aud"
    timezone: str = "Australia/Sydney"
    stripe_secret_key: str = ""
    stripe_api_base: str = ""
    stripe_webhook_secret: str = ""
    db_pool_size: int = 16
    db_threads: int = 16
    event_retention_days: int = 30
    event_poll_interval_ms: int = 1000  # the event stream's fallback poll when no wake-up comes
    shutdown_grace_s: int = 5
    lock_timeout_ms: int = 2_000  # how long a statement waits for a row lock before the request fails
    reconcile_interval_ms: int = 5_000  # how often pending card operations are settled with Stripe (0: never)
    reconcile_min_age_s: int = 60  # a pending card operation younger than this belongs to its request
    card_intent_ttl_s: int = 86_400  # a PaymentIntent nobody paid for this long is cancelled
    event_loop: str = "uvloop"  # or "asyncio" (the standard library's loop)
    grpc_accept_ahead: int = 8  # requests for a method's next call kept open beyond grpc.aio's one (0: off)
    max_in_flight: int = 256  # unary calls handled at once; beyond: RESOURCE_EXHAUSTED at once
    db_wait_s: int = 0  # at start, how long to wait for an unreachable database before giving up
    health_probe_ms: int = 500  # how often health asks the database (SELECT 1 on its own connection)
    extra: dict = field(default_factory=dict)
    aba: Originator | None = None  # the federation as sender of settlement bank files (see aba_from_env)

    @classmethod
    def from_env(cls) -> Settings:
        env = os.environ
        return cls(
            database_url=env.get("PAYMENTS_DATABASE_URL") or "",
            grpc_addr=env.get("PAYMENTS_GRPC_ADDR") or "127.0.0.1:50051",
            auth_tokens=env.get("PAYMENTS_AUTH_TOKENS", ""),
            currency=env.get("PAYMENTS_CURRENCY") or "aud",
            timezone=env.get("PAYMENTS_TIMEZONE") or "Australia/Sydney",
            stripe_secret_key=env.get("STRIPE_SECRET_KEY", ""),
            stripe_api_base=env.get("STRIPE_API_BASE", ""),
            stripe_webhook_secret=env.get("STRIPE_WEBHOOK_SECRET", ""),
            db_pool_size=_int("PAYMENTS_DB_POOL_SIZE", 16),
            db_threads=_int("PAYMENTS_DB_THREADS", 16),
            event_retention_days=_int("PAYMENTS_EVENT_RETENTION_DAYS", 30),
            event_poll_interval_ms=_int("PAYMENTS_EVENT_POLL_INTERVAL_MS", 1000),
            shutdown_grace_s=_int("PAYMENTS_SHUTDOWN_GRACE_S", 5),
            lock_timeout_ms=_int_in("PAYMENTS_LOCK_TIMEOUT_MS", 2_000, 1, 600_000),
            reconcile_interval_ms=_int_in("PAYMENTS_RECONCILE_INTERVAL_MS", 5_000, 0, 3_600_000),
            reconcile_min_age_s=_int_in("PAYMENTS_RECONCILE_MIN_AGE_S", 60, 0, 86_400),
            card_intent_ttl_s=_int_in("PAYMENTS_CARD_INTENT_TTL_S", 86_400, 60, 30 * 86_400),
            event_loop=_choice("PAYMENTS_EVENT_LOOP", ("uvloop", "asyncio")),
            grpc_accept_ahead=_int_in("PAYMENTS_GRPC_ACCEPT_AHEAD", 8, 0, 64),
            aba=aba_from_env(),
            max_in_flight=_int_in("PAYMENTS_MAX_IN_FLIGHT", 256, 1, 100_000),
            db_wait_s=_int_in("PAYMENTS_DB_WAIT_S", 0, 0, 3600),
            health_probe_ms=_int_in("PAYMENTS_HEALTH_PROBE_MS", 500, 50, 60_000),
        )


# ---------------------------------------------------------------- settlement bank files (ABA)
# The federation's Direct Entry details, for the ABA file of every real settlement. Unset
# (PAYMENTS_ABA_USER_ID empty): settlements carry no ABA file. Set: every one must be valid.
ABA_ENV = {
    "user_id": "PAYMENTS_ABA_USER_ID",  # APCA Direct Entry user id, six digits
    "bank": "PAYMENTS_ABA_BANK",  # the federation's bank, three-letter mnemonic (CBA, WBC, NAB, ANZ, ...)
    "user_name": "PAYMENTS_ABA_USER_NAME",  # name of the user as the bank knows it (26 characters kept)
    "bsb": "PAYMENTS_ABA_BSB",  # the federation's account debited for the file's total: ddd-ddd
    "account_number": "PAYMENTS_ABA_ACCOUNT_NUMBER",  # up to 9 digits
    "account_name": "PAYMENTS_ABA_ACCOUNT_NAME",  # its title (32 characters kept)
    "description": "PAYMENTS_ABA_DESCRIPTION",  # entries' description (12 kept), default SETTLEMENT
    "remitter": "PAYMENTS_ABA_REMITTER",  # remitter on the clubs' statements (16 kept), default the user name
}


def aba_from_env() -> Originator | None:
    env = {key: (os.environ.get(name) or "").strip() for key, name in ABA_ENV.items()}
    if not env["user_id"]:
        return None
    originator = Originator(
        user_id=env["user_id"], bank=env["bank"].upper(), user_name=env["user_name"], bsb=env["bsb"],
        account_number=env["account_number"], account_name=env["account_name"] or env["user_name"],
        description=env["description"] or "SETTLEMENT", remitter=env["remitter"],
    )
    problems = originator.problems()
    if problems:  # a bank file with wrong sender details would be refused by the bank, after the money moved
        raise SystemExit("PAYMENTS_ABA_* settings: " + "; ".join(problems))
    return originator
