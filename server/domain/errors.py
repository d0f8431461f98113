"""Domain errors. The API layer maps each to a gRPC status; handlers never log-and-rethrow."""

from __future__ import annotations


class DomainError(Exception):
    """Base of every error a caller can act on."""

    code = "INTERNAL"

    def __init__(self, message: str, *, field_violations: list[tuple[str, str]] | None = None):
        super().__init__(message)
        self.message = message
        self.field_violations = field_violations or []


class InvalidArgument(DomainError):
    code = "INVALID_ARGUMENT"

    @classmethod
    def field(cls, field: str, description: str) -> InvalidArgument:
        return cls(f"{field}: {description}", field_violations=[(field, description)])


class NotFound(DomainError):
    code = "NOT_FOUND"


class FailedPrecondition(DomainError):
    code = "FAILED_PRECONDITION"


class AlreadyExists(DomainError):
    code = "ALREADY_EXISTS"


class PermissionDenied(DomainError):
    code = "PERMISSION_DENIED"


class Aborted(DomainError):
    code = "ABORTED"


class Unavailable(DomainError):
    code = "UNAVAILABLE"


class OutOfRange(DomainError):
    code = "OUT_OF_RANGE"


class Unimplemented(DomainError):
    code = "UNIMPLEMENTED"


class InsufficientFunds(FailedPrecondition):
    def __init__(self, balance_cents: int, amount_cents: int):
        super().__init__(
            f"insufficient funds: balance {format_cents(balance_cents)}, amount {format_cents(amount_cents)}"
        )
        self.balance_cents = balance_cents
        self.amount_cents = amount_cents


def format_cents(cents: int) -> str:
    sign = "-" if cents < 0 else ""
    cents = abs(cents)
    return f"{sign}${cents // 100:,}.{cents % 100:02d}"
