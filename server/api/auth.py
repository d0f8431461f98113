"""Bearer tokens and roles (SPEC §8).

PAYMENTS_AUTH_TOKENS holds comma-separated `token=principal:role` entries; an entry may give
`sha256:<hex digest of the token>` instead of the token itself. Tokens are kept only as
digests in memory and never logged.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

APP, ADMIN, STRIPE_BRIDGE = "app", "admin", "stripe-bridge"
ROLES = (APP, ADMIN, STRIPE_BRIDGE)

SERVICE = "cobalt.payments.v1.PaymentsService"

APP_METHODS = frozenset({
    "Pay", "GetBalance", "GetStatement", "ExportStatement", "Transfer", "StartTopUp", "ConfirmCardPayment",
    "SetupAutoTopUp", "ConfirmAutoTopUp", "UpdateAutoTopUp", "CancelAutoTopUp", "Refund", "Subscribe", "Ack",
})
BRIDGE_METHODS = frozenset({"HandleStripeEvent"})


@dataclass(frozen=True)
class Principal:
    name: str
    role: str

    @property
    def is_admin(self) -> bool:
        return self.role == ADMIN


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenConfigError(ValueError):
    pass


def parse_tokens(spec: str) -> dict[str, Principal]:
    """`tok=alice:app,sha256:ab12…=ops:admin` → {digest: Principal}."""
    table: dict[str, Principal] = {}
    for raw in spec.split(","):
        entry = raw.strip()
        if not entry:
            continue
        token, sep, who = entry.rpartition("=")
        name, sep2, role = who.partition(":")
        if not sep or not sep2 or not token or not name:
            raise TokenConfigError("PAYMENTS_AUTH_TOKENS entries look like token=principal:role")
        if role not in ROLES:
            raise TokenConfigError(f"unknown role {role!r} in PAYMENTS_AUTH_TOKENS (roles: {', '.join(ROLES)})")
        key = token[len("sha256:"):].lower() if token.startswith("sha256:") else digest(token)
        table[key] = Principal(name, role)
    return table


def allowed(role: str, method: str) -> bool:
    if role == ADMIN:
        return method not in BRIDGE_METHODS
    if role == APP:
        return method in APP_METHODS
    if role == STRIPE_BRIDGE:
        return method in BRIDGE_METHODS
    return False


class Authenticator:
    def __init__(self, spec: str):
        self._tokens = parse_tokens(spec)

    def principal_for(self, authorization: str | None) -> Principal | None:
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        return self._tokens.get(digest(token.strip()))
